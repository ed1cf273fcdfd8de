"""Image-folder trees read by torchvision's ImageFolder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .common import (
    ACCEPTED_LAYOUTS,
    IMAGE_EXTENSIONS,
    DataBundle,
    _finish_bundle,
    _listing,
    _split_train_val,
)

# --------------------------------------------------------------------------- image folders


def _has_images(folder: Path) -> bool:
    for _, _, files in os.walk(folder):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            return True
    return False


def _pil_loader(path: str) -> Any:
    """Open an image keeping grayscale as 'L' and everything else as 'RGB'."""
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode in ("L", "1", "I", "I;16", "F", "LA"):
        return img.convert("L")
    return img.convert("RGB")


def _image_folder(root: Path, classes: list[str] | None = None) -> Any:
    from torchvision.datasets import ImageFolder

    class _Folder(ImageFolder):
        def find_classes(self, directory):  # type: ignore[override]
            if classes is None:
                return super().find_classes(directory)
            return list(classes), {c: i for i, c in enumerate(classes)}

    return _Folder(str(root), loader=_pil_loader, allow_empty=classes is not None,
                   is_valid_file=lambda p: p.lower().endswith(IMAGE_EXTENSIONS))


def _load_image_folder(folder: Path, input_shape, val_fraction, seed, mean, std, augment,
                       limit) -> DataBundle:
    train_dir = folder / "train" if (folder / "train").is_dir() else folder
    test_dir = None
    if train_dir != folder:
        for cand in ("val", "test"):
            if (folder / cand).is_dir():
                test_dir = folder / cand
                break
    class_dirs = [p for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not class_dirs:
        raise DataError(
            f"image folder {train_dir} has no class subfolders (found: {_listing(train_dir)}); "
            f"put the images in {train_dir}/<class name>/ ; " + ACCEPTED_LAYOUTS
        )
    try:
        train_ds = _image_folder(train_dir)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(
            f"no images in the class folders of {train_dir} ({exc}); images must be "
            f"{', '.join(IMAGE_EXTENSIONS)} files inside {train_dir}/<class name>/"
        ) from exc
    if len(train_ds) == 0 or len(train_ds.classes) == 0:
        raise DataError(f"image folder {train_dir} holds no images in class subfolders")
    if len(train_ds.classes) < 2:
        raise DataError(
            f"image folder {train_dir} has only one class ({train_ds.classes[0]!r}); a classifier "
            "needs at least two class subfolders"
        )
    test_ds = None
    if test_dir is not None:
        extra = sorted(
            p.name for p in test_dir.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name not in train_ds.class_to_idx
        )
        if extra:
            raise DataError(
                f"{test_dir} has class folders that {train_dir} lacks: {', '.join(extra[:5])}; "
                "the test classes must be a subset of the training classes"
            )
        test_ds = _image_folder(test_dir, classes=list(train_ds.classes))
        if len(test_ds) == 0:
            raise DataError(f"{test_dir} holds no images; remove the folder or add <class>/<images>")

    # native size and channels from a few images
    rng = np.random.default_rng(0)
    probe = rng.choice(len(train_ds), min(32, len(train_ds)), replace=False)
    sizes, modes = set(), set()
    for i in probe:
        img = train_ds.loader(train_ds.samples[int(i)][0])
        sizes.add((img.height, img.width))
        modes.add(img.mode)
    native_channels = 1 if modes == {"L"} else 3
    if input_shape is None and len(sizes) > 1:
        raise DataError(
            f"images in {train_dir} have different sizes "
            f"({', '.join(f'{h}x{w}' for h, w in sorted(sizes)[:4])}); "
            "give input_shape (e.g. (3, 224, 224)) so they are resized to one size"
        )
    native = next(iter(sizes)) if len(sizes) == 1 else None
    targets = np.asarray(train_ds.targets, dtype=np.int64)
    tr, va = _split_train_val(targets, val_fraction, seed, limit)
    return _finish_bundle(
        train_ds, tr, va, None if test_ds is None else range(len(test_ds)), test_ds,
        num_classes=len(train_ds.classes), native_channels=native_channels, native=native,
        input_shape=input_shape, known=None, mean=mean, std=std, augment=augment, flip=True,
        name=f"imagefolder:{folder.name}", seed=seed,
        ref_size=(min(h for h, _ in sizes), min(w for _, w in sizes)), what=f"image folder {folder}",
    )
