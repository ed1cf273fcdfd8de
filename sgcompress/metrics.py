"""What a model costs: MACs (fvcore), parameters, file sizes and measured latency.

Units: a MAC is one multiply-accumulate; FLOPs = 2 x MACs. fvcore (like thop and
ptflops) counts one multiply-add as one "flop", i.e. it reports MACs; we call them MACs.

fvcore computes a conv's cost from its weight shape, so a masked layer would be counted
at its dense cost. For every MaskedConv2d/MaskedLinear we scale fvcore's count of that
module by the layer's mask density, which is exact: a conv's MACs are
``positions x sum(mask) x kh x kw``.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .layers import MASKED_TYPES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MacsCount:
    total: int  # MACs per image, masked layers counted at their kept connections
    by_layer: dict[str, int]  # leaf modules fvcore counted (masked ones corrected)
    unsupported_ops: dict[str, int]  # op -> count that fvcore skipped (not counted)

    @property
    def flops(self) -> int:
        return 2 * self.total


def count_macs(model: nn.Module, input_shape: tuple[int, ...], op_handles: dict | None = None) -> MacsCount:
    """MACs for one image of ``input_shape`` (C,H,W), by fvcore with masked layers corrected.

    ``op_handles`` adds fvcore handles for custom operators (``{"ns::op": handle}``)."""
    with warnings.catch_warnings():  # fvcore's import calls the deprecated torch.jit.script
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, *input_shape, device=device)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            fca = FlopCountAnalysis(model, (x,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            fca.tracer_warnings("none")
            if op_handles:
                fca.set_op_handle(**op_handles)
            total = int(fca.total())
            by_module = fca.by_module()
            unsupported = dict(fca.unsupported_ops())
    finally:
        model.train(was_training)
    leaves = {n for n, m in model.named_modules() if n and not list(m.children())}
    by_layer: dict[str, int] = {}
    for name, mod in model.named_modules():
        if name in leaves or isinstance(mod, MASKED_TYPES):
            dense = int(by_module.get(name, 0))
            if isinstance(mod, MASKED_TYPES):
                kept = int(round(dense * float(mod.connection_mask.double().mean())))
                total -= dense - kept
                dense = kept
            if dense:
                by_layer[name] = dense
    return MacsCount(total, by_layer, unsupported)


@dataclass(frozen=True)
class ParamCount:
    total: int  # parameters stored (dense shapes)
    effective: int  # parameters that are not pruned connections
    by_layer: dict[str, tuple[int, int]]  # leaf name -> (stored, effective)


def count_params(model: nn.Module) -> ParamCount:
    """Stored and effective (non-pruned) parameters; shared tensors are counted once."""
    seen: set[int] = set()
    total = effective = 0
    by_layer: dict[str, tuple[int, int]] = {}
    for name, mod in model.named_modules():
        stored = eff = 0
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            stored += p.numel()
            eff += p.numel()
        if isinstance(mod, MASKED_TYPES) and stored:
            per_connection = mod.weight[0, 0].numel()
            eff -= int((mod.connection_mask == 0).sum()) * per_connection
        if stored:
            by_layer[name] = (stored, eff)
        total += stored
        effective += eff
    return ParamCount(total, effective, by_layer)


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p10_ms: float
    p90_ms: float
    batch_size: int
    threads: int
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def num_threads(n: int | None):
    """Temporarily fix torch's intra-op thread count."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def time_interleaved(calls: Mapping[str, Callable[[], object]], *, warmup: int = 0, repeats: int = 1,
                     min_seconds: float = 0.0, times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Wall-clock seconds of each call, interleaved: ``warmup`` untimed rounds, then rounds
    that run every call once, at least ``repeats`` of them and on until each call has been
    timed for ``min_seconds``. A slow spell of the machine (other processes, clock changes)
    hits all calls alike, so their ratios stay fair. Samples are appended to ``times`` when
    given (to measure some calls again). Each call synchronises its own device."""
    times = times if times is not None else {}
    for name in calls:
        times.setdefault(name, [])
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    spent = dict.fromkeys(calls, 0.0)
    rounds = 0
    while rounds < repeats or min(spent.values()) < min_seconds:
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times[name].append(dt)
            spent[name] += dt
        rounds += 1
    return times


def synced_call(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """``module(x)``, waiting for the device to finish (CUDA runs asynchronously)."""
    if x.device.type == "cuda":
        return lambda: (module(x), torch.cuda.synchronize(x.device))
    return lambda: module(x)


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch_size: int = 1,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
    min_seconds: float = 0.0,
) -> Latency:
    """Wall-clock time of one forward pass: warm-up, then the median of ``repeats`` runs.

    Runs in eval mode under ``torch.inference_mode`` with a fixed thread count; on CUDA it
    synchronises around every run. ``min_seconds`` keeps repeating (beyond ``repeats``)
    until that much time was measured, which steadies fast models.
    """
    return measure_latencies({"model": model}, input_shape, batch_size=batch_size, threads=threads,
                             warmup=warmup, repeats=repeats, min_seconds=min_seconds)["model"]


def measure_latencies(
    models: dict[str, nn.Module],
    input_shape: tuple[int, ...],
    *,
    batch_size: int = 1,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
    min_seconds: float = 0.0,
) -> dict[str, Latency]:
    """:func:`measure_latency` of several models, interleaved: every round runs each model
    once, so a slow spell of the machine (other processes, clock changes) hits them all
    alike and their ratios stay fair. Rounds continue past ``repeats`` until every model
    has been timed for ``min_seconds``."""
    states = {name: m.training for name, m in models.items()}
    x_cpu = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0))
    calls = {}
    for name, m in models.items():
        param = next(m.parameters(), None)
        calls[name] = synced_call(m, x_cpu.to(param.device if param is not None else "cpu"))
    try:
        with num_threads(threads), torch.inference_mode():
            for m in models.values():
                m.eval()
            times = time_interleaved(calls, warmup=warmup, repeats=repeats, min_seconds=min_seconds)
            used = torch.get_num_threads()
    finally:
        for name, m in models.items():
            m.train(states[name])
    out = {}
    for name, t in times.items():
        t.sort()
        q = statistics.quantiles(t, n=10) if len(t) >= 2 else [t[0]] * 9
        out[name] = Latency(statistics.median(t) * 1e3, q[0] * 1e3, q[-1] * 1e3, batch_size, used, len(t))
    return out
