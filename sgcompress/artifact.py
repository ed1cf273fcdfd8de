"""The artifact directory that ``sgcompress prune`` writes and every later command reads.

```
out/resnet50-g16-c60/
  plan.json            the compression plan (plan.py), schema-versioned
  weights.safetensors  the masked model's state_dict (same keys as the original model;
                       pruned connections stored as zeros)
  manifest.json        architecture spec + kwargs, input shape, classes, every setting,
                       seed, package versions, stage
  report.json          MACs / params / per-layer figures at the time of writing
```
Everything is plain data or safetensors: reading an artifact never unpickles anything.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from . import _io
from ._version import __version__
from .errors import ArtifactError, StateDictMismatchError
from .loading import ModelSpec, build_model, load_state_dict_strict, read_checkpoint
from .plan import CompressionPlan
from .surgery import apply_plan

FORMAT = "sgcompress-artifact"
FORMAT_VERSION = 1
REQUIRED = ("plan.json", "weights.safetensors", "manifest.json")


@dataclass
class Artifact:
    path: Path
    model: nn.Module
    plan: CompressionPlan
    manifest: dict[str, Any]
    report: dict[str, Any] | None

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.manifest["model"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["model"]["input_shape"])


def package_versions() -> dict[str, str]:
    import fvcore  # noqa: F401  (version via metadata)
    import safetensors
    import sklearn
    import torchvision
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown"

    return {
        "sgcompress": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "scikit-learn": sklearn.__version__,
        "fvcore": v("fvcore"), "safetensors": safetensors.__version__,
    }


def make_manifest(spec: ModelSpec, *, stage: str, settings: dict[str, Any], source: str | None,
                  parent: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a new artifact; ``parent`` is the manifest it was derived from, if any."""
    m = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "stage": stage,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": spec.to_dict(), "source": source, "settings": settings,
        "versions": package_versions(),
    }
    if parent is not None:
        m["history"] = list(parent.get("history", [])) + [
            {k: parent.get(k) for k in ("stage", "created", "settings", "source")}
        ]
    return m


def save_artifact(path: str | Path, model: nn.Module, plan: CompressionPlan, manifest: dict[str, Any],
                  report: dict[str, Any] | None = None, *, overwrite: bool = False,
                  extra_files: dict[str, bytes] | None = None) -> Path:
    """Write an artifact directory atomically (temp dir + rename); returns its path."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ArtifactError(f"{path} already exists; choose another -o or pass --force to replace it")
    check_output_dir(path, overwrite)
    try:
        _write_artifact(path, model, plan, manifest, report, overwrite, extra_files)
    except OSError as e:
        raise ArtifactError(f"cannot write the artifact to {path}: {e.strerror or e}; choose another -o") from e
    return path


def check_output_dir(path: str | Path, overwrite: bool) -> None:
    """Fail before any work if ``path`` cannot become an artifact directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{path} exists and is not a directory; choose another -o")
    if path.exists() and not overwrite:
        raise ArtifactError(f"{path} already exists; choose another -o or pass --force to replace it")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ArtifactError(f"cannot create {path}: {parent} is a file; choose another -o")
            break


def _write_artifact(path, model, plan, manifest, report, overwrite, extra_files) -> None:
    with _io.atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / "plan.json").write_text(plan.to_json())
        save_model(model, str(tmp / "weights.safetensors"), metadata={"format": FORMAT}, force_contiguous=True)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); the artifact is damaged, re-create it") from e


def restore_tied(state: dict, full: dict) -> dict:
    """Safetensors files store a tied tensor once; give ``state`` its other names again, as
    ``full`` (the model's own state_dict) has them. Changes ``state`` in place and returns it."""
    for key, value in full.items():
        if key not in state:
            twin = next((k for k, v in full.items()
                         if k in state and v.data_ptr() == value.data_ptr() and v.shape == value.shape), None)
            if twin is not None:
                state[key] = state[twin]
    return state


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the artifact at ``path``, after checking the directory is one."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist; pass an artifact directory written by `sgcompress prune`")
    if not path.is_dir():
        raise ArtifactError(f"{path} is a file, not an artifact directory; pass the folder `sgcompress prune -o` wrote")
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise ArtifactError(f"{path} is not a complete sgcompress artifact (missing {', '.join(missing)}); "
                            "re-create it with `sgcompress prune`")
    manifest = _read_json(path / "manifest.json")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("model"), dict):
        raise ArtifactError(f"{path}/manifest.json has no model description; the artifact is damaged, re-create it")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}/manifest.json is not an sgcompress artifact manifest of version {FORMAT_VERSION}")
    return manifest


def load_artifact(path: str | Path, *, trust: bool = False) -> Artifact:
    """Rebuild the masked model of an artifact (architecture from the manifest, masks from
    the plan, weights from safetensors), in eval mode on the CPU. Nothing is unpickled,
    except, with ``trust=True``, the original full-module checkpoint of a model that
    was given as a pickled ``nn.Module``.
    """
    path = Path(path)
    manifest = read_manifest(path)
    plan = CompressionPlan.from_json((path / "plan.json").read_text())
    spec = ModelSpec.from_dict(manifest["model"])
    if spec.arch == "pickled-module":
        if not trust:
            raise ArtifactError(f"{path} was made from a pickled nn.Module, which can only be rebuilt from that "
                                "file; pass --trust-checkpoint if you trust it (or re-make it with --arch)")
        model = read_checkpoint(manifest["source"], trust=True)
    else:
        model = build_model(spec)
    apply_plan(model, plan)
    weights = path / "weights.safetensors"
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{weights} cannot be read ({e}); the artifact is damaged, re-create it") from e
    restore_tied(state, model.state_dict())
    try:
        load_state_dict_strict(model, state, source=str(weights))
    except StateDictMismatchError as e:
        raise ArtifactError(f"{path}: weights do not match the architecture in manifest.json: {e}") from e
    report_path = path / "report.json"
    report = _read_json(report_path) if report_path.is_file() else None
    model.eval()
    return Artifact(path, model, plan, manifest, report)


def load(path: str | Path, *, trust: bool = False) -> nn.Module:
    """The ready-to-use model of an sgcompress artifact: the masked model of a pruned or
    fine-tuned artifact (see :func:`load_artifact`), the compact model of an export."""
    if read_manifest(path).get("stage") == "compact":
        from .export import load_compact  # the compact form is built by the export stage

        return load_compact(path)
    return load_artifact(path, trust=trust).model
