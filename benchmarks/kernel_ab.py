"""Whole-model A/B, in one process, of the native kernel against its source at another git revision.

    PYTHONPATH=. .venv/bin/python benchmarks/kernel_ab.py --against REV [--batch 1] [--rounds 30] \
        [--groups 4] [--ratio 0.6] [--old-first] [--out FILE]

ResNet-50 (seeded random weights) pruned with SG-CNN and exported with the kernel form in every
pruned layer (``--strategy kernel``, no measuring, so both models have the same layers). The
kernel source of ``REV`` (``sgcompress/compact/_kernel_src.py`` and, where it exists,
``_kernel_tiles.py`` at that revision) is built under another op name (``sgab::gconv``)
and a copy of the compact model calls it; the dense model, the compact model ("new": the
working tree's kernel) and the copy ("old") are timed interleaved, one pass each per round. Separate processes differ by more than the change
under test on these machines, so a change to the kernel is judged by this same-process
ratio, run in both orders (``--old-first`` swaps which of the two runs right after the dense
model). Each line also gives the core-to-core round trip before and after the timing
(``_cores.py``: about 95 ns with both threads on one die, 420 ns on two), since the two
cases differ by a third at batch 1. Both models' outputs are compared (max abs difference).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cores import core_to_core_ns  # noqa: E402
from _resnet50 import SHAPE, dense_and_compact  # noqa: E402
from sgcompress.compact.kernel import SCHEMA, ensure_kernel  # noqa: E402
from sgcompress.compact.modules import KernelConv  # noqa: E402
from sgcompress.metrics import time_interleaved  # noqa: E402

REGISTRATION = 'TORCH_LIBRARY_IMPL(sgcompress, CPU, m) { m.impl("gconv", &sg_gconv); }'


def build_other(rev: str) -> str:
    """Build the kernel source of git revision ``rev`` as ``sgab::gconv``; returns the short hash."""
    root = Path(__file__).resolve().parent.parent
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=root, check=True, capture_output=True,
                         text=True).stdout.strip()
    # the kernel's source files at that revision, imported as a package of their own (later
    # revisions keep the register tiles in _kernel_tiles.py, which _kernel_src.py imports)
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / f"sgab_src_{sha}"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        for name in ("_kernel_src.py", "_kernel_tiles.py"):
            shown = subprocess.run(["git", "show", f"{sha}:sgcompress/compact/{name}"], cwd=root,
                                   capture_output=True, text=True)
            if shown.returncode == 0:
                (pkg / name).write_text(shown.stdout)
        sys.path.insert(0, tmp)
        try:
            src = importlib.import_module(f"{pkg.name}._kernel_src").KERNEL_SOURCE
        finally:
            sys.path.remove(tmp)
    if REGISTRATION not in src:
        raise SystemExit(f"error: {sha}'s kernel source does not register sgcompress::gconv as expected")
    # the exported names of that source, renamed so that neither library can bind the other's
    for name in ("sg_gconv", "staging_buffer", "panel_buffer"):
        src = src.replace(name, f"{name}_ab")
    src = src.replace(REGISTRATION.replace("sg_gconv", "sg_gconv_ab"),
                      f'TORCH_LIBRARY(sgab, m) {{ m.def("{SCHEMA}"); m.impl("gconv", &sg_gconv_ab); }}')
    from torch.utils.cpp_extension import load_inline

    load_inline(name="sgab_" + hashlib.sha1(src.encode()).hexdigest()[:10], cpp_sources=[src],
                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                is_python_module=False)
    return sha


def _forward_other(self: KernelConv, x: torch.Tensor) -> torch.Tensor:
    b = self.bias if self.bias is not None else self.no_bias
    return torch.ops.sgab.gconv(x, self.weight, self.tile_out, self.tile_k, self.tile_w, self.tile_r, self.kidx, b,
                                self.out_channels, self.kh, self.kw, self.dh, self.dw, self.sh, self.sw,
                                self.ph, self.pw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", required=True, help="git revision whose kernel source is the 'old' side")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--old-first", action="store_true", help="time the old kernel right after the dense model")
    ap.add_argument("--out", type=Path, help="append one JSON line here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not ensure_kernel():
        raise SystemExit("error: the native kernel could not be built here (see sgcompress.compact.kernel_status())")
    sha = build_other(args.against)
    dense, new, _ = dense_and_compact(args.groups, args.ratio, args.batch, args.threads, "kernel")
    old = copy.deepcopy(new)
    n = 0
    for m in old.modules():
        if isinstance(m, KernelConv):
            m.forward = types.MethodType(_forward_other, m)
            n += 1
    x = torch.randn(args.batch, *SHAPE)
    with torch.inference_mode():
        diff = (new(x) - old(x)).abs().max().item()
        calls = {"dense": lambda: dense(x), "new": lambda: new(x), "old": lambda: old(x)}
        if args.old_first:
            calls = {"dense": calls["dense"], "old": calls["old"], "new": calls["new"]}
        c2c = [core_to_core_ns()]
        t = time_interleaved(calls, warmup=3, repeats=args.rounds)
        c2c.append(core_to_core_ns())
    ms = {k: statistics.median(v) * 1e3 for k, v in t.items()}
    row = {"against": sha, "batch": args.batch, "groups": args.groups, "ratio": args.ratio, "threads": args.threads,
           "rounds": args.rounds, "order": "old first" if args.old_first else "new first", "kernel_layers": n,
           "ms": ms, "old_over_new": ms["old"] / ms["new"], "max_abs_diff": diff, "core_to_core_ns": c2c}
    c2c_s = "/".join(f"{v:.0f}" if v is not None else "?" for v in c2c)
    print(f"batch {args.batch}, {n} kernel layers, {row['order']}: dense {ms['dense']:.1f} ms | "
          f"new {ms['new']:.1f} ms ({ms['dense'] / ms['new']:.2f}x) | {sha} {ms['old']:.1f} ms "
          f"({ms['dense'] / ms['old']:.2f}x) | old/new {row['old_over_new']:.3f} | max abs diff {diff:.1e} | "
          f"core-to-core {c2c_s} ns")
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
