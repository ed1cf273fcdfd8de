"""Crash-safe file writes and the on-disk formats of a training run.

Every file is written atomically: a temp file in the same folder, flush + fsync,
``os.replace``, then fsync of the folder. A crash or a full disk at any moment leaves
either the old file or the new one, never a torn one, and no temp file behind.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as _st_load_file
from safetensors.torch import save as _st_save
from torch import nn

from .._io import atomic_write_bytes, fsync_dir  # noqa: F401  (re-exported)
from ..errors import CheckpointError

def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (tensors and plain data only, by convention)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: Path) -> dict[str, Any]:
    """Load a resume state written by :func:`atomic_save` (``weights_only=True``, never a pickle)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, bit-flipped, or holding objects beyond tensors/plain data
        raise CheckpointError(
            f"cannot read the resume state {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "Delete it and start the run again without resume, or restore it from a backup."
        ) from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not an sgcompress training state; start without resume or pick its out_dir")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(
            f"{path} has training-state version {state.get('version')!r}, this sgcompress reads {STATE_VERSION}; "
            "resume with the sgcompress version that wrote it, or start again"
        )
    return state


STATE_FORMAT = "sgcompress-train-state"
STATE_VERSION = 1


def weights_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict as cloned, contiguous CPU tensors (tied tensors become copies)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def save_weights(model_or_weights: nn.Module | dict[str, torch.Tensor], path: Path,
                 metadata: dict[str, str] | None = None) -> None:
    """Write weights as safetensors, atomically."""
    w = model_or_weights if isinstance(model_or_weights, dict) else weights_dict(model_or_weights)
    w = {k: v.detach().to("cpu").contiguous().clone() for k, v in w.items()}
    atomic_write_bytes(path, _st_save(w, metadata=metadata))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return _st_load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read the weights file {path}: {e}; train again without resume") from e


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def json_line(record: dict[str, Any]) -> str:
    return json.dumps(_json_safe(record), allow_nan=False, sort_keys=False) + "\n"


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it (a torn last line is repaired on resume)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json_line(record))
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(json_line(r) for r in records).encode("utf-8"))
