"""Shared parts of the dataset readers: datasets, transforms, splits and statistics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError

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


def _finish_bundle(
    source: Any, tr: np.ndarray, va: np.ndarray, test_idx: Any, test_source: Any, *,
    num_classes: int, native_channels: int, native: tuple[int, int] | None, input_shape, known: str | None,
    mean, std, augment: bool, flip: bool, name: str, seed: int, ref_size: tuple[int, int] | None = None,
    what: str | None = None,
) -> DataBundle:
    """Resolve size, channels and statistics, build the transforms and the three datasets.

    ``native`` is the images' common size (None if they differ: then ``ref_size`` stands in
    for it and ``input_shape`` must resize them); ``what`` names the data in messages."""
    channels = input_shape[0] if input_shape else native_channels
    size = _resolve_size(native or ref_size, input_shape, what or name)
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
