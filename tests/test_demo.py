"""The demo end to end on the shipped model and real Fashion-MNIST (small settings)."""

from pathlib import Path

import pytest
import torch

from sgcompress.demo import DEFAULT_DATA, DemoConfig, run_demo, shipped_model

needs_data = pytest.mark.skipif(not Path(DEFAULT_DATA).is_dir(),
                                reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def test_shipped_model_is_small_and_described():
    weights, meta = shipped_model()
    assert weights.is_file() and weights.stat().st_size < 5_000_000
    assert meta["arch"] == "sgcompress:resnet20" and meta["input_shape"] == [1, 28, 28]
    assert meta["test_accuracy"] >= 0.91


@needs_data
def test_demo_runs_the_whole_pipeline(tmp_path):
    cfg = DemoConfig(output=str(tmp_path / "demo"), epochs=1, train_images=1000, latency_batches=(1,))
    stages = []
    res = run_demo(cfg, progress=lambda ev: stages.append(ev["stage"]))
    s = res.summary
    assert stages[0] == "load" and stages[-1].startswith("export")
    assert s["test_before"]["top1"] >= 0.9  # the shipped model is a real, trained one
    assert s["pruning"]["compressed"]["macs"] < 0.6 * s["pruning"]["original"]["macs"]
    assert s["test_after_finetuning"]["top1"] > 0.5
    lat = {r["model"]: r for r in s["export"]["latency"][0]["rows"]}
    assert set(lat) == {"dense", "masked", "compact"} and all(r["median_ms"] > 0 for r in lat.values())
    for name in ("pruned", "finetuned", "compact"):
        assert (tmp_path / "demo" / name / "weights.safetensors").is_file()
    import sgcompress

    m = sgcompress.load(tmp_path / "demo" / "compact")
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
