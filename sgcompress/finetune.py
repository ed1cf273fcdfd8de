"""Fine-tuning of masked (SG-CNN) models: the public API of the training engine.

- :func:`train`: SGD fine-tuning with pruned connections held at exactly zero, optional
  knowledge distillation, model selection on the validation set, crash-safe resume state,
  SIGINT/SIGTERM handling and torchrun (DistributedDataParallel) support.
- :func:`evaluate`: top-1 / top-5 / loss over a dataset (reduced across ranks).
- :func:`recalibrate_bn`: re-estimate BatchNorm running statistics without labels.

Files of a run (``out_dir``), written by rank 0 only and always atomically:
``best.safetensors`` (best weights by validation top-1; state_dict keys of the model),
``last.pt`` (resume state: tensors and plain data only, ``torch.load(weights_only=True)``),
``train_log.jsonl`` (one JSON record per finished epoch).

The implementation lives in :mod:`sgcompress.training`.
"""

from __future__ import annotations

from .errors import TrainingInterrupted
from .training.config import EvalResult, TrainConfig, TrainResult
from .training.evaluation import evaluate, recalibrate_bn
from .training.io import atomic_save, atomic_write_bytes
from .training.loop import BEST_NAME, LAST_NAME, LOG_NAME, train

__all__ = [
    "BEST_NAME", "LAST_NAME", "LOG_NAME", "EvalResult", "TrainConfig", "TrainResult", "TrainingInterrupted",
    "atomic_save", "atomic_write_bytes", "evaluate", "recalibrate_bn", "train",
]
