"""Layer structure for compact modules: groups of filters sharing a list of inputs.

A *group* is a set of filters (output channels) computed from one list of input
channels. The exact structure is the plan's blocks (filters with identical kept-input
sets). Merging blocks into bigger groups whose inputs are the union keeps the function
identical (the extra connections carry zero weights) and trades a few multiply-adds for
fewer, bigger, faster operations. Everything here is deterministic plain data derived
from a ``LayerPlan`` plus options, so a compact module can be rebuilt without weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError
from ..plan import Block, LayerPlan

MERGES = ("blocks", "labels", "cost")


# A group of the compact form has exactly the shape of a plan block (filters, shared inputs);
# merged groups are unions of blocks.
Group = Block


@dataclass(frozen=True)
class LayerGeometry:
    kind: str  # "conv" | "linear"
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, lp: LayerPlan) -> "LayerGeometry":
        return cls(lp.kind, lp.in_channels, lp.out_channels, tuple(lp.kernel_size), tuple(lp.stride),
                   tuple(lp.padding), tuple(lp.dilation))


def _pad(n: int, tile: int) -> int:
    return -(-n // tile) * tile if tile > 1 else n


def _cost(n_filters: int, n_inputs: int, tile: int, overhead: float) -> float:
    return _pad(n_filters, tile) * n_inputs + overhead


def _groups_from_sets(filters: list[list[int]], masks: np.ndarray) -> tuple[Group, ...]:
    groups = [Group(tuple(sorted(f)), tuple(int(i) for i in np.nonzero(m)[0])) for f, m in zip(filters, masks) if f]
    return tuple(sorted(groups, key=lambda g: g.filters[0]))


def _by_labels(lp: LayerPlan, filters: list[list[int]], masks: np.ndarray):
    if len(lp.labels) != lp.out_channels:
        return filters, masks
    by: dict[int, int] = {}
    nf: list[list[int]] = []
    nm: list[np.ndarray] = []
    for f, m in zip(filters, masks):
        lab = lp.labels[f[0]]
        if lab not in by:
            by[lab] = len(nf)
            nf.append([])
            nm.append(np.zeros_like(m))
        nf[by[lab]].extend(f)
        nm[by[lab]] |= m
    return nf, np.stack(nm) if nm else masks


def _greedy(filters: list[list[int]], masks: np.ndarray, tile: int, overhead: float,
            max_groups: int | None) -> tuple[list[list[int]], np.ndarray]:
    """Merge the pair of groups that lowers the cost most, while that lowers it (or while
    there are more than ``max_groups``)."""
    filters = [list(f) for f in filters]
    masks = masks.copy()
    while len(filters) > 1:
        m = masks.astype(np.int64)
        sizes = m.sum(1)
        inter = m @ m.T
        union = sizes[:, None] + sizes[None, :] - inter
        nf = np.array([len(f) for f in filters])
        padded = -(-(nf[:, None] + nf[None, :]) // tile) * tile if tile > 1 else nf[:, None] + nf[None, :]
        own = np.array([_cost(len(f), int(s), tile, overhead) for f, s in zip(filters, sizes)])
        delta = padded * union + overhead - own[:, None] - own[None, :]
        delta = delta.astype(np.float64)
        np.fill_diagonal(delta, np.inf)
        a, b = np.unravel_index(int(np.argmin(delta)), delta.shape)
        must = max_groups is not None and len(filters) > max_groups
        if delta[a, b] >= 0 and not must:
            break
        a, b = min(a, b), max(a, b)
        filters[a] = filters[a] + filters[b]
        masks[a] |= masks[b]
        del filters[b]
        masks = np.delete(masks, b, axis=0)
    return filters, masks


def layer_groups(lp: LayerPlan, options: dict[str, Any]) -> tuple[Group, ...]:
    """The groups a compact module computes, from the plan's blocks and ``options``:

    - ``merge``: ``"blocks"`` (exact blocks), ``"labels"`` (blocks of one k-means cluster
      of the last step merged) or ``"cost"`` (greedy merging under a cost model,
      starting from the labels when there are many blocks; default);
    - ``tile``: filters are computed in tiles of this many (cost model pads to it);
    - ``overhead``: fixed cost of one group, in connections (cost model);
    - ``max_groups``: merge on until at most this many groups remain.
    """
    merge = options.get("merge", "cost")
    if merge not in MERGES:
        raise ConfigError(f"unknown merge {merge!r}; use one of {', '.join(MERGES)}")
    tile = int(options.get("tile", 1))
    overhead = float(options.get("overhead", 0.0))
    max_groups = options.get("max_groups")
    filters = [list(b.filters) for b in lp.blocks if b.filters]
    masks = np.zeros((len(filters), lp.in_channels), dtype=bool)
    for row, b in enumerate([b for b in lp.blocks if b.filters]):
        masks[row, list(b.inputs)] = True
    if merge == "labels" or (merge == "cost" and len(filters) > 96):
        filters, masks = _by_labels(lp, filters, masks)
    if merge == "cost" or max_groups is not None:
        filters, masks = _greedy(filters, masks, tile, overhead, max_groups if max_groups is None else int(max_groups))
    return _groups_from_sets(filters, masks)


def groups_macs(groups: Sequence[Group], tile: int = 1) -> int:
    """Multiply-adds per output pixel (times k*k) the groups compute, filters padded to ``tile``."""
    return sum(_pad(len(g.filters), tile) * len(g.inputs) for g in groups)
