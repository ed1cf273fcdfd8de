"""Which layers SG-CNN prunes, and why the others are left alone.

The model is run once on a zero input (batch 1) with forward hooks, which gives every
leaf module's input/output shapes, its dense MACs and the execution order. Rules, as the
authors applied them (method doc, "Which layers"):

- pruned: every ``Conv2d(groups=1)`` in the body and every ``Linear``;
- left dense by default: the stem conv (the first conv executed) and 1x1 residual
  shortcut/downsample convs (modules named ``*downsample*`` or ``*shortcut*``);
- skipped with a reason: depthwise/grouped convs, layers with fewer filters than
  ``groups``, layers not called at this input shape, and any other layer type that
  carries a weight matrix (nothing is skipped silently).

``include`` (glob patterns on module names) restricts pruning to matching layers and
overrides the stem/shortcut defaults; ``exclude`` removes matching layers.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError, InputShapeError, UnsupportedLayerError
from .plan import SkippedLayer

SHORTCUT_PATTERNS = ("*downsample*", "*shortcut*")
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


@dataclass(frozen=True)
class LayerInfo:
    """One leaf module as seen in a forward pass at batch size 1."""

    name: str
    type: str
    kind: str  # "conv", "linear" or "other"
    order: int  # execution order of the first call, -1 if never called
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    groups: int
    params: int
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    macs: int  # dense multiply-accumulates per image (conv/linear), 0 for others

    def to_dict(self) -> dict:
        return {
            "name": self.name, "type": self.type, "kind": self.kind,
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size), "groups": self.groups, "params": self.params,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "output_shape": list(self.output_shape) if self.output_shape else None,
            "macs": self.macs,
        }


@dataclass(frozen=True)
class Selection:
    targets: tuple[str, ...]  # names of the layers to prune, in execution order
    skipped: tuple[SkippedLayer, ...]
    layers: dict[str, LayerInfo]  # every leaf module that was considered

    def reason(self, name: str) -> str | None:
        for s in self.skipped:
            if s.name == name:
                return s.reason
        return None


def _layer_macs(module: nn.Module, out_shape: tuple[int, ...]) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        positions = out_shape[-1] * out_shape[-2]
        return positions * module.out_channels * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        rows = 1
        for d in out_shape[1:-1]:
            rows *= d
        return rows * module.in_features * module.out_features
    return 0


def trace_layers(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, LayerInfo]:
    """Run ``model`` on zeros of ``(1, *input_shape)`` and describe every leaf module."""
    seen: dict[str, tuple[int, tuple, tuple]] = {}
    hooks = []

    def make_hook(name):
        def hook(mod, inputs, output):
            if name in seen or not inputs or not torch.is_tensor(inputs[0]) or not torch.is_tensor(output):
                return
            seen[name] = (len(seen), tuple(inputs[0].shape), tuple(output.shape))
        return hook

    leaves = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    for name, mod in leaves:
        hooks.append(mod.register_forward_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            param = next(model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            model(torch.zeros(1, *input_shape, device=device))
    except Exception as e:  # the user's model rejected the input: say which shape
        raise InputShapeError(
            f"the model fails on an input of shape (1, {', '.join(map(str, input_shape))}): "
            f"{type(e).__name__}: {e}. Pass the shape it expects with --input-shape C,H,W"
        ) from e
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    infos: dict[str, LayerInfo] = {}
    for name, mod in leaves:
        order, in_shape, out_shape = seen.get(name, (-1, None, None))
        if isinstance(mod, nn.Conv2d):
            kind, cin, cout, k, g = "conv", mod.in_channels, mod.out_channels, tuple(mod.kernel_size), mod.groups
        elif isinstance(mod, nn.Linear):
            kind, cin, cout, k, g = "linear", mod.in_features, mod.out_features, (1, 1), 1
        else:
            kind, cin, cout, k, g = "other", 0, 0, (0, 0), 1
        params = sum(p.numel() for p in mod.parameters(recurse=False))
        macs = _layer_macs(mod, out_shape) if out_shape is not None else 0
        infos[name] = LayerInfo(name, type(mod).__name__, kind, order, cin, cout, k, g, params,
                                in_shape, out_shape, macs)
    return dict(sorted(infos.items(), key=lambda kv: (kv[1].order < 0, kv[1].order)))


def _matches(name: str, patterns) -> str | None:
    for p in patterns:
        if fnmatch.fnmatchcase(name, p):
            return p
    return None


def select_layers(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    n_clusters: int,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    layers: dict[str, LayerInfo] | None = None,
) -> Selection:
    """Decide which Conv2d/Linear layers to prune; every other candidate gets a reason."""
    layers = layers if layers is not None else trace_layers(model, input_shape)
    convs_called = [i for i in layers.values() if i.kind == "conv" and i.order >= 0]
    stem = min(convs_called, key=lambda i: i.order).name if convs_called else None
    targets, skipped = [], []
    for info in layers.values():
        if info.kind == "other":
            mod = model.get_submodule(info.name)
            w = getattr(mod, "weight", None)
            if torch.is_tensor(w) and w.dim() >= 2 and not isinstance(mod, _NORM_TYPES):
                skipped.append(SkippedLayer(info.name, f"{info.type} is not a Conv2d or Linear: left as it is"))
            continue
        name = info.name
        forced = _matches(name, include)
        reason = None
        if info.order < 0:
            reason = f"not called in a forward pass at input shape {tuple(input_shape)}"
        elif info.kind == "conv" and info.groups != 1:
            what = "depthwise" if info.groups == info.in_channels else f"grouped (groups={info.groups})"
            reason = f"{what} conv: SG-CNN regroups groups=1 convs only"
        elif (p := _matches(name, exclude)) is not None:
            reason = f"matches --exclude {p!r}"
        elif include and forced is None:
            reason = "does not match any --include pattern"
        elif forced is None and name == stem:
            reason = "stem conv (sees the image): left dense by default as the authors did; --include it to prune"
        elif (forced is None and info.kind == "conv" and info.kernel_size == (1, 1)
              and _matches(name, SHORTCUT_PATTERNS)):
            reason = "residual shortcut 1x1 conv: left dense by default as the authors did; --include it to prune"
        elif info.out_channels < n_clusters:
            reason = f"{info.out_channels} filters, fewer than --groups {n_clusters}"
        if reason is None:
            targets.append(name)
        else:
            skipped.append(SkippedLayer(name, reason))
    _check_include(include, layers, skipped)
    return Selection(tuple(targets), tuple(skipped), layers)


def _check_include(include, layers: dict[str, LayerInfo], skipped: list[SkippedLayer]) -> None:
    """An --include pattern must name layers, and not only layers SG-CNN cannot prune."""
    for pattern in include:
        hits = [n for n in layers if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ConfigError(f"--include {pattern!r} matches no layer; the names are those `sgcompress analyze` lists")
        unsupported = [s for s in skipped if s.name in hits and ("conv:" in s.reason or "not a Conv2d" in s.reason)]
        if len(unsupported) == len(hits):
            s = unsupported[0]
            raise UnsupportedLayerError(f"--include {pattern!r} selects {s.name}, which cannot be pruned ({s.reason}); "
                                        "remove it from --include")
