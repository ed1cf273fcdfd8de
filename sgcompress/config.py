"""Frozen, validated settings of each stage (stored in the run manifest)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .errors import ConfigError

DEFAULT_FC_CAP = 0.6  # the authors stopped pruning Linear layers at 60 %


@dataclass(frozen=True)
class PruneConfig:
    """Settings of SG-CNN pruning.

    groups: k-means clusters per layer at every step (the authors used 16).
    ratio: fraction of each pruned conv's connections to remove, in [0, 1).
    fc_ratio: the same for Linear layers; None means min(ratio, 0.6).
    steps: number of pruning steps up to ``ratio``; None means one per 0.1 (ratio 0.6 -> 6).
    seed: k-means seed; the same seed gives the same plan.
    include / exclude: glob patterns of module names (see selection.py).
    target_macs: instead of ``ratio``, the fraction of the original MACs to end at or below.
    n_init / max_iter: k-means restarts and iterations (the authors': 10 and 300).
    round_to: after the last step, round every group's kept inputs to a multiple of this.
    """

    groups: int = 4
    ratio: float = 0.5
    fc_ratio: float | None = None
    steps: int | None = None
    seed: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    target_macs: float | None = None
    n_init: int = 10
    max_iter: int = 300
    round_to: int = 1  # round every group's kept inputs to a multiple of this (1: no rounding)

    def __post_init__(self) -> None:
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ConfigError(f"groups={self.groups!r} must be a whole number >= 1 (try --groups 4)")
        if not (0.0 <= self.ratio < 1.0):
            raise ConfigError(f"ratio={self.ratio!r} must be in [0, 1): the fraction of connections to remove, e.g. --ratio 0.6")
        if self.fc_ratio is not None and not (0.0 <= self.fc_ratio < 1.0):
            raise ConfigError(f"fc_ratio={self.fc_ratio!r} must be in [0, 1), e.g. --fc-ratio 0.6")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ConfigError(f"steps={self.steps!r} must be a whole number >= 1 (--steps N)")
        if self.target_macs is not None and not (0.0 < self.target_macs <= 1.0):
            raise ConfigError(
                f"target_macs={self.target_macs!r} must be in (0, 1]: the fraction of the original MACs to keep, e.g. --target-macs 0.5"
            )
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"round_to={self.round_to!r} must be a whole number >= 1 (--round-to 8)")
        if self.n_init < 1 or self.max_iter < 1:
            raise ConfigError("n_init and max_iter must be >= 1")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def effective_fc_ratio(self) -> float:
        return min(self.ratio, DEFAULT_FC_CAP) if self.fc_ratio is None else self.fc_ratio

    @property
    def n_steps(self) -> int:
        if self.ratio == 0:
            return 0
        return self.steps if self.steps is not None else max(1, math.ceil(round(self.ratio / 0.1, 9)))

    def conv_schedule(self) -> list[float]:
        """Cumulative conv sparsity after each step (the authors: 0.1, 0.2, ... ratio)."""
        n = self.n_steps
        return [round(self.ratio * (s + 1) / n, 6) for s in range(n)]

    def fc_schedule(self) -> list[float]:
        """Cumulative Linear sparsity after each step: follows the conv schedule, capped at fc_ratio."""
        fc = self.effective_fc_ratio
        conv = self.conv_schedule()
        if fc <= self.ratio:
            return [min(c, fc) for c in conv]
        n = len(conv)
        return [round(fc * (s + 1) / n, 6) for s in range(n)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PruneConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k in ("include", "exclude") else v) for k, v in d.items() if k in names})
