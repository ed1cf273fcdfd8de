"""CPU latency of dense, masked, sgcompress compact and Torch-Pruning models at equal MACs.

For every (architecture, ratio, groups): torchvision model with seeded random weights,
SG-CNN pruning (stem and shortcuts dense), the compact export chosen for each batch size
(``export_compact(batch_size=B)``), and Torch-Pruning channel pruning (L1 magnitude,
classifier and stem kept) searched to the same total MACs. Latency: warm-up, median of
repeats with the models interleaved round by round, fixed threads, batch 1 and 32. One
JSON line per configuration is appended to ``--out``; configurations already there are
skipped (rerun to resume). With ``--fold-bn`` every model (dense, masked, compact, Torch-Pruning)
has its BatchNorms folded into the convs before them (``sgcompress.fold``); those rows are
marked ``"fold_bn": true``.

    PYTHONPATH=. .venv/bin/python benchmarks/latency.py --archs resnet18 resnet50 densenet121 \
        --ratios 0.6 0.8 --groups 4 16 --batches 1 32 --out benchmarks/results/latency.jsonl
Needs ``pip install torch-pruning`` (only for the comparison column).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cores import core_to_core_ns  # noqa: E402
from sgcompress.artifact import make_manifest, save_artifact  # noqa: E402
from sgcompress.config import PruneConfig  # noqa: E402
from sgcompress.export import export_compact  # noqa: E402
from sgcompress.fold import fold_batchnorm  # noqa: E402
from sgcompress.loading import ModelSpec  # noqa: E402
from sgcompress.metrics import count_macs, measure_latencies  # noqa: E402
from sgcompress.pipeline import prune_model  # noqa: E402

SHAPE = (3, 224, 224)
ALLOCATOR_ENV = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", "THP_MEM_ALLOC_ENABLE")


def torch_pruning_at(model: torch.nn.Module, target_macs: float, tol: float = 0.01):
    """Channel-prune a copy of ``model`` (L1, per-layer uniform ratio) to ~``target_macs``."""
    import torch_pruning as tp

    example = torch.zeros(1, *SHAPE)

    def pruned(ratio: float):
        m = copy.deepcopy(model).eval()
        ignored = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
        first = next(mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d))
        pruner = tp.pruner.MagnitudePruner(m, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=ignored + [first])
        pruner.step()
        return m, count_macs(m, SHAPE).total

    lo, hi, best = 0.0, 0.95, None
    for _ in range(8):
        mid = (lo + hi) / 2
        m, macs = pruned(mid)
        if best is None or abs(macs - target_macs) < abs(best[1] - target_macs):
            best = (m, macs, mid)
        if abs(macs - target_macs) / target_macs < tol:
            break
        lo, hi = (mid, hi) if macs > target_macs else (lo, mid)
    return best


def time_models(models: dict, batch: int, threads: int) -> dict[str, float]:
    """Median ms per model, interleaved round by round (a slow spell hits every model alike)."""
    lats = measure_latencies(models, SHAPE, batch_size=batch, threads=threads, warmup=2, repeats=7, min_seconds=1.5)
    return {name: lat.median_ms for name, lat in lats.items()}


def folded(model: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(model).eval()
    fold_batchnorm(m)
    return m


def run(arch: str, ratio: float, groups: int, batches, threads: int, work: Path, fold_bn: bool = False) -> dict:
    torch.manual_seed(0)
    base = torchvision.models.get_model(arch, weights=None).eval()
    dense_macs = count_macs(base, SHAPE).total
    t0 = time.perf_counter()
    masked = copy.deepcopy(base)
    res = prune_model(masked, SHAPE, PruneConfig(groups=groups, ratio=ratio))
    prune_s = time.perf_counter() - t0
    art = work / f"{arch}-{ratio}-{groups}"
    save_artifact(art, masked, res.plan, make_manifest(ModelSpec(f"torchvision:{arch}", {}, 1000, SHAPE),
                                                      stage="pruned", settings={}, source=None),
                  res.report, overwrite=True)
    eff = res.report["compressed"]["macs"]
    row = {"arch": arch, "ratio": ratio, "groups": groups, "threads": threads, "fold_bn": fold_bn,
           # allocator settings change the page-fault cost of large batches (docs/benchmarks.md)
           "allocator_env": {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ},
           "prune_seconds": prune_s,
           "macs": {"dense": dense_macs, "effective": eff}, "batches": {}}
    tp_model = None
    try:
        tp_model, tp_macs, tp_ratio = torch_pruning_at(base, eff)
        row["macs"]["torch_pruning"] = tp_macs
        row["torch_pruning_channel_ratio"] = tp_ratio
    except ImportError:
        row["torch_pruning"] = "not installed"
    if fold_bn:
        base, masked = folded(base), folded(masked)
        tp_model = folded(tp_model) if tp_model is not None else None
    for b in batches:
        exp = export_compact(art, None, batch_size=b, threads=threads, measure=False, fold_bn=fold_bn)
        row["macs"][f"compact_executed_b{b}"] = exp.report["macs"]["compact_executed"]
        strategies: dict[str, int] = {}
        for c in exp.choices.values():
            strategies[c["strategy"]] = strategies.get(c["strategy"], 0) + 1
        models = {"dense": base, "masked": masked, "compact": exp.model}
        if tp_model is not None:
            models["torch_pruning"] = tp_model
        c2c = [core_to_core_ns()]
        t = time_models(models, b, threads)
        c2c.append(core_to_core_ns())
        row["batches"][str(b)] = {"ms": t, "speedup": {k: t["dense"] / v for k, v in t.items()},
                                  # ~95 ns: both threads on one die; ~420 ns: on two (see _cores.py)
                                  "core_to_core_ns": c2c,
                                  "strategies": strategies,
                                  "max_rel_diff": exp.report["equivalence"]["max_rel_diff"]}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["resnet18", "resnet50", "densenet121"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.6, 0.8])
    ap.add_argument("--groups", nargs="+", type=int, default=[4, 16])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the convs of every model")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/latency.jsonl"))
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["arch"], r["ratio"], r["groups"], r.get("fold_bn", False)))
    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            for ratio in args.ratios:
                for g in args.groups:
                    if (arch, ratio, g, args.fold_bn) in done:
                        continue
                    row = run(arch, ratio, g, args.batches, args.threads, Path(tmp), args.fold_bn)
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    for b, r in row["batches"].items():
                        s = r["speedup"]
                        print(f"{arch} ratio {ratio} g{g}{' BN folded' if args.fold_bn else ''} batch {b}: dense {r['ms']['dense']:.1f} ms | "
                              f"masked {s['masked']:.2f}x | compact {s['compact']:.2f}x | "
                              f"torch-pruning {s.get('torch_pruning', float('nan')):.2f}x | "
                              f"MACs allow {row['macs']['dense'] / row['macs']['effective']:.2f}x | {r['strategies']} | "
                              f"core-to-core {'/'.join(f'{v:.0f}' if v is not None else '?' for v in r['core_to_core_ns'])} ns",
                              flush=True)


if __name__ == "__main__":
    main()
