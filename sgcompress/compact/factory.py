"""Build compact modules from a layer plan: empty (to load a state_dict) or from a masked layer."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedLayerError
from ..layers import MaskedConv2d, MaskedLinear
from ..plan import LayerPlan, blocks_from_mask
from ..surgery import set_submodule
from .modules import GroupedConv, KernelConv, SplitConv, SplitLinear, load_group_weights
from .spec import LayerGeometry, layer_groups

CONV_STRATEGIES = ("dense", "kernel", "split", "grouped")
LINEAR_STRATEGIES = ("dense", "split")


def strategy_key(strategy: str, options: dict[str, Any]) -> str:
    """A stable, readable name for a (strategy, options) pair, e.g. ``kernel[merge=cost,tile=8]``."""
    if not options:
        return strategy
    return strategy + "[" + ",".join(f"{k}={json.dumps(options[k])}" for k in sorted(options)) + "]"


def default_candidates(lp: LayerPlan, device_type: str = "cpu") -> list[tuple[str, dict[str, Any]]]:
    """The (strategy, options) pairs measured for a layer when none are given (on
    ``device_type``: the native kernel is CPU code, so it is a candidate on the CPU only)."""
    g = max(1, int(lp.n_clusters))
    if lp.kind == "linear":
        return [("dense", {}), ("split", {"merge": "labels", "max_groups": g})]
    cands: list[tuple[str, dict[str, Any]]] = [("dense", {})]
    if device_type == "cpu":
        cands += [("kernel", {"merge": "cost", "tile": 8}), ("kernel", {"merge": "labels", "tile": 8})]
        if lp.out_channels < 16 * g:  # small clusters: half-width tiles may beat merging
            cands.append(("kernel", {"merge": "cost", "tile": 4}))
    cands += [("split", {"merge": "labels", "max_groups": g}), ("grouped", {"merge": "labels", "max_groups": g})]
    return cands


def applicable(lp: LayerPlan, strategy: str, device_type: str = "cpu") -> bool:
    if lp.kind == "linear":
        return strategy in LINEAR_STRATEGIES
    if strategy == "kernel":
        return device_type == "cpu"
    return strategy in CONV_STRATEGIES


def build_compact(layer_plan: LayerPlan, strategy: str, options: dict[str, Any] | None, bias: bool) -> nn.Module:
    """A compact module with this layer's structure and uninitialised weights.

    Fill it with ``load_state_dict`` (a state_dict saved from a module built the same way).
    """
    options = dict(options or {})
    lp = layer_plan
    geo = LayerGeometry.of(lp)
    if not applicable(lp, strategy):
        allowed = LINEAR_STRATEGIES if lp.kind == "linear" else CONV_STRATEGIES
        raise ConfigError(f"strategy {strategy!r} does not apply to layer {lp.name!r} "
                          f"({lp.kind}); use one of {', '.join(allowed)}")
    if strategy == "dense":
        if lp.kind == "linear":
            return nn.Linear(lp.in_channels, lp.out_channels, bias=bias)
        return nn.Conv2d(lp.in_channels, lp.out_channels, tuple(lp.kernel_size), stride=tuple(lp.stride),
                         padding=tuple(lp.padding), dilation=tuple(lp.dilation), bias=bias)
    groups = layer_groups(lp, options)
    if lp.kind == "linear":
        return SplitLinear(geo, groups, bias)
    cls = {"kernel": KernelConv, "split": SplitConv, "grouped": GroupedConv}[strategy]
    return cls(geo, groups, bias)


def plan_from_masked(name: str, layer: nn.Module, labels: tuple[int, ...] = (), n_clusters: int = 0) -> LayerPlan:
    """A ``LayerPlan`` describing a masked layer's current mask (blocks from the mask)."""
    if isinstance(layer, MaskedConv2d):
        kind, ks, st, pd, dl = "conv", layer.kernel_size, layer.stride, layer.padding, layer.dilation
        cin, cout = layer.in_channels, layer.out_channels
    elif isinstance(layer, MaskedLinear):
        kind, ks, st, pd, dl = "linear", (1, 1), (1, 1), (0, 0), (1, 1)
        cin, cout = layer.in_features, layer.out_features
    else:
        raise UnsupportedLayerError(f"layer {name!r} ({type(layer).__name__}) is not a masked layer; "
                                    "apply the plan with surgery first")
    if isinstance(pd, str):
        raise UnsupportedLayerError(f"layer {name!r} uses padding={pd!r}; compact modules need numeric padding")
    blocks = blocks_from_mask(layer.connection_mask)
    return LayerPlan(name=name, kind=kind, in_channels=cin, out_channels=cout, kernel_size=tuple(ks),
                     stride=tuple(st), padding=tuple(pd), dilation=tuple(dl), n_clusters=n_clusters,
                     ratio=1.0 - float(layer.connection_mask.mean()), labels=tuple(labels), blocks=blocks)


def _check_matches(masked: nn.Module, lp: LayerPlan) -> None:
    mask = lp.mask().to(masked.connection_mask.device)
    if tuple(mask.shape) != tuple(masked.connection_mask.shape):
        raise ConfigError(f"layer plan {lp.name!r} has shape {tuple(mask.shape)} but the layer has "
                          f"{tuple(masked.connection_mask.shape)}; use the plan the model was pruned with")
    if bool(((masked.connection_mask != 0) & (mask == 0)).any()):
        raise ConfigError(f"layer {lp.name!r} keeps connections its plan prunes; the compact module would "
                          "change the function. Rebuild the plan from the model (plan_from_masked)")


@torch.no_grad()
def compact_from_masked(masked_layer: nn.Module, layer_plan: LayerPlan, strategy: str,
                        options: dict[str, Any] | None = None) -> nn.Module:
    """The compact module of ``strategy`` computing exactly what ``masked_layer`` computes."""
    if not isinstance(masked_layer, (MaskedConv2d, MaskedLinear)):
        raise UnsupportedLayerError(f"{type(masked_layer).__name__} is not a masked layer")
    _check_matches(masked_layer, layer_plan)
    if strategy == "dense":
        return masked_layer.to_dense()
    if isinstance(masked_layer, MaskedConv2d) and masked_layer.padding_mode != "zeros":
        raise UnsupportedLayerError(f"layer {layer_plan.name!r} uses padding_mode={masked_layer.padding_mode!r}; "
                                    "only 'dense' supports it")
    has_bias = masked_layer.bias is not None
    module = build_compact(layer_plan, strategy, options, has_bias)
    module = module.to(device=masked_layer.weight.device, dtype=masked_layer.weight.dtype)
    w = masked_layer.masked_weight()
    groups = layer_groups(layer_plan, dict(options or {}))
    per_group = [w[list(g.filters)][:, list(g.inputs)] for g in groups]
    load_group_weights(module, per_group)
    if has_bias:
        b = masked_layer.bias
        if isinstance(module, GroupedConv):
            module.bias.zero_()
            for j, g in enumerate(groups):
                module.bias[j * module.fmax: j * module.fmax + len(g.filters)] = b[list(g.filters)]
        else:
            module.bias.copy_(b)
    return module.train(masked_layer.training)


@torch.no_grad()
def portable(model: nn.Module) -> nn.Module:
    """Replace every :class:`KernelConv` of ``model`` (in place) by its plain-PyTorch equivalent,
    for ONNX export or FLOP counters that do not know ``sgcompress::gconv``."""
    for name, m in list(model.named_modules()):
        if isinstance(m, KernelConv):
            set_submodule(model, name, m.to_split())
    return model


def gconv_flop_handle(inputs, outputs) -> int:
    """fvcore handle for ``sgcompress::gconv``: multiply-adds executed, i.e. output pixels times
    the packed weight count (filter tiles padded to 8 with zero weights)."""
    from fvcore.nn.jit_handles import get_shape

    w_numel = 1
    for d in get_shape(inputs[1]):
        w_numel *= d
    n, _, ho, wo = get_shape(outputs[0])
    return n * ho * wo * w_numel


def fvcore_handles() -> dict:
    """``{op_name: handle}`` to pass to ``fvcore.nn.FlopCountAnalysis(...).set_op_handle(**...)``."""
    return {"sgcompress::gconv": gconv_flop_handle}
