"""Rich rendering of plain-data results (analysis, reports). Used by the CLI only."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def macs(n: float) -> str:
    """MACs with a unit: 4.11 GMACs, 310.5 MMACs, 12.0 kMACs."""
    for unit, f in (("GMACs", 1e9), ("MMACs", 1e6), ("kMACs", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.3g} {unit}" if n / f < 100 else f"{n / f:.1f} {unit}"
    return f"{int(n)} MACs"


def count(n: float) -> str:
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.3g}{unit}" if n / f < 100 else f"{n / f:.1f}{unit}"
    return f"{int(n)}"


def size(n: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.2f} {unit}"
    return f"{int(n)} B"


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def analysis_tables(a: dict[str, Any]) -> list[Table]:
    t = Table(title=f"Layers (input {tuple(a['input_shape'])}, batch 1)", show_lines=False)
    for col, kw in (("layer", {}), ("type", {}), ("weight shape", {}), ("params", {"justify": "right"}),
                    ("MACs", {"justify": "right"}), ("SG-CNN", {})):
        t.add_column(col, **kw)
    for r in a["layers"]:
        status = "[green]prune[/]" if r["prunable"] else f"[yellow]skip[/]: {r['reason']}"
        t.add_row(r["name"], r["type"], r["shape"], count(r["params"]), macs(r["macs"]) if r["macs"] else "", status)
    tot = a["totals"]
    t.add_section()
    t.add_row("[b]total[/]", "", "", count(tot["params"]), macs(tot["macs"]),
              f"{tot['prunable_layers']} to prune, {tot['skipped_layers']} skipped")
    w = Table(title="What-if (estimated: pruned layers scale by 1 - ratio)")
    for col in ("groups", "ratio (conv / linear)", "layers pruned", "MACs", "MACs vs now", "params"):
        w.add_column(col, justify="right")
    for r in a["what_if"]:
        w.add_row(str(r["groups"]), f"{r['ratio']:.2f} / {r['fc_ratio']:.2f}", str(r["pruned_layers"]),
                  macs(r["macs"]), pct(r["macs"] / tot["macs"]), count(r["params"]))
    return [t, w]


def report_tables(r: dict[str, Any], per_layer: bool = True, summary: bool = True) -> list[Table]:
    if r.get("stage") == "compact":
        return export_tables(r)
    tables = [_summary_table(r)] if summary else []
    tables += latency_tables(r.get("latency", []))
    if per_layer and r.get("layers"):
        lt = Table(title="Pruned layers")
        for col in ("layer", "MACs before", "MACs after", "sparsity", "params after", "blocks"):
            lt.add_column(col, justify="right" if col != "layer" else "left",
                          overflow="fold" if col == "layer" else "ellipsis")
        for x in r["layers"]:
            lt.add_row(x["name"], macs(x["macs_before"]), macs(x["macs_after"]), pct(x["sparsity"]),
                       count(x["params_after"]), str(x["blocks"]))
        tables.append(lt)
    if r.get("skipped"):
        st = Table(title="Left dense")
        st.add_column("layer")
        st.add_column("reason")
        for s in r["skipped"]:
            st.add_row(s["name"], s["reason"])
        tables.append(st)
    return tables


def latency_tables(latency: list[dict[str, Any]]) -> list[Table]:
    tables = []
    for lat in latency:
        lt = Table(title=f"Measured latency, batch {lat['batch_size']}, {lat['threads']} threads (median)")
        for col in ("model", "ms per batch", "speedup (measured)", "speedup allowed by MACs"):
            lt.add_column(col, justify="right")
        for row in lat["rows"]:
            lt.add_row(row["model"], f"{row['median_ms']:.2f}", f"{row['speedup']:.2f}x",
                       f"{row['macs_speedup']:.2f}x" if row.get("macs_speedup") else "")
        tables.append(lt)
    return tables


def _summary_table(r: dict[str, Any]) -> Table:
    o, c = r["original"], r["compressed"]
    t = Table(title="Summary (MACs = multiply-accumulates per image; FLOPs = 2 x MACs)")
    t.add_column("")
    t.add_column("original", justify="right")
    t.add_column("compressed", justify="right")
    t.add_column("ratio", justify="right")
    t.add_row("MACs", macs(o["macs"]), macs(c["macs"]), pct(r["macs_ratio"]))
    t.add_row("FLOPs (2 x MACs)", count(o["flops"]), count(c["flops"]), pct(r["macs_ratio"]))
    t.add_row("params (non-zero)", count(o["params"]), count(c["params_effective"]), pct(r["params_ratio"]))
    pl = r["pruned_layers"]
    t.add_row(f"MACs of the {pl['count']} pruned layers", macs(pl["macs_before"]), macs(pl["macs_after"]),
              f"-{pct(pl['macs_reduction'])}")
    for name, n in (r.get("files") or {}).items():
        t.add_row(f"file {name}", "", size(n), "")
    return t


def report_markdown(r: dict[str, Any]) -> str:
    o, c = r["original"], r["compressed"]
    lines = ["| | original | compressed | ratio |", "|---|---:|---:|---:|",
             f"| MACs | {macs(o['macs'])} | {macs(c['macs'])} | {pct(r['macs_ratio'])} |",
             f"| FLOPs (2 x MACs) | {count(o['flops'])} | {count(c['flops'])} | {pct(r['macs_ratio'])} |",
             f"| params (non-zero) | {count(o['params'])} | {count(c['params_effective'])} | {pct(r['params_ratio'])} |"]
    for name, n in (r.get("files") or {}).items():
        lines.append(f"| file {name} | | {size(n)} | |")
    for lat in r.get("latency", []):
        lines += ["", f"Measured latency, batch {lat['batch_size']}, {lat['threads']} threads:", "",
                  "| model | ms (median) | speedup (measured) | speedup (MACs) |", "|---|---:|---:|---:|"]
        for row in lat["rows"]:
            ms = f"{row['macs_speedup']:.2f}x" if row.get("macs_speedup") else ""
            lines.append(f"| {row['model']} | {row['median_ms']:.2f} | {row['speedup']:.2f}x | {ms} |")
    if r.get("layers"):
        lines += ["", "| layer | MACs before | MACs after | sparsity | blocks |", "|---|---:|---:|---:|---:|"]
        for x in r["layers"]:
            lines.append(f"| {x['name']} | {macs(x['macs_before'])} | {macs(x['macs_after'])} | "
                         f"{pct(x['sparsity'])} | {x['blocks']} |")
    return "\n".join(lines) + "\n"


def demo_table(s: dict[str, Any]) -> Table:
    """Before/after of the demo: accuracy, MACs, params, measured latency."""
    t = Table(title=f"sgcompress demo: {s['model']['arch']} on {s['data']['name']} "
                    f"(test set, {s['data']['test_images']} images)")
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    p = s["pruning"]
    t.add_row("test top-1 accuracy", pct(s["test_before"]["top1"]),
              pct((s.get("test_after_finetuning") or s["test_after_pruning"])["top1"]))
    t.add_row("  right after pruning (BatchNorm re-estimated)", "", pct(s["test_after_pruning"]["top1"]))
    t.add_row("MACs per image", macs(p["original"]["macs"]), macs(p["compressed"]["macs"]))
    t.add_row("params (non-zero)", count(p["original"]["params"]), count(p["compressed"]["params_effective"]))
    tuned = (s.get("export") or {}).get("strategy_batch_size")
    for lat in (s.get("export") or {}).get("latency", []):
        rows = {r["model"]: r for r in lat["rows"]}
        if "compact" in rows:
            note = "" if tuned in (None, lat["batch_size"]) else f"; layers chosen for batch {tuned}"
            t.add_row(f"latency, batch {lat['batch_size']} (measured{note})", f"{rows['dense']['median_ms']:.2f} ms",
                      f"{rows['compact']['median_ms']:.2f} ms ({rows['compact']['speedup']:.2f}x)")
    return t


def export_tables(r: dict[str, Any]) -> list[Table]:
    """The compact export: per-layer form and measured time, then whole-model latency."""
    t = Table(title=f"Per layer: measured forward time of the dense conv and of the form kept "
                    f"(batch {r.get('strategy_batch_size', '?')})")
    for col in ("layer", "form kept", "dense ms", "kept ms", "measured speedup", "MACs allow", ""):
        t.add_column(col, justify="left" if col in ("layer", "form kept", "") else "right",
                     overflow="fold" if col == "layer" else "ellipsis")
    for name, c in (r.get("layers") or {}).items():
        dense, kept, sp, allow = c.get("dense_ms"), c.get("kept_ms"), c.get("speedup"), c.get("macs_speedup")
        flag = "below 70 %" if sp is not None and allow and sp < 0.7 * allow else ""
        t.add_row(name, c.get("strategy", ""), f"{dense:.3f}" if dense else "", f"{kept:.3f}" if kept else "",
                  f"{sp:.2f}x" if sp is not None else "not measured", f"{allow:.2f}x" if allow else "", flag)
    return [t, *latency_tables(r.get("latency", []))]
