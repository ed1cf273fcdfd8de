"""Apply a plan to a model: swap layers for their masked forms and set the masks.

The masked model keeps the original architecture, shapes and state_dict keys; only the
pruned layers' classes change (to subclasses of the originals).
"""

from __future__ import annotations

from torch import nn

from .errors import ArtifactError
from .layers import MASKED_TYPES, MaskedConv2d, MaskedLinear
from .plan import CompressionPlan


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) of ``model`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def to_masked(model: nn.Module, names) -> nn.Module:
    """Replace the named Conv2d/Linear layers of ``model`` (in place) by masked ones, masks all ones."""
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, MASKED_TYPES):
            continue
        if isinstance(mod, nn.Conv2d):
            set_submodule(model, name, MaskedConv2d.from_dense(mod))
        elif isinstance(mod, nn.Linear):
            set_submodule(model, name, MaskedLinear.from_dense(mod))
        else:
            raise TypeError(f"layer {name!r} is a {type(mod).__name__}, not Conv2d/Linear")
    return model


def apply_plan(model: nn.Module, plan: CompressionPlan) -> nn.Module:
    """Make ``model`` the masked model the plan describes (in place); checks every shape."""
    for lp in plan.layers:
        try:
            mod = model.get_submodule(lp.name)
        except AttributeError as e:
            raise ArtifactError(f"the plan names layer {lp.name!r}, which this model does not have; "
                                "was the plan made for another architecture?") from e
        if isinstance(mod, nn.Conv2d):
            shape = (mod.out_channels, mod.in_channels, tuple(mod.kernel_size))
            want = (lp.out_channels, lp.in_channels, tuple(lp.kernel_size))
        elif isinstance(mod, nn.Linear):
            shape, want = (mod.out_features, mod.in_features), (lp.out_channels, lp.in_channels)
        else:
            raise ArtifactError(f"plan layer {lp.name!r} is a {type(mod).__name__} in this model, not Conv2d/Linear")
        if shape != want:
            raise ArtifactError(f"plan layer {lp.name!r} expects shape {want} but the model has {shape}")
        to_masked(model, [lp.name])
        model.get_submodule(lp.name).set_mask(lp.mask())
    return model


def strip_masks(model: nn.Module) -> nn.Module:
    """Replace masked layers by plain ones holding the masked weights (in place, same function)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, MASKED_TYPES):
            set_submodule(model, name, mod.to_dense())
    return model
