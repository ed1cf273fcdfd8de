"""The built-in demo: the whole pipeline on a small real pretrained model and real data.

The package ships ResNet-20 trained on Fashion-MNIST (``assets/``, trained by
``scripts/train_zoo_model.py``). The demo evaluates it, prunes it with SG-CNN,
re-estimates BatchNorm, fine-tunes it globally on part of the training set, exports the
compact model and measures its latency against the dense one, and returns every figure.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .config import PruneConfig
from .errors import DataError
from .finetune import TrainConfig

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
ASSET = "resnet20_fashion_mnist"


def shipped_model() -> tuple[Path, dict[str, Any]]:
    """Path of the shipped checkpoint and its description (arch, input shape, accuracy)."""
    folder = resources.files("sgcompress") / "assets"
    weights = Path(str(folder / f"{ASSET}.safetensors"))
    meta = json.loads((folder / f"{ASSET}.json").read_text())
    return weights, meta


@dataclass(frozen=True)
class DemoConfig:
    data: str = DEFAULT_DATA  # Fashion-MNIST idx folder (Debian package dataset-fashion-mnist)
    output: str = "sgcompress-demo"  # folder for the artifacts
    groups: int = 4
    ratio: float = 0.5
    epochs: int = 1  # global fine-tuning epochs
    train_images: int = 12000  # training images used for fine-tuning (a subset keeps it short)
    lr: float = 0.01
    bn_batches: int = 4
    seed: int = 0
    latency_batches: tuple[int, ...] = (1, 64)
    threads: int | None = None
    export: bool = True


@dataclass
class DemoResult:
    steps: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def run_demo(cfg: DemoConfig, *, progress: Callable[[dict], None] | None = None,
             callback: Callable[[dict], None] | None = None) -> DemoResult:
    """Run analyze -> prune -> fine-tune -> export/report; ``progress`` gets one event per stage."""
    from .data import load_data
    from .loading import load_model
    from .pipeline import analyze
    from .tuning import accuracy, finetune, prune_with_data

    def stage(name: str, **data) -> None:
        if progress:
            progress({"kind": "stage", "stage": name, **data})

    out = Path(cfg.output)
    weights, meta = shipped_model()
    shape = tuple(meta["input_shape"])
    if not Path(cfg.data).exists():
        raise DataError(f"the demo's data {cfg.data} is missing: install Fashion-MNIST with "
                        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass --data to its folder")
    stage("load", model=str(weights), data=cfg.data)
    lm = load_model(weights, arch=meta["arch"], arch_kwargs=meta.get("arch_kwargs", {}),
                    num_classes=meta["num_classes"], input_shape=shape)
    data = load_data(cfg.data, input_shape=shape, limit=cfg.train_images, seed=cfg.seed)
    res = DemoResult()
    res.summary["model"] = {"arch": meta["arch"], "checkpoint": str(weights), "input_shape": list(shape)}
    res.summary["data"] = {"name": data.name, "train_images": len(data.train), "val_images": len(data.val),
                           "test_images": len(data.test) if data.test is not None else 0}

    stage("evaluate the pretrained model")
    res.summary["test_before"] = accuracy(lm.model, data.test)

    stage("analyze")
    prune_cfg = PruneConfig(groups=cfg.groups, ratio=cfg.ratio, seed=cfg.seed)
    res.summary["analysis_totals"] = analyze(lm.model, shape, prune_cfg)["totals"]

    stage("prune", groups=cfg.groups, ratio=cfg.ratio)
    pruned = prune_with_data(lm, prune_cfg, data, output=out / "pruned", overwrite=True, bn_batches=cfg.bn_batches)
    res.summary["pruning"] = {k: pruned.report[k] for k in ("original", "compressed", "macs_ratio", "params_ratio")}
    res.summary["after_pruning"] = pruned.report["accuracy"]["after_pruning"]
    res.summary["test_after_pruning"] = accuracy(pruned.model, data.test)

    stage("fine-tune (global)", epochs=cfg.epochs)
    tcfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, schedule="cosine", seed=cfg.seed, nesterov=True)
    ft = finetune(out / "pruned", data, tcfg, out / "finetuned", bn_batches=0, overwrite=True, callback=callback)
    res.summary["test_after_finetuning"] = ft.metrics.get("test")

    if cfg.export:
        from .export import export_compact

        stage("export the compact model and measure latency")
        exp = export_compact(out / "finetuned", out / "compact", batch_sizes=cfg.latency_batches,
                             threads=cfg.threads, overwrite=True, measure=True)
        res.summary["export"] = exp.report
    res.summary["output"] = str(out)
    return res
