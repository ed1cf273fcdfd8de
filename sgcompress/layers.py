"""Masked (trainable) forms of the layers SG-CNN prunes.

A masked layer is a subclass of the layer it replaces, so ``isinstance`` checks and
state_dict keys stay exactly those of the original model. The 0/1 connection mask is a
non-persistent buffer of shape ``(C_out, C_in)``: it comes from the plan, never from the
weights file, so the saved weights also load into the user's original class (pruned
connections are stored as zeros and compute the same function there).

Pruned connections are exactly zero in every forward (the weight is multiplied by the
mask) and stay exactly zero through optimizer steps: the gradient of ``W * M`` with
respect to ``W`` is zero where ``M`` is zero, and :func:`zero_pruned_` (also attached to
an optimizer with :func:`keep_pruned_zero`) zeroes them again after each step in case an
optimizer moves weights without a gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _MaskMixin:
    connection_mask: torch.Tensor

    def _init_mask(self, out_features: int, in_features: int) -> None:
        self.register_buffer(
            "connection_mask", torch.ones(out_features, in_features), persistent=False
        )

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the connection mask (shape ``(C_out, C_in)``, values 0/1) and zero pruned weights."""
        expected = tuple(self.connection_mask.shape)
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match layer {expected}")
        self.connection_mask.copy_(mask.to(self.connection_mask))
        self.zero_pruned_()

    def weight_mask(self) -> torch.Tensor:
        """The mask broadcast to the weight's shape."""
        m = self.connection_mask
        return m.view(*m.shape, *([1] * (self.weight.dim() - 2)))

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.weight_mask()

    @torch.no_grad()
    def zero_pruned_(self) -> None:
        self.weight.mul_(self.weight_mask())

    @property
    def density(self) -> float:
        """Fraction of connections kept."""
        return float(self.connection_mask.mean())


class MaskedConv2d(_MaskMixin, nn.Conv2d):
    """``nn.Conv2d`` (groups=1) whose input-channel connections can be pruned per filter."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.groups != 1:
            raise ValueError("MaskedConv2d supports groups=1 only")
        self._init_mask(self.out_channels, self.in_channels)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d) -> "MaskedConv2d":
        """A masked copy of ``conv`` sharing its parameters (mask all ones)."""
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with the pruned weights zeroed (same function)."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=1,
            bias=self.bias is not None, padding_mode=self.padding_mode,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.masked_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


class MaskedLinear(_MaskMixin, nn.Linear):
    """``nn.Linear`` whose input connections can be pruned per output unit."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_mask(self.out_features, self.in_features)

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> "MaskedLinear":
        new = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def to_dense(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.masked_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


MASKED_TYPES = (MaskedConv2d, MaskedLinear)


def masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> masked layer, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MASKED_TYPES)}


@torch.no_grad()
def zero_pruned_(model: nn.Module) -> None:
    """Set every pruned connection of every masked layer of ``model`` to exactly zero."""
    for m in model.modules():
        if isinstance(m, MASKED_TYPES):
            m.zero_pruned_()


def keep_pruned_zero(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Zero pruned connections after every ``optimizer.step()``; returns the hook handle."""
    return optimizer.register_step_post_hook(lambda *_: zero_pruned_(model))
