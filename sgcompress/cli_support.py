"""What the ``sgcompress`` commands share: consoles, error handling, option types, parsing
helpers and the training view. Commands are in :mod:`sgcompress.cli`."""

from __future__ import annotations

import functools
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from .errors import SgCompressError

out = Console()
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    raise typer.Exit(code)


def handle_errors(fn):
    """Turn library errors into one stderr line + exit code (also under CliRunner)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SgCompressError as e:
            fail(str(e).replace("\n", " "), e.exit_code)
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130)

    return wrapper


# ----------------------------------------------------------------- shared options
Checkpoint = Annotated[Path, typer.Argument(help="Model weights: .safetensors, .pt/.pth state_dict or training checkpoint.")]
Arch = Annotated[Optional[str], typer.Option(
    "--arch", help="Architecture: torchvision:NAME, sgcompress:NAME, package.module:Class or path/file.py:Class.")]
ArchKwargs = Annotated[Optional[str], typer.Option("--arch-kwargs", help="JSON object of keyword arguments for the architecture.")]
NumClasses = Annotated[Optional[int], typer.Option("--num-classes", help="Classes of the classifier (default: read from the checkpoint).")]
InputShape = Annotated[str, typer.Option("--input-shape", help="C,H,W of one input, for tracing, MACs and latency.")]
Trust = Annotated[bool, typer.Option(
    "--trust-checkpoint", help="Allow pickled nn.Modules and TorchScript archives (runs code from the file: only for files you trust).")]
Groups = Annotated[int, typer.Option("--groups", "-g", help="k-means clusters (groups) per layer; the authors used 16.")]
Ratio = Annotated[float, typer.Option("--ratio", "-r", help="Fraction of each pruned conv's connections to remove, in [0, 1).")]
FcRatio = Annotated[Optional[float], typer.Option("--fc-ratio", help="The same for Linear layers (default min(ratio, 0.6)).")]
Include = Annotated[Optional[list[str]], typer.Option("--include", help="Glob of module names to prune (repeatable); overrides the stem/shortcut defaults.")]
Exclude = Annotated[Optional[list[str]], typer.Option("--exclude", help="Glob of module names never to prune (repeatable).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]


def _arch_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"--arch-kwargs is not valid JSON ({e.msg} at position {e.pos}); pass an object like '{{\"width\": 32}}'")
    if not isinstance(value, dict):
        fail("--arch-kwargs must be a JSON object like '{\"width\": 32}'")
    return value


def _load(checkpoint, arch, arch_kwargs, num_classes, input_shape, trust):
    from .loading import load_model

    if trust:
        err.print("[yellow]warning:[/] --trust-checkpoint: the file may run code while it loads", markup=True)
    return load_model(checkpoint, arch=arch, arch_kwargs=_arch_kwargs(arch_kwargs), num_classes=num_classes,
                      input_shape=input_shape, trust=trust)


def _prune_config(**kw):
    from .config import PruneConfig

    kw["include"] = tuple(kw.get("include") or ())
    kw["exclude"] = tuple(kw.get("exclude") or ())
    return PruneConfig(**kw)


def _progress() -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal)


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=1) + "\n")


DataSpec = Annotated[Optional[str], typer.Option(
    "--data", help="Dataset: 'digits', an MNIST/Fashion-MNIST idx folder, a CIFAR python folder, or an ImageFolder (train/, val/).")]
Mean = Annotated[Optional[str], typer.Option("--mean", help="Normalisation mean per channel, e.g. 0.5,0.5,0.5 (default: the data's).")]
Std = Annotated[Optional[str], typer.Option("--std", help="Normalisation std per channel (default: the data's).")]
Limit = Annotated[Optional[int], typer.Option("--limit", help="Use only this many training images (quick runs).")]
BnBatches = Annotated[int, typer.Option(
    "--bn-batches", help="Batches (of 128 images) to re-estimate BatchNorm statistics after pruning; 0 turns it off.")]
Lr = Annotated[float, typer.Option("--lr", help="Initial SGD learning rate.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per optimizer step (per process under torchrun).")]
Workers = Annotated[int, typer.Option("--workers", help="DataLoader worker processes.")]
MaxSteps = Annotated[Optional[int], typer.Option("--max-steps-per-epoch", help="Cap optimizer steps per epoch (quick runs).")]


class Scheme(str, Enum):
    none = "none"
    local = "local"
    global_ = "global"


class Schedule(str, Enum):
    step = "step"
    cosine = "cosine"


def _floats(text: str | None, what: str):
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        fail(f"{what} must be comma-separated numbers like 0.5,0.5,0.5, got {text!r}")


def _data(spec: str | None, input_shape, mean, std, limit, seed: int, augment: bool = True):
    from .data import load_data

    if spec is None:
        fail("this needs --data (e.g. --data digits, or a dataset folder)")
    return load_data(spec, input_shape=tuple(input_shape), mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
                     limit=limit, seed=seed, augment=augment)


def _train_config(**kw):
    from .finetune import TrainConfig

    return TrainConfig(**kw)


class _TrainView:
    """Renders training events as a rich progress bar (quiet off a terminal) plus one line per epoch."""

    def __init__(self, bar: Progress):
        self.bar, self.task = bar, None

    def __call__(self, ev: dict) -> None:
        kind = ev.get("kind")
        if kind == "epoch_start":
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(f"epoch {ev['epoch']}/{ev['epochs']}", total=ev["steps"],
                                          completed=ev.get("step", 0))
        elif kind == "batch" and self.task is not None:
            self.bar.update(self.task, completed=ev["step"],
                            description=f"epoch {ev['epoch']}/{ev['epochs']} loss {ev['loss']:.3f} "
                                        f"acc {100 * ev['acc']:.1f}% {ev['images_per_s']:.0f} img/s")
        elif kind == "epoch_end":
            err.print(f"epoch {ev['epoch']}/{ev['epochs']}: train loss {ev['train_loss']:.4f} "
                      f"acc {100 * ev['train_acc']:.2f}% | val top-1 {100 * ev['val_top1']:.2f}% "
                      f"loss {ev['val_loss']:.4f} | lr {ev['lr']:.4g} | {ev['seconds']:.0f} s"
                      + (" (best)" if ev.get("is_best") else ""), markup=False)
        elif kind == "local_step":
            err.print(f"L scheme: retraining after step {ev['step']} (cp {ev['cp']:.2f})", markup=False)
        elif kind == "interrupted":
            err.print(f"interrupted by {ev['signal']}: state saved to {ev['path']}; continue with --resume",
                      markup=False)


def _accuracy_lines(acc: dict) -> list[str]:
    lines = []
    if "before_pruning" in acc:
        lines.append(f"accuracy before pruning ({acc['split']}): top-1 {100 * acc['before_pruning']['top1']:.2f}%")
    ap = acc.get("after_pruning") or {}
    if "without_bn_reestimation" in ap:
        lines.append(f"accuracy after pruning, old BatchNorm statistics: top-1 "
                     f"{100 * ap['without_bn_reestimation']['top1']:.2f}%")
    if "with_bn_reestimation" in ap:
        lines.append(f"accuracy after pruning, BatchNorm re-estimated on {ap['bn_images']} images: top-1 "
                     f"{100 * ap['with_bn_reestimation']['top1']:.2f}%")
    if "test" in acc:
        lines.append(f"test accuracy after fine-tuning: top-1 {100 * acc['test']['top1']:.2f}% "
                     f"top-5 {100 * acc['test']['top5']:.2f}% ({acc['test']['n']} images)")
    return lines


class Format(str, Enum):
    safetensors = "safetensors"
    torchscript = "torchscript"
    onnx = "onnx"


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        fail(f"--batch-sizes must be positive integers like 1,32, got {text!r}")
    return values
