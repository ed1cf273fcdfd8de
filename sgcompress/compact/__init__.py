"""Compact (really faster) forms of masked SG-CNN layers.

- :func:`build_compact` / :func:`compact_from_masked`: one layer, one strategy.
- :func:`measure_layer`: time the strategies of one layer.
- :func:`materialize`: whole model, fastest measured strategy per layer, plus ``choices``.
- :func:`rebuild`: the same compact model again from ``choices`` (no measuring).
- :func:`portable`: swap native-kernel layers for plain-PyTorch ones (ONNX, FLOP counters).
"""

from .factory import (CONV_STRATEGIES, LINEAR_STRATEGIES, build_compact, compact_from_masked, default_candidates,
                      fvcore_handles, plan_from_masked, portable, strategy_key)
from .kernel import ensure_kernel, kernel_status
from .measure import REL_TOL, materialize, max_rel_error, measure_layer, rebuild
from .modules import GroupedConv, KernelConv, SplitConv, SplitLinear
from .spec import Group, LayerGeometry, layer_groups

__all__ = [
    "CONV_STRATEGIES", "LINEAR_STRATEGIES", "REL_TOL", "Group", "GroupedConv", "KernelConv", "LayerGeometry",
    "SplitConv", "SplitLinear", "build_compact", "compact_from_masked", "default_candidates", "ensure_kernel",
    "fvcore_handles", "kernel_status", "layer_groups", "materialize", "max_rel_error", "measure_layer",
    "plan_from_masked", "portable", "rebuild", "strategy_key",
]
