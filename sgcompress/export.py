"""Export: the compact model that is really faster, in sgcompress's own format, TorchScript or ONNX.

``export_compact`` turns a masked artifact into a compact one: every pruned layer becomes
the compact module (compact/) that measured fastest for the target (batch size, threads,
device), never one slower than its dense conv. The compact artifact stores

```
plan.json            the same plan (structure of every pruned layer)
compact.json         the measured choice per layer: strategy, options, timings
weights.safetensors  the compact weights only (pruned connections are not stored)
manifest.json        stage "compact", the parent artifact, settings, versions
report.json          MACs, params, file sizes and measured latency: dense, masked, compact
```
and reloads through ``sgcompress.load`` without pickle. Before anything is written, the
compact model is checked against the masked one: max |difference| <= 1e-4 x max |output|
and identical top-1 on the check inputs.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import _io
from .artifact import FORMAT, load_artifact, make_manifest, read_manifest, restore_tied
from .errors import ArtifactError, ConfigError, ExportError
from .fold import add_fold_bias, fold_batchnorm
from .loading import ModelSpec, build_model, load_state_dict_strict
from .metrics import count_macs, count_params, measure_latencies
from .plan import CompressionPlan
from .surgery import strip_masks

log = logging.getLogger(__name__)
Progress = Callable[[dict], None]
REL_TOL = 1e-4  # max |compact - masked| <= REL_TOL * max |masked|
SLOW_WARNING = 0.7  # warn when measured speedup < 70 % of the MACs speedup


@dataclass
class ExportResult:
    path: Path | None
    model: nn.Module
    choices: dict[str, Any]
    report: dict[str, Any]


def check_equivalence(reference: nn.Module, candidate: nn.Module, inputs: list[torch.Tensor]) -> dict[str, float]:
    """Compare outputs on ``inputs``; raise ExportError if they differ beyond tolerance."""
    worst = 0.0
    agree = total = 0
    with torch.inference_mode():
        for x in inputs:
            a, b = reference(x), candidate(x)
            scale = float(a.abs().max()) or 1.0
            diff = float((a - b).abs().max())
            worst = max(worst, diff / scale)
            if a.dim() == 2:
                agree += int((a.argmax(1) == b.argmax(1)).sum())
                total += a.shape[0]
    if worst > REL_TOL:
        raise ExportError(f"the compact model differs from the masked one by {worst:.2e} x max|output| "
                          f"(allowed {REL_TOL:.0e}); this is a bug in sgcompress, please report it")
    if agree != total:
        raise ExportError(f"the compact model's top-1 differs from the masked model's on {total - agree} of "
                          f"{total} inputs; this is a bug in sgcompress, please report it")
    return {"max_rel_diff": worst, "top1_agree": agree, "checked": total}


def _latency_rows(models: dict[str, nn.Module], shape, batch_sizes, threads, macs: dict[str, int]) -> list[dict]:
    out = []
    for bs in batch_sizes:
        lats = measure_latencies(models, shape, batch_size=bs, threads=threads, warmup=3, repeats=10, min_seconds=1.0)
        rows = [{"model": name, "median_ms": lat.median_ms, "p10_ms": lat.p10_ms, "p90_ms": lat.p90_ms,
                 "repeats": lat.repeats} for name, lat in lats.items()]
        base = rows[0]["median_ms"]
        for r in rows:
            r["speedup"] = base / r["median_ms"]
            r["macs_speedup"] = macs["dense"] / macs["effective"] if r["model"] != "dense" else 1.0
        out.append({"batch_size": bs, "threads": torch.get_num_threads() if threads is None else threads,
                    "rows": rows})
    return out


def layer_rows(plan: CompressionPlan, choices: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per pruned layer: the form kept, every candidate's measured seconds, and the measured
    speedup of the kept form over the dense conv beside the speedup its MACs allow
    (``None`` where the layer was not measured, e.g. with a fixed ``--strategy``)."""
    from .compact import strategy_key

    rows = {}
    for name, c in choices.items():
        mask = plan.layer(name).mask()
        kept_conn = int(mask.sum())
        secs = c.get("seconds") or {}
        dense, kept = secs.get("dense"), secs.get(strategy_key(c["strategy"], c.get("options") or {}))
        rows[name] = {"strategy": c["strategy"], "seconds": secs,
                      "dense_ms": 1e3 * dense if dense else None, "kept_ms": 1e3 * kept if kept else None,
                      "speedup": dense / kept if dense and kept else None,
                      "macs_speedup": mask.numel() / kept_conn if kept_conn else None}
    return rows


def slow_layers(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Layers whose measured speedup is below ``SLOW_WARNING`` of what their MACs allow."""
    return [n for n, r in rows.items()
            if r["speedup"] is not None and r["macs_speedup"] and r["speedup"] < SLOW_WARNING * r["macs_speedup"]]


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device to export for; a precise error when it is not usable here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"--device {device!r} is not a device name; use cpu or cuda (cuda:N)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA GPU is usable here; export on the machine that will run "
                              "the model, or use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device!r} is not supported; use cpu or cuda")
    return dev


def fixed_choices(plan: CompressionPlan, strategy: str) -> dict[str, Any]:
    """Every layer in ``strategy`` (with its default options), without measuring: the same
    shapes on every machine, which a size gate in CI needs. Layers the strategy does not
    apply to (``kernel`` on a Linear layer) use ``split``."""
    from .compact import default_candidates
    from .compact.factory import CONV_STRATEGIES

    if strategy not in CONV_STRATEGIES:
        raise ExportError(f"unknown strategy {strategy!r}; use auto or one of {', '.join(CONV_STRATEGIES)}")
    choices = {}
    for lp in plan.layers:
        cands = default_candidates(lp)
        pick = next((c for c in cands if c[0] == strategy), None) or next(c for c in cands if c[0] == "split")
        choices[lp.name] = {"strategy": pick[0], "options": pick[1], "seconds": {}}
    return choices


def _weight_mask(lp, shape) -> torch.Tensor:
    m = lp.mask().bool()
    return m.view(*m.shape, *[1] * (len(shape) - 2)).expand(shape)


def packed_state(compact: nn.Module, plan: CompressionPlan, choices: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The compact model's state_dict with the weights of layers kept in dense form stored as
    their kept entries only (1-D, row-major), so pruned connections are never stored."""
    state = {k: v.detach().contiguous() for k, v in compact.state_dict().items()}
    seen: dict[int, str] = {}
    for k in list(state):  # tied tensors are stored once (safetensors refuses shared memory)
        ptr = state[k].data_ptr()
        if state[k].numel() and ptr in seen:
            del state[k]
        else:
            seen[ptr] = k
    for name, choice in choices.items():
        key = f"{name}.weight"
        if choice["strategy"] == "dense" and key in state:
            w = state[key]
            state[key] = w[_weight_mask(plan.layer(name), w.shape)].clone()
    return state


def unpack_state(state: dict[str, torch.Tensor], model: nn.Module, plan: CompressionPlan,
                 choices: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`packed_state` for ``model`` (built by ``compact.rebuild``)."""
    full = model.state_dict()
    for name, choice in choices.items():
        key = f"{name}.weight"
        if choice["strategy"] == "dense" and key in state and state[key].dim() == 1:
            shape = full[key].shape
            mask = _weight_mask(plan.layer(name), shape)
            if int(mask.sum()) != state[key].numel():
                raise ArtifactError(f"{key}: {state[key].numel()} stored weights, the plan keeps {int(mask.sum())}; "
                                    "the export is damaged, re-export it")
            w = torch.zeros(shape, dtype=state[key].dtype)
            w[mask] = state[key]
            state[key] = w
    return restore_tied(state, full)


def export_compact(artifact: str | Path, output: str | Path | None, *, batch_size: int = 1,
                   batch_sizes: tuple[int, ...] = (1, 32), threads: int | None = None, overwrite: bool = False,
                   measure: bool = True, check_inputs: list[torch.Tensor] | None = None, strategy: str = "auto",
                   device: str | torch.device = "cpu", fold_bn: bool = False,
                   progress: Progress | None = None) -> ExportResult:
    """Materialise the fastest compact model of a masked artifact and (with ``output``) save it.

    Args:
        batch_size: the batch the per-layer strategies are measured at (the deployment target).
        batch_sizes: batches for the latency report of dense / masked / compact.
        threads: torch threads for every measurement (None: torch's default).
        check_inputs: inputs for the equivalence check (default: 8 seeded random batches).
        strategy: "auto" measures every layer's strategies and keeps the fastest (never slower
            than dense); a strategy name uses it everywhere without measuring (deterministic).
        device: where the model will run ("cpu", "cuda", "cuda:1"); every measurement runs
            there. The native kernel is CPU code, so on a GPU the forms are dense, split
            and grouped. The returned model is on this device; the saved weights are not
            tied to it (``sgcompress.load`` gives a CPU model, ``.to(device)`` moves it).
        fold_bn: fold every BatchNorm that directly follows a conv into it (see
            :mod:`sgcompress.fold`); the dense and masked models of the latency report are
            folded likewise, so the speedups compare like with like. The equivalence check
            is against the unfolded masked model.
    """
    from .compact import fvcore_handles, materialize

    dev = resolve_device(device)
    if strategy == "kernel" and dev.type != "cpu":
        raise ConfigError("--strategy kernel is CPU code; for a GPU use auto, dense, split or grouped")
    if read_manifest(artifact).get("stage") == "compact":
        raise ArtifactError(f"{artifact} is already a compact export; export the pruned or fine-tuned artifact")
    art = load_artifact(artifact)
    if output is not None and Path(output).exists() and not overwrite:
        raise ArtifactError(f"{output} already exists; choose another -o or pass --force to replace it")
    shape = art.input_shape
    masked = art.model.eval()
    dense = strip_masks(copy.deepcopy(masked))
    # MACs are counted on the CPU (a property of the model, not of the device)
    macs = {"dense": count_macs(dense, shape).total, "effective": count_macs(masked, shape).total}
    masked, dense = masked.to(dev), dense.to(dev)
    source, folded = masked, []
    if fold_bn:
        source = copy.deepcopy(masked)
        folded = [list(p) for p in fold_batchnorm(source)]
        fold_batchnorm(dense)
    example = torch.randn(batch_size, *shape, generator=torch.Generator().manual_seed(0)).to(dev)
    compact, choices = materialize(
        source, example, threads=threads, plan=art.plan,
        choices=None if strategy == "auto" else fixed_choices(art.plan, strategy),
        progress=(lambda name, i, total, chosen: progress({"layer": name, "index": i, "total": total,
                                                            "strategy": chosen["strategy"]})) if progress else None)
    compact.eval()
    gen = torch.Generator().manual_seed(1)
    inputs = check_inputs or [torch.randn(4, *shape, generator=gen) for _ in range(8)]
    equivalence = check_equivalence(masked, compact, [x.to(dev) for x in inputs])

    # effective: what the plan leaves (pruned connections not counted), the theoretical floor;
    # compact_executed: what the compact model really computes (groups merged or padded for speed)
    on_cpu = compact if dev.type == "cpu" else copy.deepcopy(compact).cpu()
    macs["compact_executed"] = count_macs(on_cpu, shape, op_handles=fvcore_handles()).total
    report: dict[str, Any] = {
        "units": {"macs": "multiply-accumulates per image (fvcore count)", "latency": "milliseconds per batch"},
        "input_shape": list(shape), "macs": macs, "params": {
            "dense": count_params(dense).total, "compact": count_params(compact).total},
        "equivalence": equivalence, "strategy_batch_size": batch_size, "device": str(dev),
        "folded_batchnorm": folded, "layers": layer_rows(art.plan, choices),
    }
    if measure:
        report["latency"] = _latency_rows({"dense": dense, "masked": source, "compact": compact}, shape,
                                          batch_sizes, threads, macs)
        report["warnings"] = [
            f"batch {lat['batch_size']}: measured speedup {r['speedup']:.2f}x is below 70 % of the MACs "
            f"speedup {r['macs_speedup']:.2f}x"
            for lat in report["latency"] for r in lat["rows"]
            if r["model"] == "compact" and r["macs_speedup"] and r["speedup"] < SLOW_WARNING * r["macs_speedup"]]
    slow = slow_layers(report["layers"])
    if slow:
        names = ", ".join(slow[:6]) + (f" and {len(slow) - 6} more" if len(slow) > 6 else "")
        report.setdefault("warnings", []).append(
            f"{len(slow)} of {len(report['layers'])} pruned layers measured below 70 % of their MACs speedup "
            f"at batch {batch_size}: {names} (per-layer figures: `sgcompress report` on the export)")
    path = None
    if output is not None:
        manifest = make_manifest(art.spec, stage="compact", source=str(Path(artifact).resolve()),
                                 settings={"export": {"batch_size": batch_size, "threads": threads,
                                                      "strategy": strategy, "device": str(dev),
                                                      "fold_bn": folded}},
                                 parent=art.manifest)
        with _io.atomic_directory(output, overwrite=overwrite) as tmp:
            (tmp / "plan.json").write_text(art.plan.to_json())
            (tmp / "compact.json").write_text(json.dumps(choices, indent=1) + "\n")
            state = {k: v.cpu() for k, v in packed_state(compact, art.plan, choices).items()}
            save_file(state, str(tmp / "weights.safetensors"),
                      metadata={"format": FORMAT, "stage": "compact"})
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            report["files"] = {"weights.safetensors": (tmp / "weights.safetensors").stat().st_size}
            (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        path = Path(output)
    return ExportResult(path, compact, choices, report)


def load_compact(path: str | Path) -> nn.Module:
    """Rebuild a compact export (architecture from the manifest, compact layers from plan +
    compact.json, weights from safetensors) without pickle."""
    from .compact import rebuild

    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("stage") != "compact" or not (path / "compact.json").is_file():
        raise ArtifactError(f"{path} is not a compact export (no compact.json); make one with `sgcompress export`")
    plan = CompressionPlan.from_json((path / "plan.json").read_text())
    try:
        choices = json.loads((path / "compact.json").read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path / 'compact.json'} is not valid JSON ({e}); re-export it") from e
    model = build_model(ModelSpec.from_dict(manifest["model"]))
    add_fold_bias(model, [tuple(p) for p in manifest.get("settings", {}).get("export", {}).get("fold_bn", [])])
    model = rebuild(model, choices, plan=plan)
    try:
        state = load_file(str(path / "weights.safetensors"))
    except Exception as e:  # safetensors raises several types for damaged files
        raise ArtifactError(f"{path / 'weights.safetensors'} cannot be read ({e}); re-export it") from e
    load_state_dict_strict(model, unpack_state(state, model, plan, choices), source=str(path / "weights.safetensors"))
    return model.eval()


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Trace ``model`` to TorchScript and save it atomically (for deployment; sgcompress
    itself reads its own format back, not this one)."""
    import io

    from .compact import portable

    # plain PyTorch ops only (loads without sgcompress), traced on the CPU (.to(device) after loading)
    model, example = portable(copy.deepcopy(model)).cpu(), example.cpu()
    with torch.inference_mode(False), torch.no_grad():
        try:
            scripted = torch.jit.trace(model.eval(), example, check_trace=False)
        except Exception as e:
            raise ExportError(f"TorchScript tracing failed: {type(e).__name__}: {e}") from e
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    _io.atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, check: bool = True) -> dict[str, Any]:
    """Export to ONNX (opset 17, dynamic batch) and, with ``check``, compare onnxruntime's output
    with PyTorch's; returns the difference."""
    import io
    import warnings

    from .compact import portable

    model, example = portable(copy.deepcopy(model)).cpu(), example.cpu()  # ONNX has no sgcompress::gconv
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (example,), buf, input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17,
                              dynamo=False)
    except Exception as e:
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {e}") from e
    data = buf.getvalue()
    result: dict[str, Any] = {"path": str(path), "bytes": len(data)}
    if check:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ExportError("checking the ONNX file needs onnxruntime: pip install 'sgcompress[onnx]' "
                              "(or pass --no-check)") from e
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        x = torch.randn(2, *example.shape[1:], generator=torch.Generator().manual_seed(2))
        got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
        with torch.no_grad():
            want = model(x)
        diff = float((got - want).abs().max())
        result["max_abs_diff"] = diff
        result["max_rel_diff"] = diff / (float(want.abs().max()) or 1.0)
        if result["max_rel_diff"] > 1e-3:
            raise ExportError(f"onnxruntime's output differs from PyTorch's by {result['max_rel_diff']:.2e} x max|output|")
    _io.atomic_write_bytes(path, data)
    return result
