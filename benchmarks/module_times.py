"""Time of every module inside a whole forward pass: dense vs compact ResNet-50 (random weights, SG-CNN).

    PYTHONPATH=. .venv/bin/python benchmarks/module_times.py [--batch 32] [--groups 4] [--ratio 0.6] \
        [--strategy kernel] [--layers]

Forward hooks take the wall-clock time of each leaf module (the CPU runs synchronously); the
models alternate, two rounds of three passes each, medians. Prints the totals by module
kind (pruned convs, unpruned convs, BatchNorm, ...) and, with ``--layers``, every conv.
``--strategy kernel`` (default) exports every pruned layer in the kernel form without
measuring; ``auto`` measures each layer as ``sgcompress export`` does.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from _resnet50 import SHAPE, dense_and_compact


def module_times(model: torch.nn.Module, x: torch.Tensor, passes: int) -> tuple[dict[str, float], float]:
    """(median seconds per leaf module, median seconds per pass) over ``passes`` after one warm-up."""
    acc: dict[str, list[float]] = collections.defaultdict(list)
    start: dict[str, float] = {}
    hooks = []
    for name, m in model.named_modules():
        if not list(m.children()):
            hooks.append(m.register_forward_pre_hook(lambda m, a, n=name: start.__setitem__(n, time.perf_counter())))
            hooks.append(m.register_forward_hook(
                lambda m, a, o, n=name: acc[n].append(time.perf_counter() - start[n])))
    total = []
    try:
        with torch.inference_mode():
            for _ in range(passes + 1):
                t0 = time.perf_counter()
                model(x)
                total.append(time.perf_counter() - t0)
    finally:
        for h in hooks:
            h.remove()
    return {k: statistics.median(v[1:]) for k, v in acc.items()}, statistics.median(total[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--strategy", default="kernel")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--layers", action="store_true", help="print every conv as well")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, compact, plan = dense_and_compact(args.groups, args.ratio, args.batch, args.threads, args.strategy)
    x = torch.randn(args.batch, *SHAPE)
    runs: dict[str, list] = {"dense": [], "compact": []}
    for _ in range(2):
        for name, model in (("dense", base), ("compact", compact)):
            runs[name].append(module_times(model, x, args.passes))

    def merged(name):
        per = {k: statistics.median(r[0][k] for r in runs[name]) for k in runs[name][0][0]}
        return per, statistics.median(r[1] for r in runs[name])

    (d, dt), (c, ct) = merged("dense"), merged("compact")
    kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for k in d:
        kind = type(base.get_submodule(k)).__name__
        if kind == "Conv2d":
            kind = "pruned conv" if k in {lp.name for lp in plan.layers} else "unpruned conv"
        kinds[kind][0] += d[k]
        kinds[kind][1] += c[k]
    print(f"ResNet-50, {round(100 * args.ratio)} % removed, {args.groups} groups, batch {args.batch}, "
          f"{args.threads} threads, compact forms: {args.strategy}")
    print(f"whole forward pass: dense {dt * 1e3:.1f} ms, compact {ct * 1e3:.1f} ms ({dt / ct:.2f}x)")
    for kind, (a, b) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        print(f"  {kind:18s} dense {a * 1e3:8.1f} ms  compact {b * 1e3:8.1f} ms  ({a / b if b else float('nan'):.2f}x)")
    if args.layers:
        for k in d:
            if isinstance(base.get_submodule(k), torch.nn.Conv2d):
                print(f"    {k:24s} {d[k] * 1e3:7.2f} {c[k] * 1e3:7.2f} ms  {d[k] / c[k]:5.2f}x")


if __name__ == "__main__":
    main()
