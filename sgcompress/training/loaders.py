"""Reproducible, resumable data loading (torch Datasets of ``(image, label)`` items)."""

from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from ..errors import DataError
from .dist import DistContext
from .state import ignore_sigint_in_worker

_MASK63 = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix-style; no Python hash randomisation)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & _MASK63


def dataset_len(dataset: Any, what: str) -> int:
    if dataset is None:
        raise DataError(f"no {what} given; pass a torch Dataset of (image, label) pairs")
    try:
        n = len(dataset)
    except TypeError as e:
        raise DataError(f"the {what} has no length; pass a map-style torch Dataset") from e
    if n == 0:
        raise DataError(f"the {what} is empty; check the dataset path and split")
    return n


class _SkipSampler(Sampler[int]):
    """The epoch's indices of this rank, minus the first ``skip`` (batches already trained)."""

    def __init__(self, base: DistributedSampler, skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.base)[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


class _PerSampleSeed(Dataset):
    """Seeds the RNGs of a worker before each item from (epoch seed, index), so augmentation
    does not depend on which worker loads an item, nor on a resume in mid-epoch."""

    def __init__(self, dataset: Dataset, epoch_seed: int) -> None:
        self.dataset, self.epoch_seed = dataset, epoch_seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        s = mix_seed(self.epoch_seed, i)
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s % 2**32)
        return self.dataset[i]


def epoch_plan(n: int, ctx: DistContext, batch_size: int, max_steps: int | None) -> tuple[int, bool]:
    """(steps per epoch, drop_last) for a training set of ``n`` images."""
    per_rank = n // ctx.world_size if ctx.distributed else n
    if per_rank == 0:
        raise DataError(f"the training set has {n} images, fewer than the {ctx.world_size} processes")
    drop_last = per_rank >= batch_size
    steps = per_rank // batch_size if drop_last else 1
    return (min(steps, max_steps) if max_steps else steps), drop_last


def train_loader(dataset: Dataset, ctx: DistContext, *, batch_size: int, seed: int, epoch: int,
                 skip_batches: int, drop_last: bool, workers: int) -> DataLoader:
    """The loader of one epoch. The order comes from ``DistributedSampler(seed).set_epoch(epoch)``
    (a torch.Generator seeded with seed + epoch), so a resumed epoch skips exactly the batches done."""
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    # The loader draws its workers' base seed from this generator, never from the global RNG.
    gen = torch.Generator().manual_seed(mix_seed(seed, epoch, 1))
    ds = _PerSampleSeed(dataset, mix_seed(seed, epoch, 2, ctx.rank)) if workers > 0 else dataset
    return DataLoader(ds, batch_size=batch_size, sampler=_SkipSampler(sampler, skip_batches * batch_size),
                      drop_last=drop_last, num_workers=workers, generator=gen,
                      pin_memory=ctx.device.type == "cuda", worker_init_fn=ignore_sigint_in_worker if workers else None)


def shard(dataset: Dataset, ctx: DistContext) -> Dataset:
    """Rank ``r`` of ``w`` gets items r, r+w, ...: every item exactly once over all ranks."""
    if not ctx.distributed:
        return dataset
    return Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))  # type: ignore[arg-type]


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            return x, y
    raise DataError(
        "dataset items must be (image tensor, integer label) pairs; got "
        f"{type(batch).__name__} after collation. Wrap the dataset so __getitem__ returns (x, y)"
    )


def check_labels(y: torch.Tensor, num_classes: int) -> None:
    """Labels must be class indices below the model's output width (checked on the CPU copy)."""
    if y.dim() != 1 or y.is_floating_point():
        raise DataError(f"labels must be a 1-D integer tensor per batch, got dtype {y.dtype} shape {tuple(y.shape)}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(
            f"labels range {lo}..{hi} but the model has {num_classes} outputs; set the number of classes "
            "to match the dataset (e.g. --num-classes) or fix the labels"
        )


def logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, Sequence) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise DataError(f"the model returned {type(out).__name__}; expected a logits tensor")
