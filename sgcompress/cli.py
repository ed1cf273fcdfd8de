"""The ``sgcompress`` command line: parse, call the library, render. The only place that prints.

Every :class:`SgCompressError` becomes one line on stderr and a non-zero exit code; no
traceback reaches the user.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import render
from ._version import __version__
from .errors import SgCompressError

out = Console()
err = Console(stderr=True, highlight=False, soft_wrap=True)

app = typer.Typer(
    name="sgcompress", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Compress a pretrained CNN with self-grouping convolution (SG-CNN): analyze, prune, fine-tune, "
         "export a compact model that is measurably faster.",
)


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


# ----------------------------------------------------------------- commands
@app.command()
@handle_errors
def analyze(
    checkpoint: Checkpoint,
    arch: Arch = None, arch_kwargs: ArchKwargs = None, num_classes: NumClasses = None,
    input_shape: InputShape = "3,224,224", trust_checkpoint: Trust = False,
    groups: Groups = 4, ratio: Ratio = 0.5, fc_ratio: FcRatio = None,
    include: Include = None, exclude: Exclude = None, as_json: AsJson = False,
) -> None:
    """Per-layer params and MACs, what SG-CNN would prune (or why not), and a what-if for 2-16 groups."""
    from .pipeline import analyze as run_analyze

    lm = _load(checkpoint, arch, arch_kwargs, num_classes, input_shape, trust_checkpoint)
    cfg = _prune_config(groups=groups, ratio=ratio, fc_ratio=fc_ratio, include=include, exclude=exclude)
    result = run_analyze(lm.model, lm.spec.input_shape, cfg)
    result["model"] = lm.spec.to_dict()
    if as_json:
        _print_json(result)
        return
    for t in render.analysis_tables(result):
        out.print(t)


@app.command()
@handle_errors
def prune(
    checkpoint: Checkpoint,
    output: Annotated[Path, typer.Option("--output", "-o", help="Artifact directory to write (atomically).")],
    arch: Arch = None, arch_kwargs: ArchKwargs = None, num_classes: NumClasses = None,
    input_shape: InputShape = "3,224,224", trust_checkpoint: Trust = False,
    groups: Groups = 4, ratio: Ratio = 0.5, fc_ratio: FcRatio = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Pruning steps up to --ratio (default: one per 0.1).")] = None,
    target_macs: Annotated[Optional[float], typer.Option(
        "--target-macs", help="Instead of --ratio: end at most at this fraction of the original MACs, e.g. 0.5.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="k-means seed (same seed, same plan).")] = 0,
    include: Include = None, exclude: Exclude = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the output directory if it exists.")] = False,
    as_json: AsJson = False,
) -> None:
    """Run SG-CNN pruning and write an artifact (plan.json, weights.safetensors, manifest.json, report.json)."""
    from .pipeline import prune as run_prune

    cfg = _prune_config(groups=groups, ratio=ratio, fc_ratio=fc_ratio, steps=steps, target_macs=target_macs,
                        seed=seed, include=include, exclude=exclude)
    if output.exists() and not force:
        fail(f"{output} already exists; choose another -o or pass --force to replace it")
    lm = _load(checkpoint, arch, arch_kwargs, num_classes, input_shape, trust_checkpoint)
    with _progress() as bar:
        task = bar.add_task("pruning", total=None)

        def on_progress(ev):
            bar.update(task, description=f"step {ev['step']}/{ev['steps']} cp={ev['cp']:.2f} {ev['layer']}",
                       advance=1)

        res = run_prune(lm, cfg, output=output, overwrite=force, progress=on_progress)
    if as_json:
        _print_json(res.report)
        return
    for t in render.report_tables(res.report, per_layer=False):
        out.print(t)
    out.print(f"wrote [bold]{res.path}[/] (ratio {res.config.ratio:.3f}, groups {res.config.groups}, seed {res.config.seed})")


@app.command()
@handle_errors
def report(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory written by sgcompress.")],
    baseline: Annotated[Optional[Path], typer.Option("--baseline", help="The original checkpoint, to compare file sizes.")] = None,
    trust_checkpoint: Trust = False,
    as_json: AsJson = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table.")] = False,
) -> None:
    """MACs (pruned connections not counted), effective params, file sizes, per-layer before/after."""
    from .pipeline import report as run_report

    rep = run_report(artifact, baseline=baseline, trust=trust_checkpoint)
    if as_json:
        _print_json(rep)
    elif markdown:
        sys.stdout.write(render.report_markdown(rep))
    else:
        for t in render.report_tables(rep):
            out.print(t)


def version_callback(value: bool) -> None:
    if value:
        out.print(f"sgcompress {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Show the version.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what the library does.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="sgcompress")
    except SgCompressError as e:  # raised outside a command body (e.g. in a callback)
        err.print(f"error: {e}", markup=False)
        sys.exit(e.exit_code)
