"""Fold BatchNorm into the convolution it follows (for an inference export).

In eval mode ``bn(conv(x))`` is one convolution: ``W' = W * s`` per output channel and
``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``. Deployment tools fold
BatchNorm into ``nn.Conv2d`` (``torch.fx`` fusion, ``torch.jit.optimize_for_inference``,
onnxruntime), but a compact model's convolutions are sgcompress modules those tools do not
know, so sgcompress folds before it builds them: on the masked model, where every pruned
layer is still a (masked) ``Conv2d``, and a pruned connection stays exactly zero (its weight
is scaled, not moved).

A pair is folded only where the model's graph (``torch.fx``) shows a ``BatchNorm2d`` whose
input is a ``Conv2d`` output that feeds nothing else, each module called exactly once; the
BatchNorm becomes ``nn.Identity`` and the conv gains a bias if it had none.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx, nn

from .errors import UnsupportedLayerError
from .surgery import set_submodule


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # masked layers (subclasses of these) are leaves too: their forward is not traceable
        return isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, batchnorm)`` module names that can be folded, in graph order."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types on data-dependent control flow
        raise UnsupportedLayerError(
            f"folding BatchNorm needs the model's graph, and torch.fx cannot trace this model "
            f"({type(e).__name__}: {e}); export without --fold-bn") from e
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        conv, bn = model.get_submodule(src.target), model.get_submodule(node.target)
        if (isinstance(conv, nn.Conv2d) and len(src.users) == 1 and calls[src.target] == 1
                and calls[node.target] == 1 and bn.running_mean is not None
                and bn.num_features == conv.out_channels):
            pairs.append((src.target, node.target))
    return pairs


def add_fold_bias(model: nn.Module, pairs) -> None:
    """Give every conv of ``pairs`` a bias and make its BatchNorm an identity (the structure of
    a folded model, to load its saved weights into)."""
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype,
                                                 device=conv.weight.device))
        set_submodule(model, bn_name, nn.Identity())


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every foldable BatchNorm of ``model`` (in place, eval-mode function kept); returns
    the ``(conv, batchnorm)`` pairs folded."""
    pairs = conv_bn_pairs(model)
    affine = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        conv.weight.mul_(scale.view(-1, *[1] * (conv.weight.dim() - 1)).to(conv.weight))
        affine.append((conv, scale.to(conv.weight), shift.to(conv.weight)))
    add_fold_bias(model, pairs)
    for conv, scale, shift in affine:
        conv.bias.copy_(conv.bias * scale + shift)
    return pairs
