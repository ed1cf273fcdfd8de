"""Evaluation (top-1/top-5/loss) and BatchNorm statistics re-estimation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from . import dist as D
from .config import EvalResult
from .loaders import check_labels, dataset_len, logits_of, shard, split_batch


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate_sums(model: nn.Module, dataset: Dataset, *, batch_size: int, workers: int,
                  distributed: bool | None = None) -> tuple[float, float, float, int]:
    """(loss sum, top-1 hits, top-5 hits, n) summed over all ranks; model mode is restored."""
    model = _unwrap(model)
    dataset_len(dataset, "evaluation set")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    device = _device_of(model)
    ctx = D.current(device) if distributed in (None, True) else D.DistContext(1, 0, 0, device)
    loader = DataLoader(shard(dataset, ctx), batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    try:
        for batch in loader:
            x, y = split_batch(batch)
            logits = logits_of(model(x.to(device, non_blocking=True)))
            check_labels(y, logits.shape[1])
            y = y.to(device, non_blocking=True)
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == y[:, None]
            part = torch.stack([
                F.cross_entropy(logits.float(), y, reduction="sum").double(),
                hit[:, 0].sum().double(), hit.any(dim=1).sum().double(),
                torch.tensor(float(y.numel()), dtype=torch.float64, device=device),
            ])
            sums += part.cpu()
    finally:
        model.train(was_training)
    loss, c1, c5, n = D.all_sum(ctx, sums).tolist()
    return loss, c1, c5, int(n)


def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 256, workers: int = 0,
             distributed: bool | None = None) -> EvalResult:
    """Top-1/top-5 accuracy (fractions) and mean cross-entropy of ``model`` on ``dataset``.

    Runs on the device the model is on, in eval mode (the model's mode is restored). Under
    torchrun (a process group of more than one rank) every rank evaluates a disjoint shard
    and the sums are reduced, so every rank returns the metrics of the whole dataset; call
    it on every rank then, or pass ``distributed=False`` to evaluate the whole set locally.
    """
    loss, c1, c5, n = evaluate_sums(model, dataset, batch_size=batch_size, workers=workers,
                                    distributed=distributed)
    return EvalResult(top1=c1 / n, top5=c5 / n, loss=loss / n, n=n)


_BN = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def recalibrate_bn(model: nn.Module, dataset: Dataset, *, batches: int, batch_size: int = 128,
                   seed: int = 0, workers: int = 0) -> int:
    """Re-estimate every BatchNorm's running mean/variance from ``batches`` batches of data.

    Labels are not used and no weight changes: running statistics are reset, averaged
    cumulatively (momentum=None) over a seeded shuffled pass with only the BatchNorm layers
    in train mode, then every module's mode and every BatchNorm's momentum are restored.
    All ranks under torchrun draw the same batches (same seed), so their statistics agree.
    Returns the number of images used (0 if the model has no BatchNorm with running stats).
    """
    if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
        raise ConfigError(f"batches must be an integer >= 1, got {batches!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    model = _unwrap(model)
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return 0
    dataset_len(dataset, "calibration set")
    device = _device_of(model)
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen, num_workers=workers)
    used = 0
    # augmentation draws from the global RNG: fork it so the same seed gives the same statistics
    # and the caller's random stream is left as it was
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    rng.__enter__()
    torch.manual_seed(seed)
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for i, batch in enumerate(loader):
            if i == batches:
                break
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(x.to(device, non_blocking=True))
            used += int(x.shape[0])
    finally:
        rng.__exit__(None, None, None)
        for m, mom in momenta.items():
            m.momentum = mom
        for m, training in modes.items():
            m.train(training)
    return used
