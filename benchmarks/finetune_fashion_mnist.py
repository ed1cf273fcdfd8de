"""Issue acceptance: the shipped ResNet-20 on Fashion-MNIST, pruned (--groups 4 --ratio 0.6)
and fine-tuned globally for 3 epochs, against the unpruned test accuracy.

Runs the real CLI, exactly as a user would, and prints each command with its figures:

    PYTHONPATH=. .venv/bin/python benchmarks/finetune_fashion_mnist.py --work runs/fmnist
Resumable: a finished stage (its output folder exists) is not run again; an interrupted
fine-tuning continues with --resume.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

DATA = "/usr/share/datasets/fashion-mnist"
REPO = Path(__file__).resolve().parent.parent
ASSET = REPO / "sgcompress" / "assets" / "resnet20_fashion_mnist.safetensors"


def sg(*args: str) -> tuple[str, float]:
    cmd = [sys.executable, "-m", "sgcompress", *args]
    print("$ sgcompress " + " ".join(shlex.quote(a) for a in args), flush=True)
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("runs/fmnist"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.6)
    args = ap.parse_args()
    work = args.work if args.work.is_absolute() else REPO / args.work
    work.mkdir(parents=True, exist_ok=True)
    pruned, tuned = work / "pruned", work / "finetuned"
    results: dict = {}
    out, s = sg("evaluate", str(ASSET), "--arch", "sgcompress:resnet20", "--input-shape", "1,28,28",
                "--num-classes", "10", "--data", DATA, "--json")
    results["unpruned_test"] = json.loads(out)
    print(f"  unpruned test top-1 {100 * results['unpruned_test']['top1']:.2f}% ({s:.0f} s)")
    if not pruned.exists():
        _, s = sg("prune", str(ASSET), "--arch", "sgcompress:resnet20", "--input-shape", "1,28,28", "--groups",
                  str(args.groups), "--ratio", str(args.ratio), "--data", DATA, "-o", str(pruned), "--json")
        results["prune_seconds"] = s
    rep = json.loads((pruned / "report.json").read_text())
    results["macs"] = {"original": rep["original"]["macs"], "pruned": rep["compressed"]["macs"]}
    results["after_pruning_val"] = rep["accuracy"]["after_pruning"]
    out, _ = sg("evaluate", str(pruned), "--data", DATA, "--json")
    results["pruned_test"] = json.loads(out)
    print(f"  after pruning, test top-1 {100 * results['pruned_test']['top1']:.2f}% "
          f"(BatchNorm re-estimated: {100 * results['pruned_test']['with_bn_reestimation']['top1']:.2f}%)")
    if not tuned.exists():
        resume = ["--resume"] if (work / "finetuned.train" / "last.pt").is_file() else []
        _, s = sg("finetune", str(pruned), "--scheme", "global", "--data", DATA, "--epochs", str(args.epochs),
                  "--lr", "0.01", "--schedule", "cosine", "--nesterov", "-o", str(tuned), "--json", *resume)
        results["finetune_seconds"] = s
    out, _ = sg("evaluate", str(tuned), "--data", DATA, "--json")
    results["finetuned_test"] = json.loads(out)
    gap = results["unpruned_test"]["top1"] - results["finetuned_test"]["top1"]
    results["gap_points"] = 100 * gap
    print(f"  fine-tuned ({args.epochs} epochs) test top-1 {100 * results['finetuned_test']['top1']:.2f}%; "
          f"gap to unpruned {100 * gap:.2f} points (target <= 1)")
    print(f"  MACs {results['macs']['original'] / 1e6:.1f} M -> {results['macs']['pruned'] / 1e6:.1f} M per image")
    (work / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
