"""Shared by the profiling scripts: torchvision ResNet-50 (seeded random weights), pruned with
SG-CNN (stem and shortcuts dense) and exported compact for one batch size."""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sgcompress.artifact import make_manifest, save_artifact  # noqa: E402
from sgcompress.config import PruneConfig  # noqa: E402
from sgcompress.export import export_compact  # noqa: E402
from sgcompress.loading import ModelSpec  # noqa: E402
from sgcompress.pipeline import prune_model  # noqa: E402
from sgcompress.plan import CompressionPlan  # noqa: E402

SHAPE = (3, 224, 224)


def dense_and_compact(groups: int, ratio: float, batch: int, threads: int,
                      strategy: str = "auto") -> tuple[torch.nn.Module, torch.nn.Module, CompressionPlan]:
    """(dense model, compact model exported for ``batch``, the plan)."""
    torch.manual_seed(0)
    base = torchvision.models.resnet50().eval()
    masked = copy.deepcopy(base)
    res = prune_model(masked, SHAPE, PruneConfig(groups=groups, ratio=ratio))
    spec = ModelSpec("torchvision:resnet50", {}, 1000, SHAPE)
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(tmp) / "pruned"
        save_artifact(art, masked, res.plan, make_manifest(spec, stage="pruned", settings={}, source=None),
                      res.report)
        exp = export_compact(art, None, batch_size=batch, threads=threads, measure=False, strategy=strategy)
    return base, exp.model, res.plan
