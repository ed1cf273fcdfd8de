"""MNIST-style idx folders (MNIST, Fashion-MNIST)."""

from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .common import (
    DataBundle,
    _finish_bundle,
    _listing,
    _split_train_val,
    _TensorSource,
)

# --------------------------------------------------------------------------- idx (MNIST)

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx(folder: Path) -> dict[str, Path] | None:
    for base in (folder, folder / "raw"):
        found: dict[str, Path] = {}
        for key, stem in _IDX_FILES.items():
            for cand in (base / stem, base / (stem + ".gz")):
                if cand.is_file():
                    found[key] = cand
                    break
        if "train_images" in found or "train_labels" in found:
            return found
    return None


def _read_idx(path: Path, images: bool) -> torch.Tensor:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    reader = read_image_file if images else read_label_file
    try:
        if path.suffix == ".gz":
            # torchvision's reader opens plain files only: unpack into a private temp file
            # (the data folder itself is read-only and is never written).
            with tempfile.TemporaryDirectory(prefix="sgcompress-idx-") as tmp:
                plain = Path(tmp) / path.stem
                with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
                return reader(str(plain)).clone()
        return reader(str(path))
    except (OSError, EOFError, AssertionError, TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise DataError(
            f"cannot read idx file {path}: {type(exc).__name__}: {exc}; the file is damaged or "
            "not in MNIST idx format (re-install/re-download it)"
        ) from exc


def _load_idx(folder: Path, files: dict[str, Path], input_shape, val_fraction, seed, mean, std,
              augment, limit) -> DataBundle:
    for key in ("train_images", "train_labels"):
        if key not in files:
            raise DataError(
                f"idx folder {folder} has no {_IDX_FILES[key]}[.gz] (found: {_listing(folder)}); "
                "an MNIST-style folder needs both train-images-idx3-ubyte and train-labels-idx1-ubyte"
            )
    has_test = "test_images" in files and "test_labels" in files
    if ("test_images" in files) != ("test_labels" in files):
        raise DataError(
            f"idx folder {folder} has only one of t10k-images-idx3-ubyte / t10k-labels-idx1-ubyte; "
            "add the missing one or remove the other"
        )

    def read_pair(ik: str, lk: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = _read_idx(files[ik], images=True)
        y = _read_idx(files[lk], images=False).to(torch.int64)
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"{files[ik].name} holds {x.shape[0]} images but {files[lk].name} holds {y.shape[0]} "
                "labels; the files do not belong together"
            )
        if x.shape[0] == 0:
            raise DataError(f"{files[ik]} holds no images")
        return x.unsqueeze(1).contiguous(), y

    x_tr, y_tr = read_pair("train_images", "train_labels")
    num_classes = int(y_tr.max()) + 1
    if int(y_tr.min()) < 0:
        raise DataError(f"{files['train_labels']} has negative labels")
    test_source = None
    if has_test:
        x_te, y_te = read_pair("test_images", "test_labels")
        if x_te.shape[1:] != x_tr.shape[1:]:
            raise DataError(
                f"test images are {tuple(x_te.shape[2:])} but training images {tuple(x_tr.shape[2:])}"
            )
        if int(y_te.max()) >= num_classes or int(y_te.min()) < 0:
            raise DataError(f"test labels go outside the training labels 0..{num_classes - 1}")
        test_source = _TensorSource(x_te, y_te)
    lowered = str(folder.resolve()).lower()
    if "fashion" in lowered:
        name, known, flip = "fashion-mnist", "fashion-mnist", True
    elif "mnist" in lowered:
        name, known, flip = "mnist", "mnist", False
    else:
        name, known, flip = f"idx:{folder.name}", None, False
    source = _TensorSource(x_tr, y_tr)
    tr, va = _split_train_val(y_tr.numpy(), val_fraction, seed, limit)
    native = (int(x_tr.shape[2]), int(x_tr.shape[3]))
    test_idx = np.arange(len(test_source)) if test_source is not None else None
    return _finish_bundle(
        source, tr, va, test_idx, test_source, num_classes=num_classes, native_channels=1,
        native=native, input_shape=input_shape, known=known, mean=mean, std=std, augment=augment,
        flip=flip, name=name, seed=seed,
    )
