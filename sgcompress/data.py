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

import gzip
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sgcompress.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = ["DataBundle", "load_data", "ImageDataset", "ACCEPTED_LAYOUTS", "KNOWN_STATS"]

ACCEPTED_LAYOUTS = (
    "accepted data specs: 'digits' (built-in scikit-learn digits); an idx folder with "
    "train-images-idx3-ubyte[.gz] + train-labels-idx1-ubyte[.gz] (optional t10k-* test files, "
    "e.g. /usr/share/datasets/fashion-mnist); a CIFAR python folder 'cifar-10-batches-py' "
    "(data_batch_1..5, test_batch) or 'cifar-100-python' (train, test) or its parent; an "
    "image-folder tree train/<class>/<images> with optional val/<class>/<images> "
    "(or just <class>/<images>)"
)

# Published per-channel statistics of the training sets (pixel values scaled to [0, 1]).
KNOWN_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MAX_UPSCALE = 8  # larger resize factors are refused: the images would be mostly interpolation
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0
STATS_SAMPLE = 2000


@dataclass(frozen=True)
class DataBundle:
    """Train / validation / test datasets plus what a model needs to know about them."""

    train: Dataset
    val: Dataset
    test: Dataset | None
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str


# --------------------------------------------------------------------------- datasets


class ImageDataset(Dataset):
    """A subset (``indices``) of a raw image source, with its own transform.

    ``source[i]`` returns ``(image, label)`` where image is a PIL image or a uint8
    ``C x H x W`` tensor; ``transform`` turns it into the model's input tensor.
    Several ImageDatasets share one source (train and val differ only in indices and
    transform), so the images are held in memory once.
    """

    def __init__(self, source: Any, indices: Sequence[int], transform: Callable | None) -> None:
        self.source = source
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.source[self.indices[i]]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(label)

    @property
    def targets(self) -> list[int]:
        return [int(self.source.targets[i]) for i in self.indices]


class _TensorSource:
    """uint8 images ``N x C x H x W`` and int64 labels held in memory."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])


# --------------------------------------------------------------------------- transforms


class ToChannels(torch.nn.Module):
    """Convert a ``C x H x W`` image tensor to ``channels`` channels.

    1 -> 3 repeats the gray channel; 3 -> 1 uses ITU-R 601 luma weights; a 4th (alpha)
    channel is dropped; 2 (gray + alpha) keeps the gray channel.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        c = img.shape[-3]
        if c == self.channels:
            return img
        if c == 4:
            img, c = img[..., :3, :, :], 3
        elif c == 2:
            img, c = img[..., :1, :, :], 1
        if c == self.channels:
            return img
        if c == 1:
            return img.expand(*img.shape[:-3], self.channels, *img.shape[-2:]).clone()
        if c == 3 and self.channels == 1:
            from torchvision.transforms.v2 import functional as TF

            return TF.rgb_to_grayscale(img, num_output_channels=1)
        raise DataError(f"cannot convert a {c}-channel image to {self.channels} channels")

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def _build_transform(
    *,
    channels: int,
    size: tuple[int, int],
    native_size: tuple[int, int] | None,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    flip: bool,
) -> Callable:
    """Image (PIL or uint8 tensor) -> normalized float tensor ``channels x H x W``.

    ``native_size`` None means images may differ in size (image folders): they are
    resized on the shorter side and center-cropped, so every output has ``size``.
    """
    from torchvision.transforms import v2

    steps: list[Any] = [v2.ToImage(), ToChannels(channels)]
    if native_size is None:
        steps += [v2.Resize(min(size), antialias=True), v2.CenterCrop(size)]
    elif tuple(native_size) != tuple(size):
        steps.append(v2.Resize(size, antialias=True))
    if train:
        pad = max(1, round(min(size) / 8))
        steps.append(v2.RandomCrop(size, padding=pad))
        if flip:
            steps.append(v2.RandomHorizontalFlip())
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
        v2.ToPureTensor(),
    ]
    return v2.Compose(steps)


# --------------------------------------------------------------------------- helpers


def _check_args(
    input_shape: Any, val_fraction: float, limit: int | None, mean: Any, std: Any
) -> tuple[int, int, int] | None:
    if not (isinstance(val_fraction, (int, float)) and 0.0 < float(val_fraction) < 1.0):
        raise ConfigError(
            f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}; "
            "use e.g. 0.1 to hold out 10 % of the training images for validation"
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 2):
        raise ConfigError(f"limit must be an integer >= 2 (or None for all images), got {limit!r}")
    if (mean is None) != (std is None):
        raise ConfigError("give both mean and std to override the normalization, or neither")
    if input_shape is None:
        return None
    try:
        shape = tuple(int(v) for v in input_shape)
        ok = len(shape) == 3 and all(int(v) == v for v in input_shape)
    except (TypeError, ValueError):
        ok = False
    if not ok or min(shape) < 1:
        raise ConfigError(
            f"input_shape must be three positive integers (C, H, W), e.g. (1, 28, 28) or "
            f"(3, 32, 32), got {input_shape!r}"
        )
    if shape[0] not in (1, 3):
        raise ConfigError(
            f"input_shape asks for {shape[0]} channels, but images convert only to 1 (grayscale) "
            "or 3 (RGB) channels; use C=1 or C=3"
        )
    return shape  # type: ignore[return-value]


def _resolve_size(
    native: tuple[int, int], input_shape: tuple[int, int, int] | None, name: str
) -> tuple[int, int]:
    if input_shape is None:
        return native
    size = (input_shape[1], input_shape[2])
    factor = max(size[0] / native[0], size[1] / native[1])
    if factor > MAX_UPSCALE:
        raise DataError(
            f"input shape {input_shape} needs the {native[0]}x{native[1]} images of {name} "
            f"enlarged {factor:.1f}x (more than {MAX_UPSCALE}x, mostly interpolation); use a "
            f"dataset with larger images or an input size of at most "
            f"{native[0] * MAX_UPSCALE}x{native[1] * MAX_UPSCALE}"
        )
    return size


def _split_train_val(
    targets: np.ndarray, val_fraction: float, seed: int, limit: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (stratified where possible) split of the training indices."""
    idx = np.arange(len(targets))
    if limit is not None and limit < len(idx):
        idx = _seeded_subset(targets, limit, seed)
    n_val = int(round(len(idx) * val_fraction))
    n_val = min(max(n_val, 1), len(idx) - 1)
    if len(idx) < 2:
        raise DataError(
            f"only {len(idx)} training image(s): need at least 2 to hold out a validation split"
        )
    sub = targets[idx]
    _, counts = np.unique(sub, return_counts=True)
    stratify = sub if (counts.min() >= 2 and len(counts) <= n_val <= len(idx) - len(counts)) else None
    from sklearn.model_selection import train_test_split

    tr, va = train_test_split(idx, test_size=n_val, random_state=seed, shuffle=True, stratify=stratify)
    return np.sort(tr), np.sort(va)


def _seeded_subset(targets: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices chosen with a seed, stratified where every class can get one."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(targets))
    _, counts = np.unique(targets, return_counts=True)
    stratify = targets if (counts.min() >= 2 and n >= len(counts) and len(idx) - n >= len(counts)) else None
    keep, _ = train_test_split(idx, train_size=n, random_state=seed, shuffle=True, stratify=stratify)
    return np.sort(keep)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.to(torch.float64) / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def _stats_from_source(
    source: Any,
    indices: np.ndarray,
    channels: int,
    size: tuple[int, int],
    native: tuple[int, int] | None,
    seed: int,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std of up to STATS_SAMPLE training images after channel conversion and resizing."""
    rng = np.random.default_rng(seed)
    pick = indices if len(indices) <= STATS_SAMPLE else rng.choice(indices, STATS_SAMPLE, replace=False)
    if isinstance(source, _TensorSource):
        imgs = ToChannels(channels)(source.images[torch.as_tensor(np.sort(pick))])
        return _channel_stats(imgs)
    geom = _build_transform(channels=channels, size=size, native_size=native, mean=[0.0] * channels,
                            std=[1.0] * channels, train=False, flip=False)
    # geom ends in ToDtype(scale)+Normalize(0, 1): values in [0, 1]
    batch = torch.stack([geom(source[int(i)][0]) for i in pick])
    return _channel_stats(batch * 255.0)


def _resolve_stats(
    known: str | None,
    native_channels: int,
    channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    compute: Callable[[], tuple[tuple[float, ...], tuple[float, ...]]],
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if mean is not None and std is not None:
        m = tuple(float(v) for v in mean)
        s = tuple(float(v) for v in std)
        if len(m) == 1 and channels > 1:
            m, s = m * channels, s * channels
        if len(m) != channels or len(s) != channels:
            raise ConfigError(
                f"mean/std have {len(m)}/{len(s)} values but the images have {channels} channels; "
                f"give {channels} values (or one value used for every channel)"
            )
        if min(s) <= 0:
            raise ConfigError(f"std values must be positive, got {s}")
        return m, s
    if known is not None and known in KNOWN_STATS:
        m, s = KNOWN_STATS[known]
        if native_channels == channels:
            return m, s
        if native_channels == 1 and channels == 3:
            return m * 3, s * 3
    return compute()


def _listing(path: Path, limit: int = 8) -> str:
    try:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError as exc:  # pragma: no cover - permission problems
        return f"(cannot list: {exc})"
    if not entries:
        return "nothing"
    more = f", ... ({len(entries)} entries)" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more


# --------------------------------------------------------------------------- digits


def _load_digits(input_shape, val_fraction, seed, mean, std, augment, limit) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    # values 0..16 -> 0..255 uint8 so every source shares the uint8 image convention
    images = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    targets = torch.from_numpy(d.target.astype(np.int64))
    all_idx = np.arange(len(targets))
    pool, test_idx = train_test_split(
        all_idx, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_TEST_SEED, stratify=d.target
    )
    pool, test_idx = np.sort(pool), np.sort(test_idx)
    source = _TensorSource(images, targets)
    tr, va = _split_train_val(d.target[pool], val_fraction, seed, limit)
    tr, va = pool[tr], pool[va]
    return _finish_tensor_bundle(
        source, tr, va, test_idx, source, num_classes=10, native_channels=1, native=(8, 8),
        input_shape=input_shape, known=None, mean=mean, std=std, augment=augment, flip=False,
        name="digits", seed=seed,
    )


def _finish_tensor_bundle(
    source: Any, tr: np.ndarray, va: np.ndarray, test_idx: np.ndarray | None, test_source: Any, *,
    num_classes: int, native_channels: int, native: tuple[int, int], input_shape, known: str | None,
    mean, std, augment: bool, flip: bool, name: str, seed: int,
) -> DataBundle:
    channels = input_shape[0] if input_shape else native_channels
    size = _resolve_size(native, input_shape, name)
    m, s = _resolve_stats(
        known, native_channels, channels, mean, std,
        lambda: _stats_from_source(source, tr, channels, size, native, seed),
    )
    kw = dict(channels=channels, size=size, native_size=native, mean=m, std=s, flip=flip)
    train_tf = _build_transform(train=augment, **kw)
    eval_tf = _build_transform(train=False, **kw)
    test = None if test_idx is None else ImageDataset(test_source, test_idx, eval_tf)
    return DataBundle(
        train=ImageDataset(source, tr, train_tf), val=ImageDataset(source, va, eval_tf), test=test,
        num_classes=num_classes, in_channels=channels, image_size=size, mean=m, std=s, name=name,
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
    return _finish_tensor_bundle(
        source, tr, va, test_idx, test_source, num_classes=num_classes, native_channels=1,
        native=native, input_shape=input_shape, known=known, mean=mean, std=std, augment=augment,
        flip=flip, name=name, seed=seed,
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
    return _finish_tensor_bundle(
        source, tr, va, np.arange(len(test_source)), test_source, num_classes=num_classes,
        native_channels=3, native=(32, 32), input_shape=input_shape, known=kind, mean=mean, std=std,
        augment=augment, flip=True, name=kind, seed=seed,
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
    ref = native or (min(h for h, _ in sizes), min(w for _, w in sizes))
    size = _resolve_size(ref, input_shape, f"image folder {folder}")
    channels = input_shape[0] if input_shape else native_channels
    targets = np.asarray(train_ds.targets, dtype=np.int64)
    tr, va = _split_train_val(targets, val_fraction, seed, limit)
    m, s = _resolve_stats(
        None, native_channels, channels, mean, std,
        lambda: _stats_from_source(train_ds, tr, channels, size, native, seed),
    )
    kw = dict(channels=channels, size=size, native_size=native, mean=m, std=s, flip=True)
    train_tf = _build_transform(train=augment, **kw)
    eval_tf = _build_transform(train=False, **kw)
    test = None if test_ds is None else ImageDataset(test_ds, range(len(test_ds)), eval_tf)
    return DataBundle(
        train=ImageDataset(train_ds, tr, train_tf), val=ImageDataset(train_ds, va, eval_tf), test=test,
        num_classes=len(train_ds.classes), in_channels=channels, image_size=size, mean=m, std=s,
        name=f"imagefolder:{folder.name}",
    )


# --------------------------------------------------------------------------- entry point


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
