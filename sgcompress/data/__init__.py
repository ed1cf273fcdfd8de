"""Real image-classification data for fine-tuning and evaluation, read from local files.

:func:`load_data` turns a spec into a :class:`DataBundle` of train / validation / test
datasets that yield ``(float tensor C x H x W, int label)``. Accepted specs:

``digits``
    scikit-learn's built-in UCI handwritten digits (1,797 images, 8x8, 1 channel,
    10 classes). It has no test split, so a fixed 20 % (stratified, always the same
    images whatever ``seed`` is) is held out as the test set.
an MNIST-style idx folder
    ``train-images-idx3-ubyte[.gz]`` and ``train-labels-idx1-ubyte[.gz]``, optionally
    ``t10k-images-idx3-ubyte[.gz]`` / ``t10k-labels-idx1-ubyte[.gz]`` as the test set,
    in the folder itself or in its ``raw/`` subfolder (MNIST, Fashion-MNIST, e.g.
    ``/usr/share/datasets/fashion-mnist`` from the Debian package
    ``dataset-fashion-mnist``). Files are read with torchvision's idx reader (``.gz``
    files are unpacked to a private temporary file first); the folder is only read,
    never written. A folder whose path contains "fashion" is Fashion-MNIST (published
    statistics, flips allowed), else one containing "mnist" is MNIST (published
    statistics, no flips); any other idx folder gets computed statistics, no flips.
a CIFAR-10 / CIFAR-100 python-format folder
    ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``) or
    ``cifar-100-python`` (``train``, ``test``), given directly or as its parent folder;
    read by ``torchvision.datasets.CIFAR10/100`` with ``download=False``.
    **These files are Python pickles, and unpickling can run code: only load CIFAR
    folders from a source you trust.** The md5 sums of the official archive are not
    checked, so subsets and re-created folders load too.
an image-folder tree
    ``train/<class>/<image>`` plus optionally ``val/<class>/...`` (or ``test/``), used
    as the test set; or just ``<class>/<image>`` (no test set). Read by
    ``torchvision.datasets.ImageFolder``; the classes are those of ``train/``.

The validation split is always held out of the *training* images (seeded, stratified
where every class has at least two images); the test set is never touched for it.

Transforms: channels are converted to the requested count (grayscale <-> RGB), images
are resized to the requested height and width (default: the data's own size), scaled
to [0, 1] and normalized with the data's mean / std (published constants for MNIST,
Fashion-MNIST and CIFAR; computed from up to 2,000 training images otherwise). With
``augment=True`` the training set gets a random crop with zero padding and, where
mirror images are still the same class (not for digits), a random horizontal flip.
Validation and test images are never augmented.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError, DataError
from .cifar import _find_cifar, _load_cifar
from .common import (
    ACCEPTED_LAYOUTS,
    IMAGE_EXTENSIONS,
    KNOWN_STATS,
    DataBundle,
    ImageDataset,
    _check_args,
    _listing,
)
from .digits import _load_digits
from .folder import _has_images, _load_image_folder
from .idx import _IDX_FILES, _find_idx, _load_idx

__all__ = ["DataBundle", "load_data", "ImageDataset", "ACCEPTED_LAYOUTS", "KNOWN_STATS"]


def load_data(
    spec: str,
    *,
    input_shape: tuple[int, int, int] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    augment: bool = True,
    limit: int | None = None,
) -> DataBundle:
    """Load a dataset from ``spec`` ('digits' or a folder; see the module docstring).

    ``input_shape`` (C, H, W) converts channels (C must be 1 or 3) and resizes images;
    None keeps the data's own. ``val_fraction`` of the training images (after ``limit``)
    become the validation set, chosen with ``seed``. ``mean``/``std`` override the
    normalization. ``limit`` keeps only that many training images (a seeded,
    class-balanced choice) for quick runs; the test set is always complete.

    Raises :class:`DataError` for missing / empty / unrecognised folders and shapes the
    data cannot meet, :class:`ConfigError` for invalid arguments.
    """
    shape = _check_args(input_shape, val_fraction, limit, mean, std)
    args = (shape, float(val_fraction), int(seed), mean, std, bool(augment), limit)
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise ConfigError(f"data spec must be 'digits' or a folder path, got {spec!r}; {ACCEPTED_LAYOUTS}")
    if str(spec) == "digits":
        return _load_digits(*args)
    folder = Path(spec).expanduser()
    if not folder.exists():
        raise DataError(f"data folder {folder} does not exist; {ACCEPTED_LAYOUTS}")
    if not folder.is_dir():
        hint = ""
        if any(folder.name.startswith(stem) for stem in _IDX_FILES.values()):
            hint = f" (pass the folder that holds it: {folder.parent})"
        raise DataError(f"data spec {folder} is a file, not a folder{hint}; {ACCEPTED_LAYOUTS}")
    try:
        empty = not any(folder.iterdir())
    except PermissionError as exc:
        raise DataError(f"cannot read data folder {folder}: {exc}") from exc
    if empty:
        raise DataError(f"data folder {folder} is empty; {ACCEPTED_LAYOUTS}")
    idx_files = _find_idx(folder)
    if idx_files is not None:
        return _load_idx(folder, idx_files, *args)
    cifar = _find_cifar(folder)
    if cifar is not None:
        return _load_cifar(folder, cifar[0], cifar[1], *args)
    if (folder / "train").is_dir() or any(p.is_dir() for p in folder.iterdir()):
        if _has_images(folder):
            return _load_image_folder(folder, *args)
        raise DataError(
            f"data folder {folder} has subfolders but no image files ({', '.join(IMAGE_EXTENSIONS)}) "
            f"in them (found: {_listing(folder)}); {ACCEPTED_LAYOUTS}"
        )
    raise DataError(
        f"data folder {folder} holds no recognised dataset (found: {_listing(folder)}); {ACCEPTED_LAYOUTS}"
    )
