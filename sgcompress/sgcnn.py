"""The self-grouping pruning algorithm (SG-CNN), as the authors' code runs it.

Per pruning step and per layer (method doc, "Algorithm"):
1. importance ``V = masked L1`` of every connection (importance.py);
2. k-means of the filters' importance vectors into ``groups`` clusters (grouping.py);
3. threshold: the ``cp``-th percentile of the matrix whose row j is the centroid of j's
   cluster times the current mask row of the cluster's first member;
4. cluster c keeps input i iff ``centroid_c[i] * mask_first_c[i] > threshold``; the new
   mask is multiplied into the old one (cumulative).
The schedule raises ``cp`` step by step (config.py), re-clustering every time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import PruneConfig
from .grouping import cluster_filters
from .importance import connection_l1
from .layers import MASKED_TYPES, MaskedConv2d
from .plan import CompressionPlan, LayerPlan, SkippedLayer, blocks_from_mask


@dataclass(frozen=True)
class StepResult:
    mask: torch.Tensor  # new cumulative (C_out, C_in) mask
    labels: np.ndarray  # cluster of every filter at this step
    threshold: float


def prune_step(weight: torch.Tensor, mask: torch.Tensor, n_clusters: int, cp: float, *,
               seed: int = 0, n_init: int = 10, max_iter: int = 300) -> StepResult:
    """One SG-CNN step on one layer: cluster, threshold at the ``cp`` percentile, prune."""
    mask64 = mask.detach().to(torch.float64).cpu()
    importance = connection_l1(weight.cpu(), mask64).numpy()
    clustering = cluster_filters(importance, n_clusters, seed=seed, n_init=n_init, max_iter=max_iter)
    labels = clustering.labels
    present, first_member = np.unique(labels, return_index=True)
    first_of = np.zeros(clustering.centroids.shape[0], dtype=np.int64)
    first_of[present] = first_member
    m = mask64.numpy()
    rows = clustering.centroids[labels] * m[first_of[labels]]  # member-replicated centroids
    threshold = float(np.percentile(rows, cp * 100.0))
    keep = rows > threshold
    new_mask = torch.from_numpy(m * keep).to(mask.dtype)
    return StepResult(new_mask, labels, threshold)


def round_kept_inputs(mask: torch.Tensor, importance: torch.Tensor, multiple: int) -> torch.Tensor:
    """Round every group's kept-input count to the nearest multiple of ``multiple``.

    A group is a set of filters with identical mask rows. Rounding up adds the group's most
    important pruned inputs (importance summed over its filters, from the original weights);
    rounding down drops its least important kept ones. A group that keeps any input keeps
    at least ``multiple`` (if the layer has that many). Odd widths are slow on most
    kernels; the cost of rounding down shows in the accuracy after pruning.
    """
    new = mask.clone()
    c_in = mask.shape[1]
    rows = (mask != 0).numpy()
    groups: dict[bytes, list[int]] = {}
    for j, row in enumerate(rows):
        groups.setdefault(row.tobytes(), []).append(j)
    for filters in groups.values():
        kept = rows[filters[0]]
        k = int(kept.sum())
        if k == 0:
            continue
        target = min(c_in, max(multiple, multiple * round(k / multiple)))
        if target == k:
            continue
        score = importance[filters].sum(0).numpy()
        if target > k:
            order = [i for i in np.argsort(-score, kind="stable") if not kept[i]][: target - k]
            new[np.ix_(filters, order)] = 1.0
        else:
            order = [i for i in np.argsort(score, kind="stable") if kept[i]][: k - target]
            new[np.ix_(filters, order)] = 0.0
    return new


ProgressFn = Callable[[dict], None]


def sgcnn_prune(
    model: nn.Module,
    targets: list[str] | tuple[str, ...],
    config: PruneConfig,
    *,
    kinds: dict[str, str],
    skipped: tuple[SkippedLayer, ...] = (),
    after_step: Callable[[int, float], None] | None = None,
    progress: ProgressFn | None = None,
) -> CompressionPlan:
    """Run the whole schedule on the masked layers ``targets`` of ``model`` (in place).

    Args:
        model: a model whose ``targets`` are already MaskedConv2d/MaskedLinear.
        targets: layer names to prune, in execution order.
        kinds: layer name -> "conv" or "linear".
        after_step: called as ``after_step(step_index, conv_cp)`` after every step (the L
            scheme fine-tunes there).
        progress: receives ``{"event": "layer", "step", "steps", "layer", "cp"}`` dicts.
    Returns:
        The plan: final masks as blocks, last-step cluster labels, the settings.
    """
    conv_sched, fc_sched = config.conv_schedule(), config.fc_schedule()
    modules = {name: model.get_submodule(name) for name in targets}
    for name, mod in modules.items():
        if not isinstance(mod, MASKED_TYPES):
            raise TypeError(f"layer {name!r} is not masked; convert it with surgery.to_masked first")
    labels: dict[str, np.ndarray] = {n: np.zeros(m.connection_mask.shape[0], dtype=np.int64) for n, m in modules.items()}
    originals = {n: m.weight.detach().clone() for n, m in modules.items()} if config.round_to > 1 else {}
    done_cp: dict[str, float] = {n: 0.0 for n in targets}
    n_steps = len(conv_sched)
    for s in range(n_steps):
        for name in targets:
            mod = modules[name]
            cp = conv_sched[s] if kinds[name] == "conv" else fc_sched[s]
            if cp <= done_cp[name]:
                continue  # capped (Linear layers stop at fc_ratio)
            if progress:
                progress({"event": "layer", "step": s + 1, "steps": n_steps, "layer": name, "cp": cp})
            res = prune_step(mod.weight, mod.connection_mask, config.groups, cp,
                             seed=config.seed, n_init=config.n_init, max_iter=config.max_iter)
            mod.set_mask(res.mask)
            labels[name] = res.labels
            done_cp[name] = cp
        if config.round_to > 1 and s == n_steps - 1:
            for name, mod in modules.items():
                rounded = round_kept_inputs(mod.connection_mask.cpu(), connection_l1(originals[name]),
                                            config.round_to)
                added = (rounded.to(mod.connection_mask) > mod.connection_mask).view(*rounded.shape, *[1] * (mod.weight.dim() - 2))
                with torch.no_grad():  # only connections brought back get their pretrained values
                    mod.weight.copy_(torch.where(added, originals[name], mod.weight))
                mod.set_mask(rounded.to(mod.connection_mask))
        if after_step is not None:
            after_step(s, conv_sched[s])

    layer_plans = []
    for name in targets:
        mod = modules[name]
        is_conv = isinstance(mod, MaskedConv2d)
        layer_plans.append(LayerPlan(
            name=name, kind="conv" if is_conv else "linear",
            in_channels=mod.connection_mask.shape[1], out_channels=mod.connection_mask.shape[0],
            kernel_size=tuple(mod.kernel_size) if is_conv else (1, 1),
            stride=tuple(mod.stride) if is_conv else (1, 1),
            padding=tuple(mod.padding) if is_conv and not isinstance(mod.padding, str) else (0, 0),
            dilation=tuple(mod.dilation) if is_conv else (1, 1),
            n_clusters=config.groups,
            ratio=conv_sched[-1] if is_conv and conv_sched else (fc_sched[-1] if fc_sched else 0.0),
            labels=tuple(int(x) for x in labels[name]),
            blocks=blocks_from_mask(mod.connection_mask),
        ))
    settings = config.to_dict()
    settings["conv_schedule"], settings["fc_schedule"] = conv_sched, fc_sched
    return CompressionPlan(method="sgcnn", layers=tuple(layer_plans), skipped=tuple(skipped), settings=settings)
