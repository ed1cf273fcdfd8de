"""CIFAR-10 / CIFAR-100 python-format folders (pickles: trusted sources only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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

# --------------------------------------------------------------------------- CIFAR


def _cifar_classes():
    from torchvision.datasets import CIFAR10, CIFAR100

    def make(base: type) -> type:
        class _LocalCifar(base):  # type: ignore[misc, valid-type]
            # The files must exist; the md5 sums of the official archive are not required
            # so that subsets and re-created folders load. Never downloads.
            def _check_integrity(self) -> bool:
                return all(
                    os.path.isfile(os.path.join(self.root, self.base_folder, f))
                    for f, _ in self.train_list + self.test_list
                )

            def _load_meta(self) -> None:
                n = 100 if issubclass(base, CIFAR100) else 10
                path = os.path.join(self.root, self.base_folder, self.meta["filename"])
                self.classes = [str(i) for i in range(n)]
                if os.path.isfile(path):
                    import pickle

                    with open(path, "rb") as f:
                        meta = pickle.load(f, encoding="latin1")
                    names = meta.get(self.meta["key"]) if isinstance(meta, dict) else None
                    if isinstance(names, list) and len(names) == n:
                        self.classes = [str(c) for c in names]
                self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        _LocalCifar.__name__ = f"Local{base.__name__}"
        return _LocalCifar

    return make(CIFAR10), make(CIFAR100)


_CIFAR_DIRS = {"cifar-10-batches-py": "cifar10", "cifar-100-python": "cifar100"}


def _find_cifar(folder: Path) -> tuple[Path, str] | None:
    """(root to give torchvision, 'cifar10'|'cifar100') if folder is or holds a CIFAR folder."""
    if folder.name in _CIFAR_DIRS and folder.is_dir():
        return folder.parent, _CIFAR_DIRS[folder.name]
    for sub, kind in _CIFAR_DIRS.items():
        if (folder / sub).is_dir():
            return folder, kind
    # a renamed CIFAR folder: recognise it by its files
    if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
        return None if folder.name == "cifar-10-batches-py" else (folder, "cifar10-renamed")
    return None


def _load_cifar(folder: Path, root: Path, kind: str, input_shape, val_fraction, seed, mean, std,
                augment, limit) -> DataBundle:
    if kind == "cifar10-renamed":
        raise DataError(
            f"{folder} looks like CIFAR-10 batches but torchvision needs the folder to be named "
            "'cifar-10-batches-py'; rename it (or pass its parent after renaming)"
        )
    c10, c100 = _cifar_classes()
    cls = c10 if kind == "cifar10" else c100
    base = root / cls.base_folder
    missing = [f for f, _ in cls.train_list + cls.test_list if not (base / f).is_file()]
    if missing:
        raise DataError(
            f"CIFAR folder {base} is missing {', '.join(missing)} (found: {_listing(base)}); "
            + ("CIFAR-10 needs data_batch_1..5 and test_batch" if kind == "cifar10"
               else "CIFAR-100 needs train and test")
        )
    try:
        train_ds = cls(str(root), train=True, download=False)
        test_ds = cls(str(root), train=False, download=False)
    except Exception as exc:  # pickle / reshape errors of a damaged folder
        raise DataError(
            f"cannot read CIFAR folder {base}: {type(exc).__name__}: {exc}; the files are damaged "
            "or not the CIFAR python format (re-extract the official archive)"
        ) from exc

    def to_source(ds: Any) -> _TensorSource:
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return _TensorSource(x, torch.as_tensor(ds.targets, dtype=torch.int64))

    source, test_source = to_source(train_ds), to_source(test_ds)
    if len(source) == 0:
        raise DataError(f"CIFAR folder {base} holds no training images")
    num_classes = len(train_ds.classes)
    if int(source.targets.max()) >= num_classes:
        raise DataError(f"CIFAR labels in {base} go beyond {num_classes - 1}")
    tr, va = _split_train_val(source.targets.numpy(), val_fraction, seed, limit)
    return _finish_bundle(
        source, tr, va, np.arange(len(test_source)), test_source, num_classes=num_classes,
        native_channels=3, native=(32, 32), input_shape=input_shape, known=kind, mean=mean, std=std,
        augment=augment, flip=True, name=kind, seed=seed,
    )
