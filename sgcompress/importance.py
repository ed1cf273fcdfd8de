"""Importance vectors: for every filter of a layer, how much it uses each input channel.

Pure functions of a layer's weight and current mask. SG-CNN uses the masked L1 norm of
each connection: ``V[j, i] = sum_{k x k} |W[j, i] * M[j, i]|`` (for a Linear layer simply
``|W[j, i] * M[j, i]|``). Weight-only: no data, no normalisation.
"""

from __future__ import annotations

import torch


def connection_l1(weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Masked L1 importance, shape ``(C_out, C_in)``, in float64.

    Args:
        weight: ``(C_out, C_in, *kernel)`` conv weight or ``(C_out, C_in)`` linear weight.
        mask: ``(C_out, C_in)`` 0/1 mask of the connections still alive; all ones if None.
    """
    w = weight.detach().abs()
    if w.dim() > 2:
        w = w.flatten(2).sum(dim=2)  # in the weight's dtype: converting whole weights first cost seconds
    w = w.to(torch.float64)
    if mask is not None:
        if tuple(mask.shape) != tuple(w.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight {tuple(w.shape)}")
        w = w * mask.detach().to(torch.float64)
    return w
