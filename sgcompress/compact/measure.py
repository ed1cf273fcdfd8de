"""Measure compact strategies per layer and materialise the fastest compact model.

Timings interleave the candidates round by round (so load from other processes hits
them alike) and keep the median; ``dense`` is always a candidate, so no layer ends up
slower than its dense conv by our own measurement.
"""

from __future__ import annotations

import copy
import logging
import statistics
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import MASKED_TYPES
from ..metrics import num_threads, synced_call, time_interleaved
from ..plan import CompressionPlan, LayerPlan
from ..surgery import set_submodule
from .factory import (
    CONV_STRATEGIES,
    LINEAR_STRATEGIES,
    applicable,
    build_compact,
    compact_from_masked,
    default_candidates,
    plan_from_masked,
    strategy_key,
)

log = logging.getLogger(__name__)

REL_TOL = 1e-4  # max |compact - masked| <= REL_TOL * max |masked|
CLOSE = 0.85  # a compact form within this factor of dense is re-measured before it is chosen


def _candidates(lp: LayerPlan, strategies, device_type: str = "cpu") -> list[tuple[str, dict[str, Any]]]:
    if strategies is None:
        cands = default_candidates(lp, device_type)
    else:
        cands = []
        for s in strategies:
            strat, opts = (s, {}) if isinstance(s, str) else (s[0], dict(s[1]))
            if strat not in CONV_STRATEGIES + LINEAR_STRATEGIES:
                raise ConfigError(f"unknown compact strategy {strat!r}; use one of "
                                  f"{', '.join(sorted(set(CONV_STRATEGIES + LINEAR_STRATEGIES)))}")
            if applicable(lp, strat, device_type):
                cands.append((strat, opts))
    if not any(s == "dense" for s, _ in cands):
        cands.insert(0, ("dense", {}))
    return cands


def max_rel_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach(), out.detach()
    scale = float(ref.abs().max())
    return float((ref - out).abs().max()) / (scale if scale > 0 else 1.0)


@torch.no_grad()
def measure_layer(masked_layer: nn.Module, layer_plan: LayerPlan, example_input: torch.Tensor, *,
                  threads: int | None = None, repeats: int = 7, warmup: int = 2, strategies=None,
                  _modules_out: dict | None = None) -> dict[str, float]:
    """Median seconds of one forward, per strategy key (always including ``"dense"``).

    ``strategies``: ``None`` (the default candidates) or a list of strategy names or
    ``(strategy, options)`` pairs. A candidate whose output differs from the masked layer
    (beyond ``REL_TOL``) is dropped with a warning.
    """
    x = example_input
    ref = masked_layer(x)
    modules: dict[str, nn.Module] = {}
    for strat, opts in _candidates(layer_plan, strategies, x.device.type):
        key = strategy_key(strat, opts)
        try:
            mod = compact_from_masked(masked_layer, layer_plan, strat, opts).eval()
            err = max_rel_error(ref, mod(x))
        except Exception as e:  # a strategy that cannot handle this layer is simply not a candidate
            log.warning("layer %s: strategy %s failed: %s", layer_plan.name, key, e)
            continue
        if err > REL_TOL:
            log.warning("layer %s: strategy %s differs from the masked layer (rel. error %.2e); dropped",
                        layer_plan.name, key, err)
            continue
        modules[key] = mod
    calls = {k: synced_call(m, x) for k, m in modules.items()}
    with num_threads(threads):
        times = time_interleaved(calls, warmup=warmup, repeats=repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = min(med, key=med.get)
        if best != "dense" and "dense" in med and med[best] > CLOSE * med["dense"]:
            # close call: measure the two again, back to back, and decide on all samples
            time_interleaved({"dense": calls["dense"], best: calls[best]}, warmup=1, repeats=2 * repeats,
                             times=times)
    if _modules_out is not None:
        _modules_out.update(modules)
    return {k: statistics.median(v) for k, v in times.items()}


def _layer_plans(model: nn.Module, plan) -> dict[str, LayerPlan]:
    """Name -> LayerPlan for every masked layer; structure from the mask, labels from ``plan``."""
    given: dict[str, LayerPlan] = {}
    if isinstance(plan, CompressionPlan):
        given = {lp.name: lp for lp in plan.layers}
    elif isinstance(plan, Mapping):
        given = dict(plan)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, MASKED_TYPES):
            lp = given.get(name)
            out[name] = plan_from_masked(name, m, labels=lp.labels if lp else (),
                                         n_clusters=lp.n_clusters if lp else 0)
    return out


def _record_inputs(model: nn.Module, names, example_input: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def hook(name: str):
        def record(module, args) -> None:  # returns None: the input is left alone
            shapes.setdefault(name, tuple(args[0].shape))
        return record

    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return shapes


def materialize(model: nn.Module, example_input: torch.Tensor, *, threads: int | None = None,
                batch_size: int | None = None, choices: Mapping[str, Mapping[str, Any]] | None = None,
                strategies=None, plan=None, repeats: int = 5,
                progress: Callable[[str, int, int, dict], None] | None = None) -> tuple[nn.Module, dict]:
    """Replace every masked layer of a deep copy of ``model`` by its fastest compact form.

    Each layer is measured at the input shape it sees when ``model`` runs on
    ``example_input`` (repeated along dim 0 to ``batch_size`` when given). Layers named in
    ``choices`` are built as chosen there without measuring. Returns the compact model (eval
    mode) and ``choices``: ``{layer: {"strategy", "options", "seconds": {key: s}}}``, plain
    JSON data that :func:`rebuild` turns into the same model again.
    """
    src = copy.deepcopy(model).eval()
    x = example_input
    if batch_size is not None and x.shape[0] != batch_size:
        reps = -(-batch_size // x.shape[0])
        x = x.repeat(reps, *([1] * (x.dim() - 1)))[:batch_size]
    plans = _layer_plans(src, plan)
    shapes = _record_inputs(src, list(plans), x)
    out_model = copy.deepcopy(src)
    result: dict[str, dict[str, Any]] = {}
    total = len(plans)
    gen = torch.Generator().manual_seed(0)
    for i, (name, lp) in enumerate(plans.items()):
        masked = src.get_submodule(name)
        if choices is not None and name in choices:
            c = choices[name]
            chosen = {"strategy": c["strategy"], "options": dict(c.get("options", {})),
                      "seconds": dict(c.get("seconds", {}))}
        elif name not in shapes:
            log.warning("layer %s never ran on the example input; left dense", name)
            chosen = {"strategy": "dense", "options": {}, "seconds": {}}
        else:
            xi = torch.randn(shapes[name], generator=gen, dtype=masked.weight.dtype).to(masked.weight.device)
            built: dict[str, nn.Module] = {}
            secs = measure_layer(masked, lp, xi, threads=threads, repeats=repeats, strategies=strategies,
                                 _modules_out=built)
            best = min(secs, key=secs.get)
            strat, opts = next((s, o) for s, o in _candidates(lp, strategies, xi.device.type)
                               if strategy_key(s, o) == best)
            chosen = {"strategy": strat, "options": opts, "seconds": {k: float(v) for k, v in secs.items()}}
        module = compact_from_masked(masked, lp, chosen["strategy"], chosen["options"]).eval()
        set_submodule(out_model, name, module)
        result[name] = chosen
        if progress is not None:
            progress(name, i, total, chosen)
    return out_model.eval(), result


@torch.no_grad()
def rebuild(model: nn.Module, choices: Mapping[str, Mapping[str, Any]], plan=None) -> nn.Module:
    """The compact model described by ``choices`` (from :func:`materialize`), without measuring.

    ``model`` may hold masked layers (weights are copied; ``plan`` optional, it only
    supplies k-means labels) or, for loading saved compact weights, any model whose named
    layers have the original geometry (e.g. the original architecture): then ``plan``
    (a ``CompressionPlan`` or ``{name: LayerPlan}``) is required, the layers are built
    empty and the caller loads the compact state_dict.
    """
    out = copy.deepcopy(model)
    given: dict[str, LayerPlan] = {}
    if isinstance(plan, CompressionPlan):
        given = {lp.name: lp for lp in plan.layers}
    elif isinstance(plan, Mapping):
        given = dict(plan)
    for name, c in choices.items():
        layer = out.get_submodule(name)
        strat, opts = c["strategy"], dict(c.get("options", {}))
        if isinstance(layer, MASKED_TYPES):
            base = given.get(name)
            lp = plan_from_masked(name, layer, labels=base.labels if base else (),
                                  n_clusters=base.n_clusters if base else 0)
            new = compact_from_masked(layer, lp, strat, opts)
        else:
            if name not in given:
                raise ConfigError(f"layer {name!r} is not masked and the plan has no entry for it; "
                                  "pass the plan the model was compressed with")
            bias = getattr(layer, "bias", None) is not None
            new = build_compact(given[name], strat, opts, bias).to(next(layer.parameters()).device)
        set_submodule(out, name, new)
    return out.eval()
