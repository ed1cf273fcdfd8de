"""Settings and results of a fine-tuning run (plain data, JSON-able for the run manifest)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError

SCHEDULES = ("step", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune. Defaults are the SG-CNN authors' settings (except the epoch count)."""

    # Number of passes over the training set.
    epochs: int = 10
    # Initial learning rate of SGD.
    lr: float = 0.01
    # SGD momentum (the buffers live for the whole run and are part of the resume state).
    momentum: float = 0.9
    # Nesterov momentum instead of heavy-ball (needs momentum > 0).
    nesterov: bool = False
    # L2 weight decay of SGD (pruned weights are zero, so it leaves them at zero).
    weight_decay: float = 1e-4
    # Learning-rate schedule, set once per epoch: "step" divides lr by 10 at 1/3 and at
    # 2/3 of the epochs (the authors'); "cosine" anneals from lr towards 0.
    schedule: str = "step"
    # Images per optimizer step on each process (per rank under torchrun).
    batch_size: int = 128
    # Seed of everything random in the run: data order, augmentation, dropout.
    seed: int = 0
    # DataLoader worker processes (0 = load in the training process).
    workers: int = 0
    # Knowledge distillation from a teacher model (the unpruned network).
    distill: bool = False
    # Softmax temperature T of the distillation term.
    distill_temperature: float = 4.0
    # Weight w of the distillation term: loss = (1-w)*CE + w*T^2*KL(teacher || student).
    distill_weight: float = 0.5
    # Cap on optimizer steps per epoch (demos and tests); None = the whole training set.
    max_steps_per_epoch: int | None = None
    # Label smoothing of the cross-entropy term (0 = plain cross-entropy).
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        problems = []

        def need(ok: bool, text: str) -> None:
            if not ok:
                problems.append(text)

        need(_is_int(self.epochs) and self.epochs >= 1, f"epochs must be an integer >= 1, got {self.epochs!r}")
        need(_is_num(self.lr) and 0 < self.lr < math.inf, f"lr must be a positive number, got {self.lr!r}")
        need(_is_num(self.momentum) and 0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum!r}")
        need(isinstance(self.nesterov, bool), f"nesterov must be true/false, got {self.nesterov!r}")
        need(not (self.nesterov is True and _is_num(self.momentum) and self.momentum == 0),
             "nesterov needs momentum > 0 (set momentum, e.g. 0.9, or turn nesterov off)")
        need(_is_num(self.weight_decay) and 0 <= self.weight_decay < math.inf,
             f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        need(_is_int(self.batch_size) and self.batch_size >= 1, f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        need(_is_int(self.seed) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")
        need(_is_int(self.workers) and self.workers >= 0, f"workers must be an integer >= 0, got {self.workers!r}")
        need(isinstance(self.distill, bool), f"distill must be true/false, got {self.distill!r}")
        need(_is_num(self.distill_temperature) and 0 < self.distill_temperature < math.inf,
             f"distill_temperature must be > 0, got {self.distill_temperature!r}")
        need(_is_num(self.distill_weight) and 0 <= self.distill_weight <= 1,
             f"distill_weight must be in [0, 1], got {self.distill_weight!r}")
        need(self.max_steps_per_epoch is None or (_is_int(self.max_steps_per_epoch) and self.max_steps_per_epoch >= 1),
             f"max_steps_per_epoch must be None or an integer >= 1, got {self.max_steps_per_epoch!r}")
        need(_is_num(self.label_smoothing) and 0 <= self.label_smoothing < 1,
             f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if problems:
            raise ConfigError("invalid training settings: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys are an error."""
        if not isinstance(data, dict):
            raise ConfigError(f"training settings must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 0-based ``epoch``."""
        if self.schedule == "step":
            # Milestones at ceil(E/3) and ceil(2E/3): 90 epochs -> 30, 60; 10 -> 4, 7; 1 -> none.
            milestones = [math.ceil(self.epochs * k / 3) for k in (1, 2)]
            return self.lr * 0.1 ** sum(epoch >= m for m in milestones)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


@dataclass(frozen=True)
class EvalResult:
    """Metrics over a whole dataset (summed over all ranks under torchrun)."""

    top1: float  # fraction of images whose highest logit is the label, in [0, 1]
    top5: float  # fraction whose label is among the 5 highest logits (all logits if < 5 classes)
    loss: float  # mean cross-entropy per image
    n: int  # number of images evaluated

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`sgcompress.finetune.train` did. Epoch numbers are 1-based, as in the log."""

    best: dict[str, Any]  # the log record of the epoch with the best validation top-1
    final: dict[str, Any]  # the log record of the last epoch
    history: list[dict[str, Any]]  # every epoch's log record, in order
    best_weights: Path  # safetensors file with the best weights (state_dict keys of the model)
    last_state: Path  # resume state after the last epoch (torch.load(weights_only=True))
    log: Path  # train_log.jsonl
    resumed_from: dict[str, int] | None  # {"epoch", "step"} where this call resumed, else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("best_weights", "last_state", "log"):
            d[k] = str(d[k])
        return d
