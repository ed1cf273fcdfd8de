"""Pruning with data, the L / G / LG fine-tuning schemes, evaluation and resume, through the CLI.

TinyNet (1x8x8, 10 classes) on scikit-learn's digits, in process through typer's CliRunner.
Runs are kept tiny (300 training images, 3 optimizer steps per epoch, one BatchNorm batch):
the tests check what is recorded and kept, not how well the model learns.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from test_cli import SHAPE, assert_user_error, invoke, ok
from typer.testing import CliRunner

import sgcompress
from sgcompress import cli
from sgcompress.data import load_data
from sgcompress.errors import TrainingInterrupted
from sgcompress.finetune import TrainConfig
from sgcompress.layers import MASKED_TYPES
from sgcompress.tuning import accuracy, finetune

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--limit", 300, "--batch-size", 32, "--max-steps-per-epoch", 3, "--bn-batches", 1]
METRICS = {"top1", "top5", "loss", "n"}
DIGITS_TEST_IMAGES = 360  # the fixed 20 % of the 1,797 digits
VAL_IMAGES = 30  # 10 % of --limit 300


@pytest.fixture(scope="module")
def runner():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli.out, "_width", 300)  # no wrapped lines in what we grep
        yield CliRunner()


@pytest.fixture(scope="module")
def tiny(tiny_file_module):
    ckpt, src = tiny_file_module
    return ckpt, ["--arch", f"{src}:TinyNet", "--input-shape", SHAPE]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("tuning")


@pytest.fixture(scope="module")
def pruned(runner, tiny, work):
    """`prune --data digits` (no scheme): the artifact and the CLI result."""
    ckpt, base = tiny
    out = work / "pruned"
    res = ok(invoke(runner, "prune", ckpt, *base, "--groups", 2, "--ratio", 0.5, "--data", "digits", *QUICK,
                    "-o", out))
    return out, res


@pytest.fixture(scope="module")
def local(runner, tiny, work):
    """`prune --scheme local` with two pruning steps, one retraining epoch after each."""
    ckpt, base = tiny
    out = work / "local"
    res = ok(invoke(runner, "prune", ckpt, *base, "--groups", 2, "--ratio", 0.5, "--steps", 2, "--scheme", "local",
                    "--local-epochs", 1, "--data", "digits", *QUICK, "-o", out))
    return out, res


@pytest.fixture(scope="module")
def finetuned(runner, pruned, work):
    """`finetune --scheme global --epochs 2` on the pruned artifact (the G scheme)."""
    out = work / "finetuned"
    res = ok(invoke(runner, "finetune", pruned[0], "--scheme", "global", "--epochs", 2, "--data", "digits", *QUICK,
                    "-o", out))
    return out, res


def assert_masks_hold(path):
    """Every pruned connection of the artifact's plan is stored as exactly zero, and kept ones are not all zero."""
    art = sgcompress.load_artifact(path)
    state = load_file(path / "weights.safetensors")
    assert art.plan.layers
    for lp in art.plan.layers:
        mask = lp.mask()
        assert 0 < int(mask.sum()) < mask.numel(), lp.name
        w = state[f"{lp.name}.weight"]
        assert torch.count_nonzero(w[mask == 0]) == 0, lp.name
        assert torch.count_nonzero(w[mask == 1]) > 0, lp.name
        assert torch.equal(art.model.get_submodule(lp.name).connection_mask, mask), lp.name
    return art


def assert_metrics(m, n=None):
    assert METRICS <= set(m), m
    assert 0.0 <= m["top1"] <= m["top5"] <= 1.0 and m["loss"] > 0
    if n is not None:
        assert m["n"] == n


# -------------------------------------------------------------------------- prune --data


def test_prune_with_data_reports_accuracy_before_and_after_pruning(pruned, tiny):
    out, res = pruned
    acc = json.loads((out / "report.json").read_text())["accuracy"]
    assert acc["data"] == "digits" and acc["split"] == "val" and acc["scheme"] == "none"
    assert_metrics(acc["before_pruning"], VAL_IMAGES)
    after = acc["after_pruning"]
    assert_metrics(after["without_bn_reestimation"], VAL_IMAGES)
    assert_metrics(after["with_bn_reestimation"], VAL_IMAGES)
    assert after["bn_images"] == 128  # --bn-batches 1 of 128 images
    assert "local_steps" not in acc
    text = res.stdout
    assert "accuracy before pruning (val): top-1" in text
    assert "accuracy after pruning, old BatchNorm statistics: top-1" in text
    assert "accuracy after pruning, BatchNorm re-estimated on 128 images: top-1" in text
    assert not (out.parent / "pruned.train").exists()

    # the artifact holds the re-estimated statistics: its accuracy on the same validation split is the one reported
    model = sgcompress.load(out)
    fresh = sgcompress.load_model(tiny[0], arch=tiny[1][1], input_shape=(1, 8, 8)).model
    assert not torch.equal(model.bn1.running_mean, fresh.bn1.running_mean)
    data = load_data("digits", input_shape=(1, 8, 8), limit=300, seed=0)
    again = accuracy(model, data.val)
    assert again["top1"] == after["with_bn_reestimation"]["top1"]
    assert again["loss"] == pytest.approx(after["with_bn_reestimation"]["loss"], rel=1e-5)


# ------------------------------------------------------------------------------ L scheme


def test_local_scheme_retrains_after_every_step_and_keeps_pruned_weights_zero(local):
    out, res = local
    acc = json.loads((out / "report.json").read_text())["accuracy"]
    assert acc["scheme"] == "local"
    steps = acc["local_steps"]
    assert [s["step"] for s in steps] == [1, 2]  # --steps 2: one entry per pruning step
    assert steps[-1]["cp"] == pytest.approx(0.5) and 0 < steps[0]["cp"] < steps[-1]["cp"]
    for s in steps:
        assert s["best"]["epoch"] == 1 and s["best"]["epochs"] == 1
        assert s["best"]["steps"] == 3 and s["best"]["train_images"] == 96  # 3 steps of 32
        assert 0.0 <= s["best"]["val_top1"] <= 1.0
    assert_metrics(acc["after_pruning"]["with_bn_reestimation"], VAL_IMAGES)
    assert "L scheme: retraining after step 1" in res.stderr and "L scheme: retraining after step 2" in res.stderr
    assert_masks_hold(out)
    assert not (out.parent / "local.train").exists()  # the per-step training folders are cleaned up


def test_local_scheme_changes_the_weights(local, pruned):
    """Same plan settings, but the L-scheme weights were retrained: kept weights differ from plain pruning."""
    a = load_file(local[0] / "weights.safetensors")
    b = load_file(pruned[0] / "weights.safetensors")
    assert a.keys() == b.keys()
    assert not torch.equal(a["conv1.weight"], b["conv1.weight"])


# ------------------------------------------------------------------------------ G and LG


def test_global_scheme_writes_a_finetuned_artifact(finetuned, pruned):
    out, res = finetuned
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "finetuned"
    assert manifest["history"][-1]["stage"] == "pruned"
    ft = manifest["settings"]["finetune"]
    assert ft["scheme"] == "global" and ft["epochs"] == 2 and ft["max_steps_per_epoch"] == 3 and ft["bn_batches"] == 1

    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]

    acc = json.loads((out / "report.json").read_text())["accuracy"]
    assert_metrics(acc["test"], DIGITS_TEST_IMAGES)
    assert_metrics(acc["after_pruning"]["with_bn_reestimation"], VAL_IMAGES)
    best = acc["best_epoch"]
    assert best["epoch"] in (1, 2) and best == log[best["epoch"] - 1]
    assert "test accuracy after fine-tuning: top-1" in res.stdout and f"wrote {out}" in res.stdout

    art = assert_masks_hold(out)
    assert art.plan == sgcompress.load_artifact(pruned[0]).plan  # the structure is unchanged
    model = sgcompress.load(out)
    assert {n for n, m in model.named_modules() if isinstance(m, MASKED_TYPES)} == {"conv1", "conv2", "pw", "fc"}
    with torch.no_grad():
        y = model(torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert y.shape == (3, 10) and torch.isfinite(y).all()
    assert not (out.parent / "finetuned.train").exists()
    before, after = load_file(pruned[0] / "weights.safetensors"), load_file(out / "weights.safetensors")
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])  # it did train


def test_lg_scheme_finetunes_the_local_scheme_output(runner, local, work):
    out = work / "lg"
    ok(invoke(runner, "finetune", local[0], "--epochs", 1, "--data", "digits", *QUICK, "-o", out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "finetuned" and manifest["history"][-1]["stage"] == "pruned"
    assert_masks_hold(out)
    assert sgcompress.load_artifact(out).plan == sgcompress.load_artifact(local[0]).plan
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 1
    assert not (work / "lg.train").exists()


def test_finetune_refuses_the_local_scheme(runner, pruned, tmp_path):
    out = tmp_path / "out"
    r = invoke(runner, "finetune", pruned[0], "--scheme", "local", "--data", "digits", "-o", out)
    assert_user_error(r, "global scheme", "sgcompress prune", "--scheme local", out_dir=out)


def test_prune_schemes_that_cannot_run(runner, tiny, tmp_path):
    ckpt, base = tiny
    out = tmp_path / "out"
    assert_user_error(invoke(runner, "prune", ckpt, *base, "--scheme", "local", "-o", out), "--data", out_dir=out)
    assert_user_error(invoke(runner, "prune", ckpt, *base, "--scheme", "global", "--data", "digits", "-o", out),
                      "sgcompress finetune", out_dir=out)


# ------------------------------------------------------------------------------ evaluate


def test_evaluate_a_pruned_artifact_shows_bn_reestimation(runner, pruned):
    res = ok(invoke(runner, "evaluate", pruned[0], "--data", "digits", "--bn-batches", 1))
    assert f"digits (test, {DIGITS_TEST_IMAGES} images): top-1" in res.stdout
    assert "with BatchNorm statistics re-estimated: top-1" in res.stdout
    j = json.loads(ok(invoke(runner, "evaluate", pruned[0], "--data", "digits", "--bn-batches", 1, "--json")).stdout)
    assert j["split"] == "test" and j["data"] == "digits"
    assert_metrics(j, DIGITS_TEST_IMAGES)
    assert_metrics(j["with_bn_reestimation"], DIGITS_TEST_IMAGES)


def test_evaluate_a_finetuned_artifact_matches_its_report(runner, finetuned):
    out, _ = finetuned
    res = ok(invoke(runner, "evaluate", out, "--data", "digits"))
    assert "with BatchNorm statistics re-estimated" not in res.stdout  # its statistics were trained
    j = json.loads(ok(invoke(runner, "evaluate", out, "--data", "digits", "--json")).stdout)
    assert_metrics(j, DIGITS_TEST_IMAGES)
    assert "with_bn_reestimation" not in j
    test = json.loads((out / "report.json").read_text())["accuracy"]["test"]
    assert j["top1"] == test["top1"] and j["top5"] == test["top5"]
    assert j["loss"] == pytest.approx(test["loss"], rel=1e-5)


def test_evaluate_a_plain_checkpoint(runner, tiny):
    ckpt, base = tiny
    res = ok(invoke(runner, "evaluate", ckpt, *base, "--data", "digits"))
    assert f"digits (test, {DIGITS_TEST_IMAGES} images)" in res.stdout
    j = json.loads(ok(invoke(runner, "evaluate", ckpt, *base, "--data", "digits", "--json")).stdout)
    assert_metrics(j, DIGITS_TEST_IMAGES)
    assert "with_bn_reestimation" not in j  # only freshly pruned artifacts get it


# -------------------------------------------------------------------------------- resume


def test_interrupted_finetune_resumes_to_the_uninterrupted_result(runner, pruned, tmp_path):
    art = pruned[0]
    out = tmp_path / "resumed"
    # exactly what the CLI builds from the arguments below
    cfg = TrainConfig(epochs=2, lr=0.01, batch_size=32, max_steps_per_epoch=3, seed=0)
    data = load_data("digits", input_shape=(1, 8, 8), limit=300, seed=0, augment=True)
    seen = []

    def ctrl_c_after_epoch_1(ev):
        seen.append(ev["kind"])
        if ev["kind"] == "epoch_end" and ev["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    # BatchNorm re-estimation before training draws its crops from the global RNG (see
    # test_same_finetune_twice_gives_the_same_weights): give both runs the same state
    torch.manual_seed(1234)
    with pytest.raises(TrainingInterrupted) as info:
        finetune(art, data, cfg, out, bn_batches=1, callback=ctrl_c_after_epoch_1)
    assert info.value.exit_code == 130
    assert "interrupted" in seen and seen.count("epoch_end") == 1
    assert not out.exists()
    work = tmp_path / "resumed.train"
    assert (work / "last.pt").is_file() and len((work / "train_log.jsonl").read_text().splitlines()) == 1

    args = ["--epochs", 2, "--data", "digits", *QUICK]
    res = ok(invoke(runner, "finetune", art, *args, "-o", out, "--resume"))
    assert f"wrote {out}" in res.stdout
    assert not work.exists()
    straight = tmp_path / "straight"
    torch.manual_seed(1234)
    ok(invoke(runner, "finetune", art, *args, "-o", straight))

    a, b = load_file(out / "weights.safetensors"), load_file(straight / "weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_a = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (straight / "train_log.jsonl").read_text().splitlines()]
    drop = ("seconds", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in log_a] == \
           [{k: v for k, v in r.items() if k not in drop} for r in log_b]
    test_a = json.loads((out / "report.json").read_text())["accuracy"]["test"]
    test_b = json.loads((straight / "report.json").read_text())["accuracy"]["test"]
    assert test_a == test_b


BN_RNG_BUG = ("recalibrate_bn draws the training set's random crops from the global torch RNG, so the "
              "BatchNorm statistics re-estimated before fine-tuning / after pruning depend on whatever ran "
              "before; the same command twice gives different weights")



def test_same_finetune_twice_gives_the_same_weights(runner, pruned, tmp_path):
    args = [pruned[0], "--epochs", 1, "--data", "digits", *QUICK]
    torch.manual_seed(1)  # whatever the process did before must not matter
    ok(invoke(runner, "finetune", *args, "-o", tmp_path / "a"))
    torch.manual_seed(2)
    ok(invoke(runner, "finetune", *args, "-o", tmp_path / "b"))
    a, b = load_file(tmp_path / "a" / "weights.safetensors"), load_file(tmp_path / "b" / "weights.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []



def test_same_prune_with_data_twice_gives_the_same_weights(runner, tiny, tmp_path):
    ckpt, base = tiny
    for seed, out in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        ok(invoke(runner, "prune", ckpt, *base, "--groups", 2, "--data", "digits", *QUICK, "-o", tmp_path / out))
    a, b = load_file(tmp_path / "a" / "weights.safetensors"), load_file(tmp_path / "b" / "weights.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_resume_with_nothing_to_resume(runner, pruned, tmp_path):
    out = tmp_path / "out"
    r = invoke(runner, "finetune", pruned[0], "--epochs", 1, "--data", "digits", *QUICK, "-o", out, "--resume")
    assert_user_error(r, "nothing to resume", "without --resume", out_dir=out)
    assert not (tmp_path / "out.train").exists()


# -------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def five_classes(tiny_file_module, write_tiny):
    """TinyNet(num_classes=5) saved next to the 10-class checkpoint."""
    return write_tiny(tiny_file_module[0].parent, num_classes=5)


@pytest.mark.parametrize("case", ["missing-folder", "empty-folder", "classes-by-num-classes",
                                  "classes-by-arch-kwargs", "input-shape"])
def test_prune_with_unusable_data(runner, tiny, five_classes, tmp_path, case):
    ckpt, base = tiny
    arch = base[:2]
    data, words = "digits", ()
    if case == "missing-folder":
        data, words = str(tmp_path / "nonexistent"), ("does not exist",)
    elif case == "empty-folder":
        (tmp_path / "empty").mkdir()
        data, words = str(tmp_path / "empty"), ("is empty",)
    elif case == "classes-by-num-classes":
        ckpt, base = five_classes[0], [*arch, "--input-shape", SHAPE, "--num-classes", 5]
        words = ("class-count mismatch", "10 classes", "outputs 5")
    elif case == "classes-by-arch-kwargs":
        ckpt, base = five_classes[0], [*arch, "--input-shape", SHAPE, "--arch-kwargs", '{"num_classes": 5}']
        words = ("class-count mismatch", "10 classes", "outputs 5")
    elif case == "input-shape":
        base, words = [*arch, "--input-shape", "3,8,8"], ("3,8,8", "--input-shape")
    out = tmp_path / "out"
    r = invoke(runner, "prune", ckpt, *base, "--data", data, *QUICK, "-o", out)
    assert_user_error(r, *words, out_dir=out)
    assert not (tmp_path / "out.train").exists()
    r = invoke(runner, "prune", ckpt, *base, "--scheme", "local", "--data", data, *QUICK, "-o", out)
    assert_user_error(r, *words, out_dir=out)
    assert not (tmp_path / "out.train").exists()


@pytest.mark.parametrize("case", ["missing-folder", "empty-folder"])
def test_finetune_and_evaluate_with_unusable_data(runner, pruned, tmp_path, case):
    folder = tmp_path / ("nonexistent" if case == "missing-folder" else "empty")
    if case == "empty-folder":
        folder.mkdir()
    word = "does not exist" if case == "missing-folder" else "is empty"
    out = tmp_path / "out"
    assert_user_error(invoke(runner, "finetune", pruned[0], "--data", folder, "--epochs", 1, "-o", out), word,
                      out_dir=out)
    assert not (tmp_path / "out.train").exists()
    assert_user_error(invoke(runner, "evaluate", pruned[0], "--data", folder), word)


def test_finetune_and_evaluate_a_five_class_model_on_ten_class_data(runner, tiny, five_classes, tmp_path):
    ckpt, src = five_classes
    assert_user_error(invoke(runner, "evaluate", ckpt, "--arch", f"{src}:TinyNet", "--input-shape", SHAPE,
                             "--num-classes", 5, "--data", "digits"), "class-count mismatch")
    art = tmp_path / "art5"
    ok(invoke(runner, "prune", ckpt, "--arch", f"{src}:TinyNet", "--input-shape", SHAPE, "--num-classes", 5,
              "--groups", 2, "-o", art))
    out = tmp_path / "out"
    assert_user_error(invoke(runner, "finetune", art, "--data", "digits", "--epochs", 1, *QUICK, "-o", out),
                      "class-count mismatch", out_dir=out)
    assert not (tmp_path / "out.train").exists()
