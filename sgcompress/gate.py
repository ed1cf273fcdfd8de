"""The CI regression gate: compare an exported model's semantics with a committed baseline.

A fingerprint holds what defines a model's size and cost, never a hash of a file (which
differs between machines): parameter counts, every tensor's shape, every pruned layer's
group shapes (filters x kept inputs per block), MACs, and the size of the safetensors file.
``compare`` reports every difference and fails on growth beyond the allowed limits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from .errors import ArtifactError, ConfigError

FINGERPRINT = "sgcompress-fingerprint"
VERSION = 1


def fingerprint(path: str | Path) -> dict[str, Any]:
    """The fingerprint of an artifact or export directory, or one read from a JSON file
    (a fingerprint, or a report/check output that contains one)."""
    from .artifact import read_manifest
    from .metrics import count_macs, count_params
    from .plan import CompressionPlan

    path = Path(path)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path} is not JSON ({e}); pass an artifact folder or a fingerprint JSON") from e
        if isinstance(data, dict):
            data = data.get("fingerprint", data)
        if not isinstance(data, dict) or data.get("format") != FINGERPRINT:
            raise ArtifactError(f"{path} holds no sgcompress fingerprint; write one with "
                                "`sgcompress check ARTIFACT --write-baseline FILE`")
        return data
    manifest = read_manifest(path)
    shape = tuple(manifest["model"]["input_shape"])
    plan = CompressionPlan.from_json((path / "plan.json").read_text())
    # Counts come from the plan's structure (the masked model), not from the compact modules:
    # which compact form a layer takes is measured, so it can differ between two exports of the
    # same plan, while the connections the plan keeps cannot.
    model = _masked_model(path, manifest, plan)
    strategies = {}
    if (path / "compact.json").is_file():
        from .compact import strategy_key

        choices = json.loads((path / "compact.json").read_text())
        strategies = {k: strategy_key(v["strategy"], v.get("options", {})) for k, v in sorted(choices.items())}
    weights = path / "weights.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        tensors = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    params = count_params(model)
    report = {}
    if (path / "report.json").is_file():
        report = json.loads((path / "report.json").read_text())
    speedups = {str(lat["batch_size"]): r["speedup"] for lat in report.get("latency", [])
                for r in lat["rows"] if r["model"] == "compact"}
    return {
        "format": FINGERPRINT, "version": VERSION, "stage": manifest.get("stage"),
        "arch": manifest["model"]["arch"], "input_shape": list(shape),
        "params": params.total, "params_effective": params.effective,
        "macs": count_macs(model, shape).total,
        "weights_bytes": weights.stat().st_size,
        "tensors": dict(sorted(tensors.items())),
        "layers": {lp.name: [[len(b.filters), len(b.inputs)] for b in lp.blocks] for lp in plan.layers},
        "strategies": strategies,
        "speedup": speedups,
    }


def _masked_model(path: Path, manifest: dict, plan):
    from .artifact import load_artifact
    from .loading import ModelSpec, build_model
    from .surgery import apply_plan

    if manifest.get("stage") != "compact":
        return load_artifact(path).model
    spec = ModelSpec.from_dict(manifest["model"])
    if spec.arch == "pickled-module":
        raise ArtifactError(f"{path} was made from a pickled nn.Module; the gate needs an architecture spec (--arch)")
    return apply_plan(build_model(spec), plan)  # weights do not change counts


@dataclass
class CheckResult:
    passed: bool
    failures: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    current: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "failures": self.failures, "changes": self.changes,
                "fingerprint": self.current}


def parse_fraction(text: str | float | None, what: str) -> float | None:
    """'0.5%' -> 0.005, '0.01' -> 0.01."""
    if text is None:
        return None
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise ConfigError(f"{what} must be a fraction like 0.005 or a percentage like 0.5%, got {text!r}") from None
    if value < 0:
        raise ConfigError(f"{what} must not be negative, got {text!r}")
    return value


def parse_count(text: str | float | None, what: str) -> float | None:
    """'1.2G' -> 1.2e9, '350M' -> 3.5e8, '1000' -> 1000."""
    if text is None:
        return None
    s = str(text).strip().upper().removesuffix("MACS")
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(s[-1:], 1.0)
    try:
        return float(s[:-1] if scale != 1.0 else s) * scale
    except ValueError:
        raise ConfigError(f"{what} must be a number like 350M or 1.2G, got {text!r}") from None


def _growth(now: float, base: float) -> float:
    return (now - base) / base if base else (0.0 if now == base else float("inf"))


def compare(current: dict[str, Any], baseline: dict[str, Any], *, max_params_growth: float = 0.0,
            max_size_growth: float = 0.005, max_macs: float | None = None,
            max_macs_growth: float = 0.0, min_speedup: float | None = None) -> CheckResult:
    """Every difference between two fingerprints; fails on growth past the limits."""
    res = CheckResult(True, current=current)

    def fail(msg: str) -> None:
        res.passed = False
        res.failures.append(msg)

    same_forms = current.get("strategies", {}) == baseline.get("strategies", {})
    for key, limit, label in (("params", max_params_growth, "parameters"),
                              ("params_effective", max_params_growth, "effective parameters"),
                              ("macs", max_macs_growth, "MACs"),
                              ("weights_bytes", max_size_growth, "weights.safetensors bytes")):
        now, base = current.get(key), baseline.get(key)
        if now is None or base is None or now == base:
            continue
        g = _growth(now, base)
        line = f"{label}: {base:,} -> {now:,} ({100 * g:+.3f} %)"
        if key == "weights_bytes" and not same_forms:
            # another measured compact form stores the same weights in another layout
            res.changes.append(f"{line} (compact forms differ from the baseline's; not a regression by itself)")
        elif g > limit:
            fail(f"{line}, allowed {100 * limit:+.3f} %")
        else:
            res.changes.append(line)
    if max_macs is not None and current.get("macs", 0) > max_macs:
        fail(f"MACs {current['macs']:,} above --max-macs {max_macs:,.0f}")
    if min_speedup is not None:
        sp = current.get("speedup") or {}
        if not sp:
            fail("--min-speedup needs a measured speedup: check a compact export made by `sgcompress export`")
        for bs, v in sorted(sp.items()):
            if v < min_speedup:
                fail(f"measured speedup at batch {bs} is {v:.2f}x, below --min-speedup {min_speedup:.2f}x")
    bt, ct = baseline.get("tensors", {}), current.get("tensors", {})
    for k in sorted(set(bt) | set(ct)):
        if k not in ct:
            res.changes.append(f"tensor {k}: removed (was {bt[k]})")
        elif k not in bt:
            res.changes.append(f"tensor {k}: added {ct[k]}")
        elif bt[k] != ct[k]:
            res.changes.append(f"tensor {k}: shape {bt[k]} -> {ct[k]}")
    bs, cs = baseline.get("strategies", {}), current.get("strategies", {})
    for k in sorted(set(bs) | set(cs)):
        if bs.get(k) != cs.get(k):
            res.changes.append(f"layer {k}: compact form {bs.get(k)} -> {cs.get(k)}")
    bl, cl = baseline.get("layers", {}), current.get("layers", {})
    for k in sorted(set(bl) | set(cl)):
        if bl.get(k) != cl.get(k):
            kept_b = sum(f * i for f, i in bl.get(k, []))
            kept_c = sum(f * i for f, i in cl.get(k, []))
            res.changes.append(f"layer {k}: groups {len(bl.get(k, []))} -> {len(cl.get(k, []))}, "
                               f"kept connections {kept_b:,} -> {kept_c:,}")
    return res
