"""Per-layer and whole-model timings of compact SG-CNN layers on torchvision ResNet-50.

Random weights; masks made the SG-CNN way (sgcnn.prune_step, cp 0.1 .. ratio, re-clustering
every step, k-means n_init=3 for speed); stem conv and 1x1 downsample convs stay dense.
For every (groups, batch) it materialises the compact model (fastest measured strategy
per layer, dense always a candidate), checks it against the masked model, then times
the whole models back to back (interleaved rounds, median).

    PYTHONPATH=. .venv/bin/python benchmarks/layer_strategies.py --groups 4 --batch 1 --batch 32 \
        --threads 2 --out benchmarks/results/resnet50_g4.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

from sgcompress.compact import ensure_kernel, kernel_status, materialize, max_rel_error
from sgcompress.layers import MaskedConv2d
from sgcompress.metrics import time_interleaved
from sgcompress.plan import CompressionPlan, LayerPlan, blocks_from_mask
from sgcompress.sgcnn import prune_step
from sgcompress.surgery import apply_plan, strip_masks, to_masked


def targets(model) -> list[str]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups == 1 and name != "conv1" and "downsample" not in name:
            out.append(name)
        elif isinstance(m, torch.nn.Linear):
            out.append(name)
    return out


def make_plan(model, ratio: float, fc_ratio: float, groups: int, seed: int) -> CompressionPlan:
    names = targets(model)
    to_masked(model, names)
    steps = [round(0.1 * s, 2) for s in range(1, int(round(ratio * 10)) + 1)]
    layers = []
    for name in names:
        m = model.get_submodule(name)
        mask, labels = m.connection_mask.clone(), None
        cap = ratio if isinstance(m, MaskedConv2d) else fc_ratio
        for cp in steps:
            if cp > cap + 1e-9:
                break
            res = prune_step(m.weight.detach(), mask, groups, cp, seed=seed, n_init=3, max_iter=100)
            mask, labels = res.mask, res.labels
        m.set_mask(mask)
        conv = isinstance(m, MaskedConv2d)
        layers.append(LayerPlan(
            name=name, kind="conv" if conv else "linear", in_channels=mask.shape[1], out_channels=mask.shape[0],
            kernel_size=tuple(m.kernel_size) if conv else (1, 1), stride=tuple(m.stride) if conv else (1, 1),
            padding=tuple(m.padding) if conv else (0, 0), dilation=tuple(m.dilation) if conv else (1, 1),
            n_clusters=groups, ratio=cap, labels=tuple(int(x) for x in labels), blocks=blocks_from_mask(mask)))
    return CompressionPlan(method="sgcnn", layers=tuple(layers), settings={"ratio": ratio, "groups": groups})


def interleaved(fns: dict, x, repeats: int, warmup: int = 1) -> tuple[dict[str, float], dict[str, float]]:
    """(median, min) seconds per model on ``x``, timed round by round."""
    with torch.no_grad():
        ts = time_interleaved({k: (lambda f=f: f(x)) for k, f in fns.items()}, warmup=warmup, repeats=repeats)
    return {k: statistics.median(v) for k, v in ts.items()}, {k: min(v) for k, v in ts.items()}


def body_macs(model, plan: CompressionPlan, shape) -> tuple[int, int]:
    """(dense MACs, compact MACs) of the pruned layers; compact = kept connections only."""
    outs = {}
    def hook(name):
        def f(m, a, o):
            outs[name] = tuple(o.shape)
        return f
    hooks = [model.get_submodule(lp.name).register_forward_hook(hook(lp.name)) for lp in plan.layers]
    with torch.no_grad():
        model(torch.zeros(shape))
    for h in hooks:
        h.remove()
    dense = kept = 0
    for lp in plan.layers:
        o = outs[lp.name]
        px = o[2] * o[3] if len(o) == 4 else 1
        kk = lp.kernel_size[0] * lp.kernel_size[1]
        dense += lp.n_connections * kk * px
        kept += lp.kept_connections * kk * px
    return dense, kept


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="per-layer timing rounds")
    ap.add_argument("--model-repeats", type=int, default=9, help="whole-model timing rounds")
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plan-cache", type=Path, default=None, help="reuse/save the plan JSON here")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    batches = args.batch or [1, 32]
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    base = torchvision.models.resnet50(weights=None).eval()
    masked = torchvision.models.resnet50(weights=None).eval()
    masked.load_state_dict(base.state_dict())
    t0 = time.time()
    if args.plan_cache and args.plan_cache.exists():
        plan = CompressionPlan.from_json(args.plan_cache.read_text())
        apply_plan(masked, plan)
    else:
        plan = make_plan(masked, args.ratio, min(args.ratio, 0.6), args.groups, args.seed)
        if args.plan_cache:
            args.plan_cache.parent.mkdir(parents=True, exist_ok=True)
            args.plan_cache.write_text(plan.to_json())
    ensure_kernel()
    print(f"plan: {len(plan.layers)} layers, {time.time() - t0:.0f}s; kernel: {kernel_status()}", flush=True)
    blocks = [len(lp.blocks) for lp in plan.layers]
    print(f"blocks per layer: min {min(blocks)} median {statistics.median(blocks)} max {max(blocks)}", flush=True)
    dense_model = strip_masks(__import__("copy").deepcopy(masked)).eval()
    shape1 = (1, 3, args.res, args.res)
    d_macs, k_macs = body_macs(dense_model, plan, shape1)
    result = {"groups": args.groups, "ratio": args.ratio, "threads": args.threads, "res": args.res,
              "torch": torch.__version__, "kernel": kernel_status(), "argv": sys.argv,
              "pruned_layer_macs": {"dense": d_macs, "kept": k_macs}, "runs": []}
    for bs in batches:
        x = torch.randn(bs, 3, args.res, args.res)
        t0 = time.time()
        compact, choices = materialize(masked, x, threads=args.threads, plan=plan, repeats=args.repeats)
        t_mat = time.time() - t0
        with torch.no_grad():
            ref = masked(x)
            err = max_rel_error(ref, compact(x))
        cl_model = __import__("copy").deepcopy(dense_model).to(memory_format=torch.channels_last)
        dense_cl = lambda z: cl_model(z.contiguous(memory_format=torch.channels_last))  # noqa: E731
        times, mins = interleaved({"dense": dense_model, "dense_channels_last": dense_cl, "compact": compact},
                                  x, args.model_repeats)
        counts: dict[str, int] = {}
        for c in choices.values():
            counts[c["strategy"]] = counts.get(c["strategy"], 0) + 1
        run = {"batch": bs, "materialize_s": t_mat, "max_rel_error": err, "model_seconds": times,
               "model_seconds_min": mins,
               "speedup_vs_dense": times["dense"] / times["compact"],
               "speedup_vs_best_dense": min(times["dense"], times["dense_channels_last"]) / times["compact"],
               "strategy_counts": counts, "layers": choices}
        result["runs"].append(run)
        print(f"\n== ResNet-50, groups {args.groups}, ratio {args.ratio}, batch {bs}, threads {args.threads} ==")
        print(f"{'layer':28s} {'chosen':34s} {'dense ms':>9s} {'best ms':>9s} {'speedup':>8s}")
        for name, c in choices.items():
            secs = c["seconds"]
            if not secs:
                continue
            best = min(secs.values())
            print(f"{name:28s} {min(secs, key=secs.get)[:34]:34s} {secs['dense'] * 1e3:9.2f} {best * 1e3:9.2f} "
                  f"{secs['dense'] / best:8.2f}")
        print(f"strategies: {counts}; materialize {t_mat:.0f}s; max rel error {err:.1e}")
        print(f"whole model: dense {times['dense'] * 1e3:.1f} ms, dense channels_last "
              f"{times['dense_channels_last'] * 1e3:.1f} ms, compact {times['compact'] * 1e3:.1f} ms -> "
              f"{run['speedup_vs_dense']:.2f}x vs dense (NCHW), {run['speedup_vs_best_dense']:.2f}x vs best dense",
              flush=True)
        print(f"  (min of rounds: dense {mins['dense'] * 1e3:.1f}, channels_last {mins['dense_channels_last'] * 1e3:.1f}, "
              f"compact {mins['compact'] * 1e3:.1f} ms)", flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
    print(f"pruned layers MACs: dense {d_macs / 1e9:.2f} G, kept {k_macs / 1e9:.2f} G (per image)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
