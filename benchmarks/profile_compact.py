"""Where a forward pass spends its time: dense vs compact ResNet-50 (random weights, SG-CNN).

    PYTHONPATH=. .venv/bin/python benchmarks/profile_compact.py [--batch 1] [--groups 4] [--ratio 0.6]

The compact model is exported for the same batch (every layer's forms measured at that
batch). Prints torch.profiler tables: self CPU time by operator over ``--passes`` forward
passes of each model, divided by the number of passes.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from _resnet50 import SHAPE, dense_and_compact


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--passes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, compact, _ = dense_and_compact(args.groups, args.ratio, args.batch, args.threads)
    x = torch.randn(args.batch, *SHAPE)
    for name, model in (("dense", base), ("compact", compact)):
        with torch.inference_mode():
            for _ in range(3):
                model(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.passes):
                    model(x)
        print(f"===== {name}, batch {args.batch}, {args.threads} threads, {args.passes} passes "
              f"(divide the totals by {args.passes})")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
