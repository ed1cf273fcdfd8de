"""The ``sgcompress`` command line: parse, call the library, render. With :mod:`.cli_support`
(consoles, option types, parsing helpers) the only place that prints.

Every :class:`SgCompressError` becomes one line on stderr and a non-zero exit code; no
traceback reaches the user.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import render
from ._version import __version__
from .artifact import check_output_dir
from .cli_support import (
    Arch,
    ArchKwargs,
    AsJson,
    BatchSize,
    BnBatches,
    Checkpoint,
    DataSpec,
    Exclude,
    FcRatio,
    Format,
    Groups,
    Include,
    InputShape,
    Limit,
    Lr,
    MaxSteps,
    Mean,
    NumClasses,
    Ratio,
    Schedule,
    Scheme,
    Std,
    Trust,
    Workers,
    _accuracy_lines,
    _batches,
    _data,
    _load,
    _print_json,
    _progress,
    _prune_config,
    _train_config,
    _TrainView,
    err,
    fail,
    handle_errors,
    out,
)
from .errors import SgCompressError

app = typer.Typer(
    name="sgcompress", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Compress a pretrained CNN with self-grouping convolution (SG-CNN): analyze, prune, fine-tune, "
         "export a compact model that is measurably faster.",
)


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
    round_to: Annotated[int, typer.Option(
        "--round-to", help="Round every group's kept inputs to a multiple of N (odd widths run slowly); "
                           "accuracy after pruning shows the cost when --data is given.")] = 1,
    include: Include = None, exclude: Exclude = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the output directory if it exists.")] = False,
    scheme: Annotated[Scheme, typer.Option("--scheme", help="'local' retrains after every pruning step (needs --data).")] = Scheme.none,
    data: DataSpec = None, mean: Mean = None, std: Std = None, limit: Limit = None, bn_batches: BnBatches = 4,
    local_epochs: Annotated[int, typer.Option("--local-epochs", help="Epochs of retraining after each step (L scheme).")] = 1,
    lr: Lr = 0.01, batch_size: BatchSize = 128, workers: Workers = 0, max_steps_per_epoch: MaxSteps = None,
    as_json: AsJson = False,
) -> None:
    """Run SG-CNN pruning and write an artifact (plan.json, weights.safetensors, manifest.json, report.json).

    With --data, accuracy before and after pruning is measured (after re-estimating BatchNorm statistics too);
    with --scheme local, the model is retrained after every pruning step (the paper's L scheme).
    """
    from .pipeline import prune as run_prune
    from .tuning import prune_with_data

    if scheme == Scheme.global_:
        fail("the global scheme runs after pruning: `sgcompress finetune ARTIFACT --scheme global --data ...`")
    if scheme == Scheme.local and data is None:
        fail("--scheme local retrains after every step and needs --data")

    cfg = _prune_config(groups=groups, ratio=ratio, fc_ratio=fc_ratio, steps=steps, target_macs=target_macs,
                        seed=seed, include=include, exclude=exclude, round_to=round_to)
    check_output_dir(output, force)
    lm = _load(checkpoint, arch, arch_kwargs, num_classes, input_shape, trust_checkpoint)
    with _progress() as bar:
        task = bar.add_task("pruning", total=None)

        def on_progress(ev):
            bar.update(task, description=f"step {ev['step']}/{ev['steps']} cp={ev['cp']:.2f} {ev['layer']}",
                       advance=1)

        if data is None:
            res = run_prune(lm, cfg, output=output, overwrite=force, progress=on_progress)
        else:
            bundle = _data(data, lm.spec.input_shape, mean, std, limit, seed)
            local = _train_config(epochs=local_epochs, lr=lr, batch_size=batch_size, seed=seed, workers=workers,
                                  max_steps_per_epoch=max_steps_per_epoch) if scheme == Scheme.local else None
            res = prune_with_data(lm, cfg, bundle, output=output, overwrite=force, scheme=scheme.value,
                                  local_config=local, bn_batches=bn_batches, progress=on_progress,
                                  callback=_TrainView(bar))
    if as_json:
        _print_json(res.report)
        return
    for t in render.report_tables(res.report, per_layer=False):
        out.print(t)
    for line in _accuracy_lines(res.report.get("accuracy", {})):
        out.print(line)
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
        acc = rep.get("accuracy") or {}
        for line in _accuracy_lines({"split": acc.get("split", "val"), **acc.get("pruning", {}), **acc}):
            out.print(line)


@app.command()
@handle_errors
def finetune(
    artifact: Annotated[Path, typer.Argument(help="Pruned artifact directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Artifact directory to write.")],
    data: DataSpec = None,
    scheme: Annotated[Scheme, typer.Option("--scheme", help="'global': one retraining after pruning (G; after prune --scheme local: LG).")] = Scheme.global_,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training set.")] = 10,
    lr: Lr = 0.01, batch_size: BatchSize = 128,
    momentum: Annotated[float, typer.Option("--momentum")] = 0.9,
    nesterov: Annotated[bool, typer.Option("--nesterov", help="Nesterov momentum.")] = False,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 1e-4,
    schedule: Annotated[Schedule, typer.Option("--schedule", help="'step': lr/10 at 1/3 and 2/3 of the epochs; 'cosine'.")] = Schedule.step,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing")] = 0.0,
    distill: Annotated[bool, typer.Option("--distill", help="Knowledge distillation from the unpruned model.")] = False,
    distill_temperature: Annotated[float, typer.Option("--distill-temperature")] = 4.0,
    distill_weight: Annotated[float, typer.Option("--distill-weight")] = 0.5,
    teacher: Annotated[Optional[Path], typer.Option("--teacher", help="Unpruned checkpoint for --distill (default: the one pruned).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    workers: Workers = 0, max_steps_per_epoch: MaxSteps = None,
    mean: Mean = None, std: Std = None, limit: Limit = None, bn_batches: BnBatches = 4,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run of the same command.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace the output directory if it exists.")] = False,
    as_json: AsJson = False,
) -> None:
    """Retrain a pruned artifact with pruned connections held at zero; the best epoch by validation accuracy is kept.

    Resumable (--resume) after Ctrl-C, SIGTERM or a crash; works under torchrun (DistributedDataParallel).
    """
    from .artifact import read_manifest
    from .tuning import finetune as run_finetune

    if scheme != Scheme.global_:
        fail("finetune runs the global scheme; the local scheme retrains during pruning: "
             "`sgcompress prune ... --scheme local --data ...`")
    manifest = read_manifest(artifact)
    check_output_dir(output, force)
    bundle = _data(data, manifest["model"]["input_shape"], mean, std, limit, seed)
    cfg = _train_config(epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum, nesterov=nesterov,
                        weight_decay=weight_decay, schedule=schedule.value, label_smoothing=label_smoothing,
                        distill=distill, distill_temperature=distill_temperature, distill_weight=distill_weight,
                        seed=seed, workers=workers, max_steps_per_epoch=max_steps_per_epoch)
    with _progress() as bar:
        res = run_finetune(artifact, bundle, cfg, output, resume=resume, bn_batches=bn_batches, teacher=teacher,
                           overwrite=force, callback=_TrainView(bar))
    if res.path is None:  # not rank 0 under torchrun
        return
    if as_json:
        _print_json(res.metrics)
        return
    for line in _accuracy_lines({"split": "val", **res.metrics}):
        out.print(line)
    out.print(f"wrote [bold]{res.path}[/] (best epoch {res.metrics['best_epoch']['epoch']}, "
              f"val top-1 {100 * res.metrics['best_epoch']['val_top1']:.2f}%)")


@app.command()
@handle_errors
def evaluate(
    model: Annotated[Path, typer.Argument(help="An artifact directory, or a checkpoint (then give --arch).")],
    data: DataSpec = None,
    arch: Arch = None, arch_kwargs: ArchKwargs = None, num_classes: NumClasses = None,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", help="C,H,W (checkpoints only; artifacts know theirs).")] = None,
    trust_checkpoint: Trust = False,
    mean: Mean = None, std: Std = None, bn_batches: BnBatches = 4,
    as_json: AsJson = False,
) -> None:
    """Top-1 / top-5 accuracy and loss on the test split (the validation split if the data has none)."""
    from .artifact import load_artifact
    from .tuning import evaluate_artifact

    if model.is_dir():
        art = load_artifact(model, trust=trust_checkpoint)
        net, shape, stage = art.model, art.input_shape, art.manifest.get("stage")
    else:
        lm = _load(model, arch, arch_kwargs, num_classes, input_shape or "3,224,224", trust_checkpoint)
        net, shape, stage = lm.model, lm.spec.input_shape, None
    bundle = _data(data, shape, mean, std, None, 0, augment=False)
    res = evaluate_artifact(net, bundle, shape, stage=stage, bn_batches=bn_batches)
    if as_json:
        _print_json(res)
        return
    out.print(f"{res['data']} ({res['split']}, {res['n']} images): top-1 {100 * res['top1']:.2f}%  "
              f"top-5 {100 * res['top5']:.2f}%  loss {res['loss']:.4f}")
    if "with_bn_reestimation" in res:
        w = res["with_bn_reestimation"]
        out.print(f"with BatchNorm statistics re-estimated: top-1 {100 * w['top1']:.2f}%  top-5 {100 * w['top5']:.2f}%")


@app.command()
@handle_errors
def export(
    artifact: Annotated[Path, typer.Argument(help="Pruned or fine-tuned artifact directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Export directory (safetensors) or file (torchscript/onnx).")],
    fmt: Annotated[Format, typer.Option("--format", help="safetensors: sgcompress's compact artifact (reloads without pickle); "
                                                          "torchscript or onnx: a deployable file.")] = Format.safetensors,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch the per-layer strategies are chosen for.")] = 1,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Batches of the latency report.")] = "1,32",
    threads: Annotated[Optional[int], typer.Option("--threads", help="Torch threads for every measurement.")] = None,
    device: Annotated[str, typer.Option("--device", help="Where the model will run (cpu, cuda, cuda:N); every layer "
                                                         "is measured there.")] = "cpu",
    strategy: Annotated[str, typer.Option(
        "--strategy", help="auto: measure each layer's forms and keep the fastest; dense|kernel|split|grouped: use one "
                           "everywhere without measuring (same shapes on every machine, for CI gates).")] = "auto",
    fold_bn: Annotated[bool, typer.Option("--fold-bn", help="Fold each BatchNorm that directly follows a conv into it "
                                                         "(the dense and masked models of the report are folded "
                                                         "likewise).")] = False,
    no_latency: Annotated[bool, typer.Option("--no-latency", help="Skip the latency report.")] = False,
    no_check: Annotated[bool, typer.Option("--no-check", help="ONNX: skip the onnxruntime comparison.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace the output if it exists.")] = False,
    as_json: AsJson = False,
) -> None:
    """Export the compact model: per layer the fastest measured form (never slower than dense), checked
    against the masked model, with measured latency of dense, masked and compact."""
    import torch

    from .export import export_compact, export_onnx, export_torchscript

    if fmt == Format.safetensors:
        check_output_dir(output, force)
    elif output.exists() and not force:
        fail(f"{output} already exists; choose another -o or pass --force to replace it")
    with _progress() as bar:
        task = bar.add_task("measuring layers", total=None)
        res = export_compact(artifact, output if fmt == Format.safetensors else None, batch_size=batch_size,
                             batch_sizes=_batches(batch_sizes), threads=threads, overwrite=force,
                             measure=not no_latency and fmt == Format.safetensors, strategy=strategy, device=device,
                             fold_bn=fold_bn,
                             progress=lambda ev: bar.update(task, description=f"measuring {ev.get('layer', '')}",
                                                            advance=1))
    example = torch.zeros(batch_size, *res.report["input_shape"])
    if fmt == Format.torchscript:
        export_torchscript(res.model, example, output)
    elif fmt == Format.onnx:
        info = export_onnx(res.model, example, output, check=not no_check)
        res.report["onnx"] = info
        if "max_abs_diff" in info:
            out.print(f"onnxruntime vs PyTorch: max |difference| {info['max_abs_diff']:.2e} "
                      f"({info['max_rel_diff']:.2e} x max|output|)")
    if as_json:
        _print_json(res.report)
        return
    m = res.report["macs"]
    out.print(f"MACs per image: dense {render.macs(m['dense'])}, after pruning {render.macs(m['effective'])} "
              f"(theoretical speedup {m['dense'] / m['effective']:.2f}x), executed by the compact model "
              f"{render.macs(m['compact_executed'])}")
    out.print(f"equivalence with the masked model: max "
              f"difference {res.report['equivalence']['max_rel_diff']:.1e} x max|output|, top-1 identical on "
              f"{res.report['equivalence']['checked']} inputs")
    if res.report["folded_batchnorm"]:
        out.print(f"BatchNorm folded into {len(res.report['folded_batchnorm'])} convs (dense and masked timed "
                  "folded likewise)")
    for t in render.export_tables(res.report):
        out.print(t)
    for w in res.report.get("warnings", []):
        err.print(f"warning: {w}", markup=False)
    out.print(f"wrote [bold]{output}[/] ({fmt.value})")


@app.command()
@handle_errors
def check(
    target: Annotated[Path, typer.Argument(help="Export/artifact directory, or a fingerprint/report JSON.")],
    baseline: Annotated[Path, typer.Option("--baseline", help="Baseline fingerprint JSON (committed in your repo).")],
    write_baseline: Annotated[bool, typer.Option("--write-baseline", help="Write TARGET's fingerprint to --baseline and exit.")] = False,
    max_params_growth: Annotated[str, typer.Option("--max-params-growth", help="Allowed growth of parameters, e.g. 0.5%.")] = "0%",
    max_size_growth: Annotated[str, typer.Option("--max-size-growth", help="Allowed growth of weights.safetensors.")] = "0.5%",
    max_macs_growth: Annotated[str, typer.Option("--max-macs-growth", help="Allowed growth of MACs.")] = "0%",
    max_macs: Annotated[Optional[str], typer.Option("--max-macs", help="Upper bound on MACs per image, e.g. 350M.")] = None,
    min_speedup: Annotated[Optional[float], typer.Option("--min-speedup", help="Lower bound on the measured speedup.")] = None,
    as_json: AsJson = False,
) -> None:
    """The CI size/regression gate: compare parameter counts, shapes, MACs and file size with a baseline."""
    from ._io import write_json
    from .gate import compare, fingerprint, parse_count, parse_fraction

    current = fingerprint(target)
    if write_baseline:
        write_json(baseline, current)
        out.print(f"wrote baseline {baseline}")
        return
    if not baseline.is_file():
        fail(f"baseline {baseline} does not exist; create it with `sgcompress check {target} --baseline {baseline} "
             "--write-baseline` and commit it")
    res = compare(current, fingerprint(baseline),
                  max_params_growth=parse_fraction(max_params_growth, "--max-params-growth"),
                  max_size_growth=parse_fraction(max_size_growth, "--max-size-growth"),
                  max_macs_growth=parse_fraction(max_macs_growth, "--max-macs-growth"),
                  max_macs=parse_count(max_macs, "--max-macs"), min_speedup=min_speedup)
    if as_json:
        _print_json(res.to_dict())
    else:
        for line in res.changes:
            out.print(f"  changed: {line}", markup=False, highlight=False)
        for line in res.failures:
            out.print(f"  [red]REGRESSION[/]: {line}", highlight=False)
        out.print("check passed" if res.passed else f"check failed: {len(res.failures)} regression(s)")
    if not res.passed:
        raise typer.Exit(1)


@app.command()
@handle_errors
def demo(
    data: Annotated[str, typer.Option("--data", help="Fashion-MNIST idx folder.")] = "/usr/share/datasets/fashion-mnist",
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the demo's artifacts.")] = Path("sgcompress-demo"),
    groups: Groups = 4, ratio: Ratio = 0.5,
    epochs: Annotated[int, typer.Option("--epochs", help="Global fine-tuning epochs.")] = 1,
    train_images: Annotated[int, typer.Option("--train-images", help="Training images used for fine-tuning.")] = 12000,
    threads: Annotated[Optional[int], typer.Option("--threads", help="Torch threads for latency.")] = None,
    as_json: AsJson = False,
) -> None:
    """The whole pipeline on the shipped ResNet-20 (Fashion-MNIST): analyze, prune, fine-tune, export, measure."""
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(data=data, output=str(output), groups=groups, ratio=ratio, epochs=epochs,
                     train_images=train_images, threads=threads)
    with _progress() as bar:
        res = run_demo(cfg, progress=lambda ev: err.print(f"== {ev['stage']}", markup=False),
                       callback=_TrainView(bar))
    s = res.summary
    if as_json:
        _print_json(s)
        return
    out.print(render.demo_table(s))
    for w in (s.get("export") or {}).get("warnings", []):
        err.print(f"warning: {w}", markup=False)
    out.print(f"artifacts in [bold]{s['output']}[/]: pruned/, finetuned/, compact/")


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
    if not verbose:  # third-party warnings (torch, sklearn) would bury our one-line errors
        warnings.filterwarnings("ignore", category=UserWarning)
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="sgcompress")
    except SgCompressError as e:  # raised outside a command body (e.g. in a callback)
        err.print(f"error: {e}", markup=False)
        sys.exit(e.exit_code)
