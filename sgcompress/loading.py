"""Architectures and checkpoints -> an ``nn.Module`` in eval mode, on the CPU.

An architecture is data (:class:`ModelSpec`, stored in ``manifest.json``); weights come
from a checkpoint file. Files are read without running code: ``.safetensors`` through
safetensors, everything else through ``torch.load(..., weights_only=True)``. Full pickles
and TorchScript archives hold code; they are loaded only behind ``trust=True`` (the CLI's
``--trust-checkpoint``), and only in :func:`_load_trusted`. A failed safe load never falls
back to an unsafe one by itself.

Architectures (the forms ``arch`` accepts, :class:`ModelSpec`, ``build_model``) live in
:mod:`sgcompress.architectures` and are re-exported here.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
from .architectures import (  # noqa: F401  (re-exported: the public API of loading)
    ARCH_FORMS,
    MAX_INPUT_NUMEL,
    PICKLED_MODULE,
    LoadedModel,
    ModelSpec,
    _accepts,
    _resolve,
    _validate_shape,
    build_model,
    classifier_name,
    normalize_arch,
    parse_input_shape,
)

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
MAX_LISTED = 20  # problems listed per kind in a mismatch message (all are counted)


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
