"""Architectures as data: :class:`ModelSpec` and the builders it names.

Forms accepted by ``arch``:

- ``torchvision:NAME``        a torchvision classification builder (``weights=None``, never a download);
- ``sgcompress:NAME``         a builder of ``sgcompress.zoo.MODELS``;
- ``package.module:Class``    a class or factory importable from ``sys.path``;
- ``path/to/file.py:Class``   a class or factory defined in a Python file.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from .errors import (
    ArchitectureError,
    ConfigError,
)

logger = logging.getLogger(__name__)

ARCH_FORMS = (
    "'torchvision:NAME' (e.g. torchvision:resnet50), 'sgcompress:NAME' (e.g. "
    "sgcompress:resnet20), 'package.module:Class', or 'path/to/file.py:Class'"
)
PICKLED_MODULE = "pickled-module"  # spec.arch of a module taken whole from a trusted pickle
MAX_INPUT_NUMEL = 1 << 28  # 1 GiB of fp32 for the shape probe; larger is surely a typo


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ModelSpec:
    """An architecture as data: enough to rebuild the model with random weights."""

    arch: str  # one of the forms in ARCH_FORMS, or "pickled-module" (not rebuildable)
    arch_kwargs: dict = field(default_factory=dict)  # JSON-able kwargs for the builder
    num_classes: int | None = None  # None: the builder's default
    input_shape: tuple[int, int, int] = (3, 224, 224)  # C, H, W of one sample

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not self.arch.strip():
            raise ArchitectureError(f"arch must be a non-empty string, one of {ARCH_FORMS}")
        if not isinstance(self.arch_kwargs, Mapping):
            raise ConfigError(
                f"arch_kwargs must be a JSON object (dict), got {type(self.arch_kwargs).__name__}; "
                'pass e.g. --arch-kwargs \'{"width": 2}\''
            )
        try:
            # A JSON round trip: the spec behaves the same before and after the manifest.
            kwargs = json.loads(json.dumps(dict(self.arch_kwargs)))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"arch_kwargs must be JSON-serialisable: {e}") from None
        object.__setattr__(self, "arch_kwargs", kwargs)
        nc = self.num_classes
        if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or nc < 1):
            raise ConfigError(f"num_classes={nc!r} must be a positive integer (--num-classes N)")
        if "num_classes" in kwargs and nc is not None and kwargs["num_classes"] != nc:
            raise ConfigError(
                f"num_classes={nc} disagrees with arch_kwargs num_classes="
                f"{kwargs['num_classes']!r}; give it once (--num-classes)"
            )
        object.__setattr__(self, "input_shape", _validate_shape(self.input_shape))

    def to_dict(self) -> dict:
        return {
            "arch": self.arch,
            "arch_kwargs": dict(self.arch_kwargs),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        if not isinstance(d, Mapping) or "arch" not in d:
            raise ConfigError(f"a model spec needs at least an 'arch' entry, got {d!r}")
        unknown = set(d) - {"arch", "arch_kwargs", "num_classes", "input_shape"}
        if unknown:
            raise ConfigError(f"unknown model spec entries {sorted(unknown)}")
        return cls(
            arch=d["arch"],
            arch_kwargs=d.get("arch_kwargs") or {},
            num_classes=d.get("num_classes"),
            input_shape=tuple(d.get("input_shape", (3, 224, 224))),
        )


@dataclass
class LoadedModel:
    model: nn.Module  # eval() mode, on CPU, weights loaded
    spec: ModelSpec
    source: str  # absolute path of the checkpoint read


def _validate_shape(shape: Any) -> tuple[int, int, int]:
    fix = "pass --input-shape C,H,W with three positive integers, e.g. 3,224,224"
    try:
        dims = tuple(shape)
    except TypeError:
        raise ConfigError(f"input shape {shape!r} is not a sequence; {fix}") from None
    if len(dims) != 3 or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims
    ):
        raise ConfigError(f"input shape {shape!r} is not three positive integers; {fix}")
    if dims[0] * dims[1] * dims[2] > MAX_INPUT_NUMEL:
        raise ConfigError(f"input shape {dims} has more than {MAX_INPUT_NUMEL} values; {fix}")
    return dims  # type: ignore[return-value]


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """Parse ``"1,28,28"`` (also ``1x28x28``, ``(1, 28, 28)``) into ``(1, 28, 28)``.

    Raises:
        ConfigError: not three positive integers.
    """
    parts = [p for p in re.split(r"[,x\s]+", str(text).strip().strip("()[]").lower()) if p]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3:
        raise ConfigError(
            f"--input-shape {text!r} must be three integers C,H,W, "
            "e.g. 3,224,224 (ImageNet), 3,32,32 (CIFAR) or 1,28,28 (MNIST)"
        )
    return _validate_shape(dims)


# ------------------------------------------------------------------ architectures


def _close(name: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    return f" Did you mean: {', '.join(near)}?" if near else ""


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    import torchvision.models as tvm

    names = sorted(tvm.list_models(module=tvm))
    if name not in names:
        raise ArchitectureError(
            f"'torchvision:{name}' is not a torchvision classification model.{_close(name, names)} "
            f"Available: {len(names)} names from torchvision.models.list_models(module=torchvision.models)."
        )

    def build(**kwargs: Any) -> nn.Module:
        return tvm.get_model(name, weights=None, **kwargs)  # never downloads weights

    return build


def _zoo_builder(name: str) -> Callable[..., nn.Module]:
    try:
        zoo = importlib.import_module(f"{__package__}.zoo")  # lazy: zoo imports heavy models
    except ImportError as e:
        raise ArchitectureError(f"'sgcompress:{name}': the sgcompress model zoo cannot be imported: {e}") from e
    models = getattr(zoo, "MODELS", {})
    if name not in models:
        raise ArchitectureError(
            f"'sgcompress:{name}' is not in the sgcompress zoo.{_close(name, sorted(models))} "
            f"Available: {', '.join(sorted(models)) or '(none)'}."
        )
    return models[name]


def _file_module(path: str) -> Any:
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ArchitectureError(f"architecture file '{path}' (resolved to {file}) does not exist; check the path in --arch")
    mod_name = "sgcompress_user_" + hashlib.sha1(str(file).encode()).hexdigest()[:12]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, file)
    if spec is None or spec.loader is None:
        raise ArchitectureError(f"'{file}' cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look classes up here
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise ArchitectureError(f"importing '{file}' failed: {type(e).__name__}: {e}") from e
    return module


def _import_builder(arch: str) -> Callable[..., nn.Module]:
    mod_part, _, attr = arch.rpartition(":")
    if not mod_part or not attr:
        raise ArchitectureError(f"'{arch}' is not of the form module:Class; use {ARCH_FORMS}")
    if mod_part.endswith(".py") or "/" in mod_part or os.sep in mod_part:
        module = _file_module(mod_part)
    else:
        try:
            module = importlib.import_module(mod_part)
        except ImportError as e:
            raise ArchitectureError(
                f"cannot import module '{mod_part}' for --arch '{arch}': {e}. "
                "Install it, or point --arch at a file: path/to/file.py:Class"
            ) from e
        except Exception as e:
            raise ArchitectureError(f"importing '{mod_part}' failed: {type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            raise ArchitectureError(
                f"'{mod_part}' has no attribute '{attr}' (from --arch '{arch}').{_close(attr, public)}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ArchitectureError(f"'{arch}' names a {type(obj).__name__}, not a class or factory")
    return obj


def _resolve(arch: str) -> tuple[str, Callable[..., nn.Module]]:
    """(kind, builder) where kind is 'torchvision', 'sgcompress' or 'import'."""
    prefix, sep, name = arch.partition(":")
    if not sep:
        hint = ""
        try:
            import torchvision.models as tvm

            if arch in tvm.list_models(module=tvm):
                hint = f" Did you mean 'torchvision:{arch}'?"
        except Exception:  # the hint is optional; the error below is what matters
            pass
        raise ArchitectureError(f"--arch '{arch}' has no ':'; use {ARCH_FORMS}.{hint}")
    if prefix == "torchvision":
        return "torchvision", _torchvision_builder(name)
    if prefix == "sgcompress":
        return "sgcompress", _zoo_builder(name)
    if arch == PICKLED_MODULE:
        raise ArchitectureError("a 'pickled-module' spec cannot be rebuilt; load it from its file")
    return "import", _import_builder(arch)


def normalize_arch(arch: str) -> str:
    """The arch string to store: ``file.py:Class`` gets an absolute path."""
    mod_part, sep, attr = arch.rpartition(":")
    if sep and (mod_part.endswith(".py") or "/" in mod_part or os.sep in mod_part):
        return f"{Path(mod_part).expanduser().resolve()}:{attr}"
    return arch


def _accepts(builder: Callable[..., Any], name: str, kind: str) -> bool:
    if kind in ("torchvision", "sgcompress"):
        return True  # torchvision builders take **kwargs; zoo builders take it by contract
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def build_model(spec: ModelSpec) -> nn.Module:
    """Build ``spec``'s architecture with random weights (never downloads anything).

    Raises:
        ArchitectureError: unknown architecture, or the builder rejected its arguments.
    """
    kind, builder = _resolve(spec.arch)
    kwargs = dict(spec.arch_kwargs)
    if spec.num_classes is not None:
        if _accepts(builder, "num_classes", kind):
            kwargs["num_classes"] = spec.num_classes
        else:
            logger.warning("%s takes no num_classes argument; num_classes=%s not passed",
                           spec.arch, spec.num_classes)
    if kind == "sgcompress":  # other forms take in_channels from arch_kwargs, if at all
        kwargs.setdefault("in_channels", spec.input_shape[0])
    try:
        model = builder(**kwargs)
    except Exception as e:
        raise ArchitectureError(
            f"building '{spec.arch}' with {kwargs} failed: {type(e).__name__}: {e}. "
            "Check --arch and --arch-kwargs"
        ) from e
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"'{spec.arch}' returned a {type(model).__name__}, not an nn.Module")
    return model


def classifier_name(model: nn.Module) -> str | None:
    """Name of the last ``nn.Linear`` (else the last conv, e.g. SqueezeNet), or None."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None
