"""Architectures and checkpoints -> an ``nn.Module`` in eval mode, on the CPU.

An architecture is data (:class:`ModelSpec`, stored in ``manifest.json``); weights come
from a checkpoint file. Files are read without running code: ``.safetensors`` through
safetensors, everything else through ``torch.load(..., weights_only=True)``. Full pickles
and TorchScript archives hold code; they are loaded only behind ``trust=True`` (the CLI's
``--trust-checkpoint``), and only in :func:`_load_trusted`. A failed safe load never falls
back to an unsafe one by itself.

Architecture forms accepted by ``arch``:

- ``torchvision:NAME``        a torchvision classification builder (``weights=None``);
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
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import (
    ArchitectureError,
    CheckpointError,
    ConfigError,
    InputShapeError,
    StateDictMismatchError,
    UnsafeCheckpointError,
)

logger = logging.getLogger(__name__)

ARCH_FORMS = (
    "'torchvision:NAME' (e.g. torchvision:resnet50), 'sgcompress:NAME' (e.g. "
    "sgcompress:resnet20), 'package.module:Class', or 'path/to/file.py:Class'"
)
PICKLED_MODULE = "pickled-module"  # spec.arch of a module taken whole from a trusted pickle
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
MAX_INPUT_NUMEL = 1 << 28  # 1 GiB of fp32 for the shape probe; larger is surely a typo
MAX_LISTED = 20  # problems listed per kind in a mismatch message (all are counted)


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


def _infer_num_classes(spec: ModelSpec, state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """num_classes from the checkpoint's classifier weight, or None (builder default)."""
    kind, builder = _resolve(spec.arch)
    if not _accepts(builder, "num_classes", kind):
        return None
    try:
        with torch.device("meta"):  # a probe: no memory, no init cost
            probe = build_model(spec)
    except Exception:
        probe = build_model(spec)
    name = classifier_name(probe)
    weight = state_dict.get(f"{name}.weight") if name else None
    if weight is None or weight.ndim < 1:
        return None
    logger.info("num_classes=%d read from %s.weight in the checkpoint", weight.shape[0], name)
    return int(weight.shape[0])


# -------------------------------------------------------------------- checkpoints


def _sniff(path: Path) -> str:
    """'safetensors', 'zip', 'pickle' or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _unsafe_reason(message: str) -> str | None:
    """What the weights-only unpickler refused, if it refused code/objects (not corruption)."""
    m = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", message)
    if m:
        return f"it references {m.group(1)}"
    for needle in ("Can only build", "Can only create new object", "unrecognized function"):
        if needle in message:
            return "it builds Python objects other than tensors"
    return None


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in z.namelist())
    except Exception:  # BadZipFile, NotImplementedError (odd version), ...: a probe only
        return False  # torch.load below reports the damage


def _load_trusted(path: Path, kind: str) -> Any:
    """THE one place that runs code from a checkpoint; only reached with trust=True."""
    logger.warning(
        "loading %s with --trust-checkpoint: it can run arbitrary code; only do this for files "
        "you trust. Re-save it as a state_dict or safetensors to avoid this.", path)
    try:
        if kind == "torchscript":
            with warnings.catch_warnings():  # its deprecation notice is noise next to ours
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(str(path), map_location="cpu").state_dict()
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        hint = ""
        if isinstance(e, (AttributeError, ModuleNotFoundError, ImportError)):
            hint = (" The classes it was pickled with must be importable here; or load it "
                    "where they are and re-save model.state_dict().")
        raise CheckpointError(
            f"'{path}' could not be loaded even with --trust-checkpoint: "
            f"{type(e).__name__}: {e}.{hint}") from e


def _unsafe_error(path: Path, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"'{path}' holds pickled code/objects ({what}) and was not loaded: loading it could run "
        "arbitrary code. Best: re-save it as a state_dict (torch.save(model.state_dict(), ...)) "
        "or as safetensors. If you trust the file, pass --trust-checkpoint to opt in.")


def _read(path: str | os.PathLike, trust: bool) -> tuple[Any, str]:
    """(raw object, kind) with kind 'safetensors' | 'torch' | 'pickle-trusted' | 'torchscript'."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint '{p}' does not exist; check the path")
    if p.is_dir():
        raise CheckpointError(f"checkpoint '{p}' is a directory; pass the weights file inside it")
    try:
        size = p.stat().st_size
        sniffed = _sniff(p)
    except OSError as e:
        raise CheckpointError(f"checkpoint '{p}' cannot be read: {e}") from e
    if size == 0:
        raise CheckpointError(f"checkpoint '{p}' is empty (0 bytes); it was not written completely")
    suffix = p.suffix.lower()
    if suffix == ".safetensors" or sniffed == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu"), "safetensors"
        except Exception as e:  # SafetensorError, and whatever a damaged header provokes
            raise CheckpointError(
                f"'{p}' is not a readable safetensors file ({type(e).__name__}: {e}); "
                "it may be truncated or corrupt") from e
    if sniffed == "unknown" and suffix not in TORCH_SUFFIXES:
        raise CheckpointError(
            f"'{p}' is not a recognised checkpoint: expected .safetensors or a torch.save file "
            f"(.pt/.pth/.bin/.ckpt); its first bytes are neither")
    if sniffed == "zip" and _is_torchscript(p):
        if not trust:
            raise _unsafe_error(p, "a TorchScript archive")
        return _load_trusted(p, "torchscript"), "torchscript"
    try:
        return torch.load(p, map_location="cpu", weights_only=True), "torch"
    except Exception as e:
        reason = _unsafe_reason(str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if reason is None:
            raise CheckpointError(
                f"'{p}' is not a readable torch checkpoint: it may be truncated or corrupt "
                f"({type(e).__name__}: {_first_line(e)})") from None
        if not trust:
            raise _unsafe_error(p, reason) from None
    # The user opted in, and the safe loader refused code (not damage): load it trusted.
    return _load_trusted(p, "pickle"), "pickle-trusted"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else "no detail"


def _flatten(obj: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = True
    while stripped and sd:
        stripped = False
        for pre in STRIPPED_PREFIXES:
            if all(k.startswith(pre) for k in sd):
                logger.info("stripping prefix '%s' from all checkpoint keys", pre)
                sd = {k[len(pre):]: v for k, v in sd.items()}
                stripped = True
    return sd


def _extract_state_dict(obj: Any, source: Path, depth: int = 0) -> dict[str, torch.Tensor] | nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"'{source}' holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors)")
    if depth < 4:
        for key in WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], (Mapping, nn.Module)):
                return _extract_state_dict(obj[key], source, depth + 1)
    flat = _flatten(obj)
    bad = [k for k, v in flat.items() if not isinstance(v, torch.Tensor)]
    if not flat or bad:
        keys = ", ".join(map(repr, list(obj)[:10]))
        raise CheckpointError(
            f"'{source}' holds no state_dict: top-level keys are [{keys}]"
            + (f" and {bad[:3]} are not tensors" if bad and flat else "")
            + f"; expected a mapping of names to tensors, or one under {list(WRAPPER_KEYS)}")
    return _strip_prefixes(flat)


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> dict[str, torch.Tensor] | nn.Module:
    """Read a checkpoint file into a flat state_dict (or, with ``trust``, a pickled module).

    Training checkpoints are unwrapped (``state_dict``/``model_state_dict``/``model``/``net``)
    and ``module.``/``_orig_mod.`` prefixes stripped. A TorchScript archive (trusted only)
    gives its state_dict.

    Raises:
        UnsafeCheckpointError: the file holds code/objects and ``trust`` is False.
        CheckpointError: the file is missing, empty, truncated, corrupt or holds no weights.
    """
    obj, _ = _read(path, trust)
    return _extract_state_dict(obj, Path(path))


# ---------------------------------------------------------------- strict loading


def _listed(title: str, items: list[str]) -> str:
    shown = "\n".join(f"    {s}" for s in items[:MAX_LISTED])
    more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def _common_prefix(keys: list[str]) -> str:
    """Longest dotted prefix (ending in '.') shared by all keys; '' if none."""
    if not keys:
        return ""
    parts = keys[0].split(".")[:-1]
    n = 0
    while n < len(parts) and all(k.split(".")[:-1][:n + 1] == parts[:n + 1] for k in keys):
        n += 1
    return ".".join(parts[:n]) + "." if n else ""


def _mismatch_hint(model: nn.Module, expected: set[str], given: set[str],
                   missing: list[str], unexpected: list[str],
                   shapes: dict[str, tuple[torch.Size, torch.Size]]) -> str:
    head = classifier_name(model)
    if not missing and not unexpected and head and all(k.rsplit(".", 1)[0] == head for k in shapes):
        w = shapes.get(f"{head}.weight")
        if w is not None:
            return f"only the classifier '{head}' differs: pass --num-classes {w[0][0]}"
    extra = _common_prefix(sorted(given))
    if extra and {k[len(extra):] for k in given} & expected and not (given & expected):
        return f"all checkpoint keys share the extra prefix '{extra}': strip prefix '{extra}'"
    lacking = _common_prefix(sorted(expected))
    if lacking and {lacking + k for k in given} & expected and not (given & expected):
        return f"the model's keys all start with '{lacking}' and the checkpoint's do not: add prefix '{lacking}'"
    return "the checkpoint was saved from a different architecture: check --arch and --arch-kwargs"


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load ``state_dict`` into ``model``; every key and shape must match.

    Only a missing BatchNorm ``num_batches_tracked`` is tolerated (kept from the model).

    Raises:
        StateDictMismatchError: lists every missing key, unexpected key and shape
            mismatch (first 20 of each shown, all counted) with the likely fix. The lists
            are also on the exception as ``missing``, ``unexpected``, ``mismatched``.
    """
    own = model.state_dict()
    sd = dict(state_dict)
    filled = [k for k in own if k not in sd and k.rsplit(".", 1)[-1] == "num_batches_tracked"]
    for k in filled:
        sd[k] = own[k]
    if filled:
        logger.info("%s has no num_batches_tracked for %d BatchNorm layers (an older checkpoint); "
                    "kept the model's values", source, len(filled))
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = {k: (tuple(sd[k].shape), tuple(own[k].shape)) for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)}
    if missing or unexpected or shapes:
        hint = _mismatch_hint(model, set(own), set(state_dict), missing, unexpected, shapes)
        parts = [f"'{source}' does not match the model: {len(missing)} missing, "
                 f"{len(unexpected)} unexpected, {len(shapes)} with a different shape. Likely fix: {hint}"]
        if missing:
            parts.append(_listed("missing in checkpoint", missing))
        if unexpected:
            parts.append(_listed("unexpected in checkpoint", unexpected))
        if shapes:
            parts.append(_listed("shape mismatch", [
                f"{k}: checkpoint {list(c)} vs model {list(m)}" for k, (c, m) in shapes.items()]))
        err = StateDictMismatchError("\n".join(parts))
        err.missing, err.unexpected, err.mismatched, err.hint = missing, unexpected, shapes, hint
        raise err
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as e:  # e.g. a dtype that cannot be copied
        raise StateDictMismatchError(f"'{source}': loading the weights failed: {_first_line(e)}") from e


# -------------------------------------------------------------------- input shape


def check_input_shape(model: nn.Module, input_shape: tuple[int, int, int]) -> None:
    """Run ``model`` on ``zeros(1, *input_shape)`` (eval mode, no grad; modes restored).

    Raises:
        InputShapeError: the forward pass failed; the message quotes it.
    """
    shape = _validate_shape(input_shape)
    param = next((t for t in model.parameters() if t.is_floating_point()), None)
    x = torch.zeros(1, *shape, dtype=param.dtype if param is not None else torch.float32,
                    device=param.device if param is not None else "cpu")
    modes = {m: m.training for m in model.modules()}
    model.eval()  # batch size 1 breaks BatchNorm in train mode
    try:
        with torch.no_grad():
            model(x)
    except Exception as e:
        c, h, w = shape
        raise InputShapeError(
            f"the model does not accept input shape {c},{h},{w} (a batch of 1x{c}x{h}x{w}): "
            f"{type(e).__name__}: {_first_line(e)}. Pass --input-shape C,H,W matching the data "
            "the model was trained on (e.g. 3,224,224 ImageNet, 3,32,32 CIFAR, 1,28,28 MNIST)") from e
    finally:
        for m, training in modes.items():
            m.training = training


# ------------------------------------------------------------------------ facade


def load_model(
    checkpoint: str | os.PathLike,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] | str = (3, 224, 224),
    trust: bool = False,
    check_shape: bool = True,
) -> LoadedModel:
    """Build ``arch``, load ``checkpoint`` into it strictly, and (by default) probe the input shape.

    ``num_classes`` defaults to the checkpoint's classifier size. A trusted pickled module
    with no ``arch`` is used as is (``spec.arch == "pickled-module"``).

    Raises:
        ArchitectureError, CheckpointError (and subclasses), ConfigError, InputShapeError.
    """
    shape = parse_input_shape(input_shape) if isinstance(input_shape, str) else _validate_shape(input_shape)
    source = os.path.abspath(os.fspath(checkpoint))
    obj, kind = _read(checkpoint, trust)
    weights = _extract_state_dict(obj, Path(checkpoint))
    if isinstance(weights, nn.Module) and arch is None:
        model = weights.to("cpu")
        head = classifier_name(model)
        head_w = getattr(model.get_submodule(head), "weight", None) if head else None
        actual = int(head_w.shape[0]) if head_w is not None else None
        if num_classes is not None and actual is not None and num_classes != actual:
            raise ConfigError(
                f"--num-classes {num_classes}, but the pickled module in '{checkpoint}' has "
                f"{actual} outputs ('{head}'); drop --num-classes or pass --arch to rebuild it")
        spec = ModelSpec(PICKLED_MODULE, {}, num_classes if num_classes is not None else actual, shape)
    else:
        if isinstance(weights, nn.Module):
            weights = _strip_prefixes(dict(weights.state_dict()))
        if arch is None:
            what = "a TorchScript archive, whose code is not rebuildable" if kind == "torchscript" else "only weights"
            raise ArchitectureError(f"'{checkpoint}' holds {what}; pass --arch, one of {ARCH_FORMS}")
        kwargs = dict(arch_kwargs or {})
        spec = ModelSpec(normalize_arch(arch), kwargs, num_classes, shape)
        if num_classes is None and "num_classes" not in kwargs:
            inferred = _infer_num_classes(spec, weights)
            if inferred is not None:
                spec = ModelSpec(spec.arch, kwargs, inferred, shape)
        model = build_model(spec)
        load_state_dict_strict(model, weights, source=source)
    model.eval()
    if check_shape:
        check_input_shape(model, shape)
    return LoadedModel(model=model, spec=spec, source=source)
