"""Tests of the training engine (sgcompress.finetune) on real data: scikit-learn's digits."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal

import numpy as np
import pytest

from sgcompress import _io as shared_io
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

from sgcompress.errors import CheckpointError, ConfigError, DataError, TrainingError, TrainingInterrupted
from sgcompress.finetune import (
    TrainConfig, atomic_write_bytes, evaluate, recalibrate_bn, train,
)
from sgcompress.layers import MaskedConv2d, MaskedLinear, masked_layers
from sgcompress.training.loop import training_loss

CFG = TrainConfig(epochs=3, lr=0.2, schedule="cosine", batch_size=32, max_steps_per_epoch=10, seed=3)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])


class NaNSwitch(nn.Module):
    """Passes its input through, or turns it into NaN once ``on`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False

    def forward(self, x):
        return x * float("nan") if self.on else x


def tiny_model(seed: int = 0) -> nn.Sequential:
    """Conv-BN-ReLU, a masked conv (about half the connections pruned), dropout, a masked linear."""
    torch.manual_seed(seed)
    conv = MaskedConv2d.from_dense(nn.Conv2d(8, 16, 3, padding=1))
    fc = MaskedLinear.from_dense(nn.Linear(64, 10))
    g = torch.Generator().manual_seed(100 + seed)
    conv.set_mask((torch.rand(16, 8, generator=g) > 0.5).float())
    fc.set_mask((torch.rand(10, 64, generator=g) > 0.3).float())
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), conv, nn.BatchNorm2d(16),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.3), fc, NaNSwitch())


def weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def optimizer_states_equal(a: dict, b: dict) -> bool:
    sa, sb = a["state"], b["state"]
    return sa.keys() == sb.keys() and all(
        torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa
    ) and a["param_groups"] == b["param_groups"]


def stable(history: list[dict]) -> list[dict]:
    """Log records without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in history]


def load_last(out):
    return torch.load(out / "last.pt", weights_only=True)


# ------------------------------------------------------------------------------ config
def test_config_roundtrip_and_validation():
    cfg = TrainConfig(epochs=7, schedule="cosine", nesterov=True, max_steps_per_epoch=3)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert TrainConfig.from_dict(d) == cfg
    with pytest.raises(ConfigError, match="unknown training setting.*bogus"):
        TrainConfig.from_dict({**d, "bogus": 1})
    for bad in ({"epochs": 0}, {"lr": -1.0}, {"lr": float("nan")}, {"schedule": "linear"},
                {"momentum": 0.0, "nesterov": True}, {"distill_weight": 1.5}, {"batch_size": 0},
                {"max_steps_per_epoch": 0}, {"epochs": True}):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)


def test_lr_schedules():
    step = TrainConfig(epochs=9, lr=1.0)
    assert [step.lr_at(e) for e in range(9)] == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])
    assert [TrainConfig(epochs=90).lr_at(e) for e in (29, 30, 59, 60)] == pytest.approx([0.01, 0.001, 0.001, 1e-4])
    assert TrainConfig(epochs=1, lr=0.5).lr_at(0) == 0.5
    cos = TrainConfig(epochs=4, lr=2.0, schedule="cosine")
    assert [cos.lr_at(e) for e in range(4)] == pytest.approx([2.0, 1 + math.cos(math.pi / 4), 1.0,
                                                              1 + math.cos(3 * math.pi / 4)])


# ------------------------------------------------------------------------ training runs
def test_train_log_best_checkpoint_and_masks(digits, tmp_path):
    train_set, val_set = digits
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    events = []
    res = train(model, train_set, val_set, CFG, tmp_path, callback=events.append)

    lines = [json.loads(s) for s in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3] and lines == json.loads(json.dumps(res.history))
    for r in lines:
        assert {"train_loss", "train_acc", "val_loss", "val_top1", "val_top5", "lr", "seconds",
                "images_per_s"} <= r.keys()
        assert r["val_n"] == len(val_set) and r["train_images"] == 10 * 32
    assert [r["lr"] for r in lines] == pytest.approx([0.2, 0.15, 0.05])
    assert lines[-1]["val_top1"] > 0.5  # it learned something (chance is 0.1)
    best = max(lines, key=lambda r: (r["val_top1"], -r["val_loss"]))
    assert res.best["epoch"] == best["epoch"]

    # The model ends holding the best weights, which are the ones in best.safetensors.
    saved = load_file(str(tmp_path / "best.safetensors"))
    assert weights_equal(saved, model.state_dict())
    assert not weights_equal(before, model.state_dict())

    # Pruned connections are exactly zero everywhere: model, best file, resume state.
    last = load_last(tmp_path)["model"]
    for name, layer in masked_layers(model).items():
        pruned = layer.weight_mask().expand_as(layer.weight) == 0
        assert pruned.any()
        for w in (layer.weight.detach(), saved[f"{name}.weight"], last[f"{name}.weight"]):
            assert torch.all(w[pruned] == 0)
        assert not torch.equal(layer.weight.detach()[~pruned], before[f"{name}.weight"][~pruned])

    kinds = [e["kind"] for e in events]
    assert kinds[0] == "train_start" and kinds[-1] == "train_end"
    assert kinds.count("epoch_end") == 3 and kinds.count("batch") == 30
    batch = next(e for e in events if e["kind"] == "batch")
    assert {"loss", "acc", "images_per_s", "step", "steps", "epoch"} <= batch.keys()


def test_resume_mid_epoch_is_bitwise_identical(digits, tmp_path):
    train_set, val_set = digits
    ref_model = tiny_model()
    ref = train(ref_model, train_set, val_set, CFG, tmp_path / "ref")

    seen = []

    def interrupt_after_13_batches(event):
        if event["kind"] == "batch":
            seen.append(event)
            if len(seen) == 13:  # epoch 2, step 3
                os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "run"
    prev_handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as ei:
        train(tiny_model(), train_set, val_set, CFG, out, callback=interrupt_after_13_batches)
    assert ei.value.exit_code == 130 and ei.value.checkpoint == str(out / "last.pt")
    assert signal.getsignal(signal.SIGINT) is prev_handler
    state = load_last(out)  # weights_only=True: tensors and plain data only
    assert (state["epoch"], state["step"]) == (1, 3) and len(state["history"]) == 1
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 1

    torch.manual_seed(12345)  # disturb every global RNG stream: resume must restore them
    random.seed(1)
    np.random.seed(1)
    model = tiny_model()
    res = train(model, train_set, val_set, CFG, out, resume=True)
    assert res.resumed_from == {"epoch": 2, "step": 3}
    assert weights_equal(model.state_dict(), ref_model.state_dict())
    a, b = load_last(out), load_last(tmp_path / "ref")
    assert weights_equal(a["model"], b["model"])
    assert optimizer_states_equal(a["optimizer"], b["optimizer"])
    assert stable(res.history) == stable(ref.history)
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 3

    # Resuming a finished run does no more work and gives the same result.
    again = tiny_model()
    res2 = train(again, train_set, val_set, CFG, out, resume=True)
    assert stable(res2.history) == stable(ref.history)
    assert weights_equal(again.state_dict(), ref_model.state_dict())


class NoisyDigits(TensorDataset):
    """Random augmentation from the global torch RNG, as torchvision transforms do."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x + 0.05 * torch.randn_like(x), y


def test_resume_with_worker_processes_and_augmentation_is_bitwise_identical(digits, tmp_path):
    train_set, val_set = digits
    noisy = NoisyDigits(*train_set.tensors)
    cfg = TrainConfig(epochs=1, lr=0.2, batch_size=32, max_steps_per_epoch=6, workers=2)
    ref = tiny_model()
    train(ref, noisy, val_set, cfg, tmp_path / "ref")

    def stop_at_3(event):
        if event["kind"] == "batch" and event["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(tiny_model(), noisy, val_set, cfg, tmp_path / "run", callback=stop_at_3)
    model = tiny_model()
    train(model, noisy, val_set, cfg, tmp_path / "run", resume=True)
    assert weights_equal(model.state_dict(), ref.state_dict())


def test_sigterm_exit_code_and_second_signal_aborts(digits, tmp_path):
    train_set, val_set = digits
    cfg = TrainConfig(epochs=1, batch_size=32, max_steps_per_epoch=4)

    def term(event):
        if event["kind"] == "batch" and event["step"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as ei:
        train(tiny_model(), train_set, val_set, cfg, tmp_path / "a", callback=term)
    assert ei.value.exit_code == 143
    assert load_last(tmp_path / "a")["step"] == 1

    def twice(event):
        if event["kind"] == "batch" and event["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as ei:
        train(tiny_model(), train_set, val_set, cfg, tmp_path / "b", callback=twice)
    assert ei.value.exit_code == 130 and ei.value.checkpoint is None
    assert not (tmp_path / "b" / "last.pt").exists()


def _all_finite(tensors: dict) -> bool:
    return all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_nan_loss_stops_without_a_nonfinite_checkpoint(digits, tmp_path):
    train_set, val_set = digits
    model = tiny_model()

    def poison_after_epoch_1(event):
        if event["kind"] == "epoch_end" and event["epoch"] == 1:
            model[-1].on = True

    with pytest.raises(TrainingError, match=r"not finite.*epoch 2, step 1.*--lr"):
        train(model, train_set, val_set, CFG, tmp_path / "a", callback=poison_after_epoch_1)
    state = load_last(tmp_path / "a")
    assert state["epoch"] == 1 and _all_finite(state["model"])
    assert _all_finite(load_file(str(tmp_path / "a" / "best.safetensors")))

    with pytest.raises(TrainingError, match="--lr"):
        train(tiny_model(), train_set, val_set, TrainConfig(**{**CFG.to_dict(), "lr": 1e30}), tmp_path / "b")
    last = tmp_path / "b" / "last.pt"
    assert not last.exists() or _all_finite(load_last(tmp_path / "b")["model"])


def test_distillation(digits, tmp_path):
    train_set, val_set = digits
    # Hand-worked loss: student logits (0, 0), teacher (ln 3, 0) -> p_t = (3/4, 1/4), p_s = (1/2, 1/2).
    s, t, y = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([0])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    cfg = TrainConfig(distill=True, distill_temperature=1.0, distill_weight=0.25)
    assert training_loss(s, y, cfg, t).item() == pytest.approx(0.75 * math.log(2) + 0.25 * kl)
    cfg2 = TrainConfig(distill=True, distill_temperature=2.0, distill_weight=1.0)
    assert training_loss(s, y, cfg2, s).item() == pytest.approx(0.0, abs=1e-7)  # same logits: no KL

    with pytest.raises(ConfigError, match="teacher"):
        train(tiny_model(), train_set, val_set, TrainConfig(distill=True), tmp_path / "x")
    base = TrainConfig(epochs=1, batch_size=32, max_steps_per_epoch=3)
    plain = train(tiny_model(), train_set, val_set, base, tmp_path / "p")
    teacher = tiny_model(seed=7)
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kd = train(tiny_model(), train_set, val_set, TrainConfig(**{**base.to_dict(), "distill": True}), tmp_path / "d",
               teacher=teacher)
    assert kd.history[0]["train_loss"] != plain.history[0]["train_loss"]
    assert math.isfinite(kd.history[0]["train_loss"])
    assert weights_equal(teacher.state_dict(), t_before) and teacher.training  # teacher untouched


def test_resume_guards(digits, tmp_path):
    train_set, val_set = digits
    cfg = TrainConfig(epochs=1, batch_size=32, max_steps_per_epoch=2)
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(tiny_model(), train_set, val_set, cfg, tmp_path, resume=True)
    train(tiny_model(), train_set, val_set, cfg, tmp_path)
    with pytest.raises(ConfigError, match="already holds"):
        train(tiny_model(), train_set, val_set, cfg, tmp_path)
    with pytest.raises(ConfigError, match="lr"):
        train(tiny_model(), train_set, val_set, TrainConfig(**{**cfg.to_dict(), "lr": 0.1}), tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="masks"):
        train(tiny_model(seed=1), train_set, val_set, cfg, tmp_path, resume=True)
    (tmp_path / "last.pt").write_bytes((tmp_path / "last.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="last.pt"):
        train(tiny_model(), train_set, val_set, cfg, tmp_path, resume=True)
    bad_labels = TensorDataset(train_set.tensors[0][:64], train_set.tensors[1][:64] + 5)
    with pytest.raises(DataError, match="labels range"):
        train(tiny_model(), bad_labels, val_set, cfg, tmp_path / "labels")
    with pytest.raises(DataError, match="empty"):
        train(tiny_model(), train_set, TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0)), cfg, tmp_path / "e")


# ------------------------------------------------------------------------ disk full
def _enospc_after(n_bytes: int):
    def write(fd, data):
        if n_bytes and len(data) > n_bytes:
            os.write(fd, bytes(data[:n_bytes]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write


def test_atomic_write_enospc_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old contents")
    monkeypatch.setattr(shared_io, "_os_write", _enospc_after(4))
    with pytest.raises(OSError) as ei:
        atomic_write_bytes(target, b"new contents that do not fit")
    assert ei.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temp file left behind


def test_enospc_during_training_keeps_last_checkpoint(digits, tmp_path, monkeypatch):
    train_set, val_set = digits
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=32, max_steps_per_epoch=3)
    kept = {}

    def disk_fills_after_epoch_1(event):
        if event["kind"] == "epoch_end" and event["epoch"] == 1:
            kept["last"] = (tmp_path / "last.pt").read_bytes()
            kept["best"] = (tmp_path / "best.safetensors").read_bytes()
            monkeypatch.setattr(shared_io, "_os_write", _enospc_after(1000))

    with pytest.raises(TrainingError, match="intact"):
        train(tiny_model(), train_set, val_set, cfg, tmp_path, callback=disk_fills_after_epoch_1)
    assert (tmp_path / "last.pt").read_bytes() == kept["last"]
    assert (tmp_path / "best.safetensors").read_bytes() == kept["best"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "last.pt", "train_log.jsonl"]

    monkeypatch.undo()  # space freed: resume finishes, and the log holds each epoch once
    res = train(tiny_model(), train_set, val_set, cfg, tmp_path, resume=True)
    assert res.resumed_from == {"epoch": 2, "step": 0}
    lines = [json.loads(s) for s in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    ref = train(tiny_model(), train_set, val_set, cfg, tmp_path / "ref")
    assert stable(res.history) == stable(ref.history)


# ------------------------------------------------------------------------ evaluate / BN
def test_evaluate_hand_made_logits():
    down = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    x = torch.tensor([down, down, down, down[::-1]])
    y = torch.tensor([0, 4, 5, 5])  # top-1 hit; rank 5 (top-5 hit only); rank 6 (miss); top-1 hit
    model = nn.Identity().train()
    r = evaluate(model, TensorDataset(x, y), batch_size=3)
    assert (r.top1, r.top5, r.n) == (0.5, 0.75, 4)
    lse = math.log(sum(math.exp(v) for v in down))
    assert r.loss == pytest.approx(((lse - 6) + (lse - 2) + (lse - 1) + (lse - 6)) / 4, rel=1e-6)
    assert r.loss == pytest.approx(F.cross_entropy(x, y).item(), rel=1e-6)
    assert model.training  # mode restored
    with pytest.raises(DataError):
        evaluate(model, TensorDataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)))


def test_recalibrate_bn_hand_check_and_no_weight_change(digits):
    x = torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1)
    bn = nn.BatchNorm2d(1, momentum=0.3)
    with torch.no_grad():
        bn.running_mean.fill_(100.0)
    net = nn.Sequential(bn).eval()
    used = recalibrate_bn(net, TensorDataset(x), batches=4, batch_size=10, seed=1)
    assert used == 40 and int(bn.num_batches_tracked) == 4
    assert bn.running_mean.item() == pytest.approx(19.5)  # cumulative average of equal batches = mean
    assert bn.momentum == 0.3 and not bn.training
    assert recalibrate_bn(net, TensorDataset(x), batches=2, batch_size=10) == 20

    train_set, _ = digits
    model = tiny_model()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_bn(model, train_set, batches=3, batch_size=64) == 192
    after = model.state_dict()
    for k, v in before.items():
        if "running" in k or "num_batches" in k:
            assert not torch.equal(v, after[k]), k
        else:
            assert torch.equal(v, after[k]), k
    assert not any(m.training for m in model.modules())
    with pytest.raises(ConfigError):
        recalibrate_bn(model, train_set, batches=0)
