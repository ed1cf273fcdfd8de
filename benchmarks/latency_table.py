"""Render benchmarks/results/latency.jsonl (written by latency.py) as the Markdown table in docs/benchmarks.md.

    python benchmarks/latency_table.py benchmarks/results/latency.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(rows: list[dict]) -> str:
    lines = ["| model | removed | groups | batch | dense ms | masked | **compact** | Torch-Pruning (same MACs) "
             "| MACs allow | compact forms |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    notes: dict[str, str] = {}  # rows measured with another kernel than the table's: note -> mark
    for r in rows:
        mark = ""
        if r.get("kernel"):
            mark = notes.setdefault(r["kernel"], "†" * (len(notes) + 1))
        for b, x in r["batches"].items():
            s = x["speedup"]
            tp = f"{s['torch_pruning']:.2f}x" if "torch_pruning" in s else "n/a"
            forms = ", ".join(f"{k} {v}" for k, v in x["strategies"].items())
            model = r["arch"] + (" (BN folded)" if r.get("fold_bn") else "")
            if r.get("allocator_env"):
                model += " (" + ", ".join(f"{k}={v}" for k, v in r["allocator_env"].items()) + ")"
            model += mark
            lines.append(f"| {model} | {round(100 * r['ratio'])} % | {r['groups']} | {b} | {x['ms']['dense']:.1f} "
                         f"| {s['masked']:.2f}x | **{s['compact']:.2f}x** | {tp} "
                         f"| {r['macs']['dense'] / r['macs']['effective']:.2f}x | {forms} |")
    lines += [""] + [f"- {mark} kernel: {note}" for note, mark in notes.items()] if notes else []
    return "\n".join(lines)


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/latency.jsonl")
    print(table([json.loads(line) for line in path.read_text().splitlines() if line.strip()]))
