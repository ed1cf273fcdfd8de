"""The Python API on TinyNet: MACs worked out by hand, reports that match the files."""

import json

import pytest
import torch
from safetensors.torch import load_file

import sgcompress
from sgcompress.config import PruneConfig
from sgcompress.metrics import count_macs, count_params
from sgcompress.pipeline import analyze, prune_model

# TinyNet at 1x8x8 (width 8), MACs per image by hand:
HAND_MACS = {
    "stem": 8 * 8 * 8 * 1 * 9,  # 64 positions x 8 filters x 1 input x 3x3 = 4608
    "conv1": 8 * 8 * 8 * 8 * 9,  # 36864
    "conv2": 4 * 4 * 16 * 8 * 9,  # stride 2 -> 16 positions: 18432
    "shortcut": 4 * 4 * 16 * 8,  # 2048
    "dw": 4 * 4 * 16 * 1 * 9,  # depthwise: 2304
    "pw": 4 * 4 * 16 * 16,  # 4096
    "fc": 16 * 10,  # 160
}


def test_fvcore_counts_match_the_hand_figures(tiny):
    macs = count_macs(tiny, (1, 8, 8))
    for name, n in HAND_MACS.items():
        assert macs.by_layer[name] == n, name
    assert macs.total >= sum(HAND_MACS.values())  # fvcore adds BatchNorm


def test_masked_macs_count_only_kept_connections(tiny):
    res = prune_model(tiny, (1, 8, 8), PruneConfig(groups=2, ratio=0.5))
    macs = count_macs(tiny, (1, 8, 8))
    pruned = {lp.name: lp for lp in res.plan.layers}
    assert set(pruned) == {"conv1", "conv2", "pw", "fc"}
    for name, lp in pruned.items():
        mask = getattr(tiny, name).connection_mask
        k = 9 if name in ("conv1", "conv2") else 1
        positions = {"conv1": 64, "conv2": 16, "pw": 16, "fc": 1}[name]
        assert macs.by_layer[name] == positions * int(mask.sum()) * k
    layers = {x["name"]: x for x in res.report["layers"]}
    assert layers["conv1"]["macs_before"] == HAND_MACS["conv1"]
    removed = sum(x["macs_before"] - x["macs_after"] for x in res.report["layers"])
    assert res.report["original"]["macs"] - res.report["compressed"]["macs"] == removed


def test_analyze_lists_every_candidate_with_its_status(tiny):
    a = analyze(tiny, (1, 8, 8), PruneConfig(groups=4, ratio=0.5))
    status = {r["name"]: (r["prunable"], r["reason"]) for r in a["layers"]}
    assert status["conv1"] == (True, None) and status["fc"] == (True, None)
    assert "stem" in status["stem"][1]
    assert "shortcut" in status["shortcut"][1]
    assert "depthwise" in status["dw"][1]
    # what-if: --groups 16 leaves out the 8-filter conv1 (fewer filters than groups) and the 10-unit fc
    by_g = {w["groups"]: w for w in a["what_if"]}
    assert by_g[4]["pruned_layers"] == 4 and by_g[16]["pruned_layers"] == 2
    expected = a["totals"]["macs"] - 0.5 * (HAND_MACS["conv1"] + HAND_MACS["conv2"] + HAND_MACS["pw"]) \
        - 0.5 * HAND_MACS["fc"]
    assert by_g[4]["macs"] == pytest.approx(expected, abs=1)


def test_target_macs_is_met(tiny):
    res = prune_model(tiny, (1, 8, 8), PruneConfig(groups=2, target_macs=0.6))
    assert res.report["macs_ratio"] <= 0.6
    assert res.config.ratio > 0.4  # the ratio was found by the tool


def test_ratio_zero_changes_nothing(tiny):
    x = torch.randn(2, 1, 8, 8)
    ref = tiny(x)
    res = prune_model(tiny, (1, 8, 8), PruneConfig(groups=2, ratio=0.0))
    assert torch.equal(tiny(x), ref)
    assert res.report["macs_ratio"] == 1.0


def test_artifact_round_trip_and_report_matches_the_file(tiny_file, tmp_path):
    ckpt, src = tiny_file
    lm = sgcompress.load_model(ckpt, arch=f"{src}:TinyNet", input_shape=(1, 8, 8))
    res = sgcompress.prune(lm, PruneConfig(groups=2, ratio=0.5), output=tmp_path / "art")
    x = torch.randn(3, 1, 8, 8)
    loaded = sgcompress.load(tmp_path / "art")
    torch.testing.assert_close(loaded(x), res.model(x))
    for f in ("plan.json", "weights.safetensors", "manifest.json", "report.json"):
        assert (tmp_path / "art" / f).is_file()
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["model"]["input_shape"] == [1, 8, 8] and manifest["settings"]["prune"]["groups"] == 2
    assert "torch" in manifest["versions"]
    rep = sgcompress.report(tmp_path / "art")
    tensors = load_file(str(tmp_path / "art" / "weights.safetensors"))
    params = dict(loaded.named_parameters())
    assert rep["compressed"]["params_stored"] == sum(tensors[k].numel() for k in params)
    pruned_weights = {f"{lp.name}.weight" for lp in res.plan.layers}
    # random weights: no kept weight is exactly 0, so pruned = zero entries of the pruned layers' weights
    effective = sum(int((tensors[k] != 0).sum()) if k in pruned_weights else tensors[k].numel() for k in params)
    assert rep["compressed"]["params_effective"] == effective
    assert rep["compressed"]["params_effective"] == count_params(loaded).effective
    assert rep["files"]["weights.safetensors"] == (tmp_path / "art" / "weights.safetensors").stat().st_size


def test_latencies_are_measured_interleaved_round_by_round():
    from sgcompress.metrics import measure_latencies

    calls = []

    class Log(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            calls.append(self.name)
            return x + self.w

    models = {"a": Log("a").eval(), "b": Log("b").train()}
    lats = measure_latencies(models, (2,), batch_size=3, threads=1, warmup=1, repeats=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then one run of each per round
    assert {n: (lat.repeats, lat.batch_size, lat.threads) for n, lat in lats.items()} == {"a": (3, 3, 1),
                                                                                           "b": (3, 3, 1)}
    assert all(0 < lat.p10_ms <= lat.median_ms <= lat.p90_ms for lat in lats.values())
    assert models["b"].training and not models["a"].training  # modes restored


def test_interleaved_timing_appends_to_earlier_samples():
    from sgcompress.metrics import time_interleaved

    order = []
    calls = {k: (lambda k=k: order.append(k)) for k in "abc"}
    times = time_interleaved(calls, warmup=1, repeats=2)
    assert order == list("abc") * 3 and {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2, "c": 2}
    order.clear()
    again = time_interleaved({"a": calls["a"], "c": calls["c"]}, repeats=3, times=times)
    assert again is times and order == list("acacac")
    assert {k: len(v) for k, v in times.items()} == {"a": 5, "b": 2, "c": 5}
