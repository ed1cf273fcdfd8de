"""Fine-tuning workflows on artifacts: the paper's L, G and LG schemes, evaluation, and
BatchNorm re-estimation.

- L (local): retrain after every pruning step: :func:`local_scheme` gives the
  ``after_step`` hook that :func:`sgcompress.pipeline.prune` calls.
- G (global): :func:`finetune` retrains a pruned artifact once, into a new artifact.
- LG: both.

Removing connections shifts every layer's activation statistics, so a pruned model with
its old BatchNorm statistics is often near chance even when its weights are good. Whenever
data is at hand, the statistics are re-estimated (no labels, no weight change) and
accuracy is reported both with and without it.
"""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifact import load_artifact, make_manifest, save_artifact
from .data import DataBundle
from .errors import ArtifactError, ConfigError, DataError, InputShapeError
from .finetune import LOG_NAME, TrainConfig, evaluate, recalibrate_bn, train
from .training import dist as D

log = logging.getLogger(__name__)
Callback = Callable[[dict], None]


def check_data_fits(model: nn.Module, data: DataBundle, input_shape: tuple[int, int, int]) -> None:
    """Fail early, with the fix, when the data and the model disagree."""
    x, _ = data.val[0] if len(data.val) else data.train[0]
    if tuple(x.shape) != tuple(input_shape):
        raise InputShapeError(f"the data gives images of shape {tuple(x.shape)} but the model expects "
                              f"{tuple(input_shape)}; pass --input-shape to match, or resize the data")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x.unsqueeze(0).to(next(model.parameters()).device))
    except Exception as e:
        raise InputShapeError(f"the model rejects the data's images {tuple(x.shape)}: {type(e).__name__}: {e}") from e
    finally:
        model.train(was)
    classes = out.shape[-1]
    if classes != data.num_classes:
        raise DataError(f"class-count mismatch: the data {data.name!r} has {data.num_classes} classes but the model "
                        f"outputs {classes}; use data with the model's classes (or a model made with "
                        f"--num-classes {data.num_classes})")


def accuracy(model: nn.Module, dataset, batch_size: int = 256) -> dict[str, float]:
    r = evaluate(model, dataset, batch_size=batch_size)
    return {"top1": r.top1, "top5": r.top5, "loss": r.loss, "n": r.n}


def accuracy_with_bn_reestimation(model: nn.Module, data: DataBundle, *, bn_batches: int, batch_size: int = 128,
                                  seed: int = 0, eval_set=None) -> dict[str, Any]:
    """Accuracy as is, then after re-estimating BatchNorm statistics (kept in ``model``)."""
    eval_set = eval_set if eval_set is not None else data.val
    result: dict[str, Any] = {"without_bn_reestimation": accuracy(model, eval_set)}
    if bn_batches > 0:
        used = recalibrate_bn(model, data.train, batches=bn_batches, batch_size=batch_size, seed=seed)
        result["with_bn_reestimation"] = accuracy(model, eval_set)
        result["bn_images"] = used
    return result


def local_scheme(data: DataBundle, config: TrainConfig, work_dir: Path, *, bn_batches: int = 4,
                 callback: Callback | None = None, teacher: nn.Module | None = None) -> Callable:
    """The ``after_step`` hook of the L scheme: re-estimate BatchNorm, then retrain
    ``config.epochs`` epochs after every pruning step (each step in ``work_dir/step-N``)."""
    history: list[dict] = []

    def after_step(model: nn.Module, step: int, cp: float) -> None:
        ctx = D.current(next(model.parameters()).device)
        if ctx.distributed:  # every rank pruned the same way; make sure, from rank 0
            for m in model.modules():
                if hasattr(m, "connection_mask"):
                    torch.distributed.broadcast(m.connection_mask, 0)
                    m.zero_pruned_()
        if bn_batches > 0:
            recalibrate_bn(model, data.train, batches=bn_batches, seed=config.seed + step)
        if callback:
            callback({"kind": "local_step", "step": step + 1, "cp": cp})
        res = train(model, data.train, data.val, replace(config, seed=config.seed + step),
                    Path(work_dir) / f"step-{step + 1}", teacher=teacher, callback=callback)
        history.append({"step": step + 1, "cp": cp, "best": res.best})

    after_step.history = history  # type: ignore[attr-defined]
    return after_step


@dataclass
class FinetuneResult:
    model: nn.Module
    path: Path | None
    metrics: dict[str, Any]


def _teacher_for(art, teacher: str | Path | None) -> nn.Module:
    from .loading import load_model

    source = teacher or art.manifest.get("source")
    if not source or not Path(source).is_file():
        raise ConfigError("distillation needs the unpruned model: pass --teacher PATH (the original checkpoint); "
                          f"the artifact's source {source!r} is not a file")
    spec = art.spec
    if spec.arch == "pickled-module":
        raise ConfigError("distillation from a pickled-module source is not supported; re-save it as a state_dict")
    return load_model(source, arch=spec.arch, arch_kwargs=spec.arch_kwargs, num_classes=spec.num_classes,
                      input_shape=spec.input_shape).model


def finetune(artifact: str | Path, data: DataBundle, config: TrainConfig, output: str | Path, *,
             resume: bool = False, bn_batches: int = 4, teacher: str | Path | None = None,
             work_dir: str | Path | None = None, overwrite: bool = False,
             callback: Callback | None = None) -> FinetuneResult:
    """The G scheme: retrain a pruned artifact and write a new artifact at ``output``.

    Training state lives in ``work_dir`` (default ``<output>.train``) so an interrupted run
    continues with ``resume=True``; it is removed once the artifact is written. Model
    selection uses ``data.val``; the test set is evaluated once, at the end.
    """
    output = Path(output)
    work = Path(work_dir) if work_dir else output.with_name(output.name + ".train")
    if output.exists() and not overwrite:
        raise ArtifactError(f"{output} already exists; choose another -o or pass --force to replace it")
    if resume and not (work / "last.pt").is_file():
        raise ConfigError(f"nothing to resume: {work / 'last.pt'} does not exist; run without --resume")
    art = load_artifact(artifact)
    model = art.model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    check_data_fits(model, data, art.input_shape)
    teacher_model = _teacher_for(art, teacher).to(device) if config.distill else None
    ctx = D.setup()
    metrics: dict[str, Any] = {"data": data.name}
    # the model holds the artifact's weights until train() loads a resume state, so this is the
    # same figure with or without --resume
    metrics["after_pruning"] = accuracy_with_bn_reestimation(model, data, bn_batches=bn_batches, seed=config.seed)
    result = train(model, data.train, data.val, config, work, teacher=teacher_model, resume=resume,
                   callback=callback)
    metrics["best_epoch"] = result.best
    if data.test is not None:
        metrics["test"] = accuracy(model, data.test)
    if not ctx.is_main:
        return FinetuneResult(model, None, metrics)
    model.cpu()
    manifest = make_manifest(art.spec, stage="finetuned", source=str(Path(artifact).resolve()),
                             settings={"finetune": {"scheme": "global", **config.to_dict(), "bn_batches": bn_batches,
                                                    "data": data.name}}, parent=art.manifest)
    report = dict(art.report or {})
    if "accuracy" in report:  # what pruning measured (before/after, and the L scheme's steps)
        metrics["pruning"] = report["accuracy"]
    report["accuracy"] = metrics
    extra = {LOG_NAME: (work / LOG_NAME).read_bytes()} if (work / LOG_NAME).is_file() else None
    path = save_artifact(output, model, art.plan, manifest, report, overwrite=overwrite, extra_files=extra)
    shutil.rmtree(work, ignore_errors=True)
    return FinetuneResult(model, path, metrics)


def evaluate_artifact(model: nn.Module, data: DataBundle, input_shape, *, stage: str | None,
                      bn_batches: int = 0) -> dict[str, Any]:
    """Test-set metrics (validation set if the data has no test set); for a freshly pruned
    model also the accuracy after BatchNorm re-estimation (on a copy: the model is not changed)."""
    check_data_fits(model, data, input_shape)
    split = "test" if data.test is not None else "val"
    dataset = data.test if data.test is not None else data.val
    out: dict[str, Any] = {"data": data.name, "split": split, **accuracy(model, dataset)}
    if bn_batches > 0 and stage == "pruned":
        m = copy.deepcopy(model)
        recalibrate_bn(m, data.train, batches=bn_batches)
        out["with_bn_reestimation"] = accuracy(m, dataset)
    return out


def prune_with_data(loaded, prune_config, data: DataBundle, *, output=None, overwrite: bool = False,
                    scheme: str = "none", local_config: TrainConfig | None = None, bn_batches: int = 4,
                    work_dir: str | Path | None = None, progress: Callback | None = None,
                    callback: Callback | None = None):
    """``pipeline.prune`` with data at hand: validation accuracy before pruning, the L scheme
    (``scheme="local"``: retrain after every step), BatchNorm re-estimation after pruning,
    and accuracy after pruning with and without it, all recorded in the report."""
    from .pipeline import prune

    if scheme not in ("none", "local"):
        raise ConfigError(f"prune --scheme must be 'none' or 'local', got {scheme!r}; the G scheme is "
                          "`sgcompress finetune --scheme global`")
    if scheme == "local" and local_config is None:
        raise ConfigError("the local scheme needs training settings (--local-epochs, --lr, ...)")
    check_data_fits(loaded.model, data, loaded.spec.input_shape)
    before = accuracy(loaded.model, data.val)
    work = Path(work_dir) if work_dir else (Path(output).with_name(Path(output).name + ".train") if output
                                            else Path.cwd() / ".sgcompress-local")
    if scheme == "local":
        shutil.rmtree(work, ignore_errors=True)  # the L scheme has no resume: start its folders afresh
    after_step = local_scheme(data, local_config, work, bn_batches=bn_batches, callback=callback) \
        if scheme == "local" else None

    def before_save(res) -> None:
        acc = accuracy_with_bn_reestimation(res.model, data, bn_batches=bn_batches, seed=prune_config.seed)
        res.report["accuracy"] = {"data": data.name, "split": "val", "before_pruning": before,
                                  "after_pruning": acc, "scheme": scheme}
        if after_step is not None:
            res.report["accuracy"]["local_steps"] = after_step.history

    extra = {"data": {"name": data.name, "bn_batches": bn_batches}, "scheme": scheme}
    if local_config is not None and scheme == "local":
        extra["local"] = local_config.to_dict()
    res = prune(loaded, prune_config, output=output, overwrite=overwrite, progress=progress,
                after_step=after_step, before_save=before_save, extra_settings=extra)
    if after_step is not None and res.path is not None:
        shutil.rmtree(work, ignore_errors=True)
    return res
