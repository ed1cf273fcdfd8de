"""The documented Python API: analyze, prune, report. The CLI calls exactly these.

Nothing here prints; long loops report through a ``progress`` callback.

    import sgcompress
    lm = sgcompress.load_model("resnet50.pth", arch="torchvision:resnet50")
    info = sgcompress.analyze(lm.model, lm.spec.input_shape, sgcompress.PruneConfig(groups=16, ratio=0.6))
    res = sgcompress.prune(lm, sgcompress.PruneConfig(groups=16, ratio=0.6), output="out/r50")
    model = sgcompress.load("out/r50")
    rep = sgcompress.report("out/r50")
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from ._io import write_json
from .artifact import load_artifact, make_manifest, read_manifest, save_artifact
from .config import PruneConfig
from .errors import ArtifactError, ConfigError
from .loading import LoadedModel, build_model, load_model
from .metrics import count_macs, count_params
from .plan import CompressionPlan
from .selection import LayerInfo, Selection, select_layers, trace_layers
from .sgcnn import sgcnn_prune
from .surgery import strip_masks, to_masked

Progress = Callable[[dict], None]
UNITS = {"macs": "multiply-accumulates per image (fvcore count)", "flops": "2 x MACs",
         "params": "number of parameters", "bytes": "file size in bytes"}


def _shape_str(info) -> str:
    if info.kind == "conv":
        kh, kw = info.kernel_size
        return f"{info.out_channels}x{info.in_channels // max(info.groups, 1)}x{kh}x{kw}"
    if info.kind == "linear":
        return f"{info.out_channels}x{info.in_channels}"
    return ""


def _estimated_macs(sel: Selection, total: int, config: PruneConfig) -> int:
    removed = 0.0
    for name in sel.targets:
        info = sel.layers[name]
        removed += info.macs * (config.ratio if info.kind == "conv" else config.effective_fc_ratio)
    return int(round(total - removed))


def analyze(model: nn.Module, input_shape: tuple[int, int, int], config: PruneConfig,
            what_if_groups: tuple[int, ...] = (2, 4, 8, 16)) -> dict[str, Any]:
    """Per-layer costs and prunability, totals, and estimated MACs/params after pruning.

    The what-if figures are estimates: SG-CNN removes very nearly ``ratio`` of every pruned
    layer's connections (the threshold is a percentile), so a pruned layer's MACs and
    weights scale by ``1 - ratio``; ``groups`` changes which layers can be pruned (a layer
    needs at least ``groups`` filters).
    """
    layers = trace_layers(model, input_shape)
    sel = select_layers(model, input_shape, n_clusters=config.groups, include=config.include,
                        exclude=config.exclude, layers=layers)
    macs = count_macs(model, input_shape)
    params = count_params(model)
    rows = []
    for info in layers.values():
        reason = sel.reason(info.name)
        if info.kind == "other" and reason is None:
            continue
        rows.append({
            "name": info.name, "type": info.type, "shape": _shape_str(info), "params": info.params,
            "macs": macs.by_layer.get(info.name, info.macs),
            "prunable": info.name in sel.targets, "reason": reason,
        })
    what_if = []
    for g in what_if_groups:
        s = select_layers(model, input_shape, n_clusters=g, include=config.include,
                          exclude=config.exclude, layers=layers)
        removed_params = sum(
            (model.get_submodule(n).weight.numel())
            * (config.ratio if s.layers[n].kind == "conv" else config.effective_fc_ratio)
            for n in s.targets)
        what_if.append({
            "groups": g, "ratio": config.ratio, "fc_ratio": config.effective_fc_ratio,
            "pruned_layers": len(s.targets),
            "macs": _estimated_macs(s, macs.total, config),
            "params": int(round(params.total - removed_params)), "estimated": True,
        })
    return {
        "input_shape": list(input_shape), "units": UNITS, "layers": rows,
        "totals": {"macs": macs.total, "flops": macs.flops, "params": params.total,
                   "prunable_layers": len(sel.targets), "skipped_layers": len(sel.skipped)},
        "skipped": [{"name": s.name, "reason": s.reason} for s in sel.skipped],
        "what_if": what_if,
    }


def _ratio_for_target(sel: Selection, total: int, config: PruneConfig) -> float:
    """The smallest ratio whose estimated MACs are at most ``target_macs x total``."""
    goal = config.target_macs * total
    if _estimated_macs(sel, total, replace(config, ratio=0.0)) <= goal:
        return 0.0
    hi = 0.99
    if _estimated_macs(sel, total, replace(config, ratio=hi)) > goal:
        best = _estimated_macs(sel, total, replace(config, ratio=hi)) / total
        raise ConfigError(
            f"--target-macs {config.target_macs} is out of reach: pruning every selectable layer at 99 % still "
            f"leaves {best:.3f} of the MACs (the rest sits in layers that are not pruned); raise --target-macs, "
            "raise --fc-ratio, or --include more layers")
    lo = 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if _estimated_macs(sel, total, replace(config, ratio=mid)) <= goal:
            hi = mid
        else:
            lo = mid
    return min(0.99, math.ceil(hi * 1000) / 1000)


@dataclass
class PruneResult:
    model: nn.Module  # the masked model (original architecture, masked layers)
    plan: CompressionPlan
    report: dict[str, Any]
    config: PruneConfig  # with ``ratio`` resolved when --target-macs was used
    path: Path | None = None


def prune_model(model: nn.Module, input_shape: tuple[int, int, int], config: PruneConfig, *,
                progress: Progress | None = None,
                after_step: Callable[[nn.Module, int, float], None] | None = None) -> PruneResult:
    """SG-CNN on ``model`` in place; returns the masked model, its plan and report.

    ``after_step(model, step_index, cp)`` runs after every pruning step (the L scheme).
    """
    layers = trace_layers(model, input_shape)
    sel = select_layers(model, input_shape, n_clusters=config.groups, include=config.include,
                        exclude=config.exclude, layers=layers)
    if not sel.targets and (config.ratio > 0 or config.target_macs is not None):
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in sel.skipped[:3])
        raise ConfigError(f"no layer can be pruned with these settings ({reasons}); "
                          "lower --groups or change --include/--exclude")
    before_macs = count_macs(model, input_shape)
    before_params = count_params(model)
    if config.target_macs is not None:
        config = replace(config, ratio=_ratio_for_target(sel, before_macs.total, config))
    kinds = {n: sel.layers[n].kind for n in sel.targets}
    snapshot = copy.deepcopy(model.state_dict()) if config.target_macs is not None else None
    for attempt in range(4):
        to_masked(model, sel.targets)
        plan = sgcnn_prune(model, sel.targets, config, kinds=kinds, skipped=sel.skipped, progress=progress,
                           after_step=(lambda s, cp: after_step(model, s, cp)) if after_step else None)
        after_macs = count_macs(model, input_shape)
        if config.target_macs is None or after_macs.total <= config.target_macs * before_macs.total \
                or config.ratio >= 0.99 or after_step is not None:
            break
        # the estimate was a hair optimistic: a little more, from the same starting weights
        model.load_state_dict(snapshot)
        for m in model.modules():
            if hasattr(m, "connection_mask"):
                m.connection_mask.fill_(1.0)
        config = replace(config, ratio=min(0.99, round(config.ratio + 0.005, 3)))
    report = build_report(plan, layers, before_macs, before_params, count_macs(model, input_shape),
                          count_params(model), input_shape)
    return PruneResult(model, plan, report, config)


def build_report(plan, layers: dict[str, LayerInfo], before_macs, before_params, after_macs, after_params,
                 input_shape) -> dict[str, Any]:
    """Plain-data report: totals and per-layer MACs/params before and after."""
    rows = []
    pr_before = pr_after = 0
    for lp in plan.layers:
        mb = before_macs.by_layer.get(lp.name, layers[lp.name].macs if lp.name in layers else 0)
        ma = after_macs.by_layer.get(lp.name, int(round(mb * lp.density)))
        pr_before += mb
        pr_after += ma
        pb, pa = after_params.by_layer.get(lp.name, (0, 0))
        rows.append({
            "name": lp.name, "kind": lp.kind, "macs_before": mb, "macs_after": ma,
            "params_before": pb, "params_after": pa, "sparsity": round(1 - lp.density, 6),
            "groups": lp.n_clusters, "blocks": len(lp.blocks),
        })
    return {
        "units": UNITS, "input_shape": list(input_shape),
        "original": {"macs": before_macs.total, "flops": before_macs.flops, "params": before_params.total},
        "compressed": {"macs": after_macs.total, "flops": after_macs.flops,
                       "params_effective": after_params.effective, "params_stored": after_params.total},
        "macs_ratio": after_macs.total / before_macs.total if before_macs.total else 1.0,
        "params_ratio": after_params.effective / before_params.total if before_params.total else 1.0,
        "pruned_layers": {"count": len(plan.layers), "macs_before": pr_before, "macs_after": pr_after,
                          "macs_reduction": 1 - pr_after / pr_before if pr_before else 0.0},
        "settings": plan.settings,
        "layers": rows,
        "skipped": [{"name": s.name, "reason": s.reason} for s in plan.skipped],
    }


def prune(loaded: LoadedModel, config: PruneConfig, *, output: str | Path | None = None,
          overwrite: bool = False, progress: Progress | None = None,
          after_step: Callable[[nn.Module, int, float], None] | None = None,
          before_save: Callable[[PruneResult], None] | None = None,
          extra_settings: dict[str, Any] | None = None) -> PruneResult:
    """Prune a loaded model and, with ``output``, write the artifact directory atomically.

    ``after_step(model, step, cp)`` runs after every pruning step (the L scheme);
    ``before_save(result)`` may add to ``result.report`` (accuracy) before anything is written.
    """
    if output is not None and Path(output).exists() and not overwrite:
        raise ArtifactError(f"{output} already exists; choose another -o or pass --force to replace it")
    res = prune_model(loaded.model, loaded.spec.input_shape, config, progress=progress, after_step=after_step)
    if before_save is not None:
        before_save(res)
    if output is not None:
        manifest = make_manifest(loaded.spec, stage="pruned", source=loaded.source,
                                 settings={"prune": res.config.to_dict(), **(extra_settings or {})})
        res.path = save_artifact(output, res.model, res.plan, manifest, res.report, overwrite=overwrite)
        size = (res.path / "weights.safetensors").stat().st_size
        res.report["files"] = {"weights.safetensors": size}
        save_artifact_report(res.path, res.report)
    return res


def save_artifact_report(path: Path, report: dict[str, Any]) -> None:
    write_json(Path(path) / "report.json", report)


def report(artifact: str | Path, *, baseline: str | Path | None = None, trust: bool = False) -> dict[str, Any]:
    """Re-measure an artifact: MACs (fvcore, pruned connections not counted), effective
    parameters, file sizes, per-layer before/after. ``baseline`` is the original checkpoint
    (its file size is reported); without it the dense architecture stands in for MACs/params.
    """
    manifest = read_manifest(artifact)
    if manifest.get("stage") == "compact":  # an export: its report was measured when it was made
        path = Path(artifact)
        rep = json.loads((path / "report.json").read_text()) if (path / "report.json").is_file() else {}
        rep.update({"artifact": str(path), "stage": "compact", "model": manifest["model"],
                    "files": {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}})
        return rep
    art = load_artifact(artifact, trust=trust)
    spec, shape = art.spec, art.input_shape
    if baseline is not None:
        base = load_model(baseline, arch=spec.arch if spec.arch != "pickled-module" else None,
                          arch_kwargs=spec.arch_kwargs, num_classes=spec.num_classes,
                          input_shape=shape, trust=trust).model
    elif spec.arch != "pickled-module":
        base = build_model(spec)  # MACs and params of the dense form do not depend on weights
    else:
        base = strip_masks(copy.deepcopy(art.model))
    rep = build_report(art.plan, trace_layers(base, shape), count_macs(base, shape), count_params(base),
                       count_macs(art.model, shape), count_params(art.model), shape)
    rep["artifact"] = str(art.path)
    rep["stage"] = art.manifest.get("stage")
    if art.report and "accuracy" in art.report:  # measured when the artifact was made, on its data
        rep["accuracy"] = art.report["accuracy"]
    rep["model"] = art.manifest["model"]
    files = {p.name: p.stat().st_size for p in sorted(art.path.iterdir()) if p.is_file()}
    if baseline is not None:
        files["baseline:" + Path(baseline).name] = Path(baseline).stat().st_size
    rep["files"] = files
    return rep
