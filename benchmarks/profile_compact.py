"""Where a forward pass spends its time: dense vs compact ResNet-50 (random weights, SG-CNN).

    PYTHONPATH=. .venv/bin/python benchmarks/profile_compact.py [--batch 1] [--groups 4] [--ratio 0.6]

The compact model is exported for the same batch (every layer's forms measured at that
batch). Prints torch.profiler tables: self CPU time by operator over ``--passes`` forward
passes of each model, divided by the number of passes.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile

from sgcompress.artifact import make_manifest, save_artifact
from sgcompress.config import PruneConfig
from sgcompress.export import export_compact
from sgcompress.loading import ModelSpec
from sgcompress.pipeline import prune_model

SHAPE = (3, 224, 224)


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
    torch.manual_seed(0)
    base = torchvision.models.resnet50().eval()
    masked = copy.deepcopy(base)
    res = prune_model(masked, SHAPE, PruneConfig(groups=args.groups, ratio=args.ratio))
    work = Path(tempfile.mkdtemp())
    spec = ModelSpec("torchvision:resnet50", {}, 1000, SHAPE)
    save_artifact(work / "a", masked, res.plan, make_manifest(spec, stage="pruned", settings={}, source=None),
                  res.report)
    exp = export_compact(work / "a", None, batch_size=args.batch, threads=args.threads, measure=False)
    x = torch.randn(args.batch, *SHAPE)
    for name, model in (("dense", base), ("compact", exp.model)):
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
