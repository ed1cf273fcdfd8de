"""The ``sgcompress`` command line on TinyNet (1x8x8), in process through typer's CliRunner.

Every user mistake must end with a non-zero exit code, exactly one stderr line that starts
with ``error:`` and names the fix, no traceback, and no output directory left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import sgcompress
from sgcompress import cli
from sgcompress._version import __version__
from sgcompress.config import PruneConfig
from sgcompress.layers import MASKED_TYPES
from sgcompress.pipeline import prune_model

REPO = Path(__file__).resolve().parents[1]
SHAPE = "1,8,8"
ARTIFACT_FILES = {"plan.json", "weights.safetensors", "manifest.json", "report.json"}


@pytest.fixture
def runner(monkeypatch):
    # wide enough that Rich does not wrap the skip reasons inside the table cells
    monkeypatch.setattr(cli.out, "_width", 300)
    return CliRunner()  # typer 0.29: stderr is captured apart from stdout by default


@pytest.fixture
def tiny_args(tiny_file):
    ckpt, src = tiny_file
    return ckpt, ["--arch", f"{src}:TinyNet", "--input-shape", SHAPE]


def invoke(runner, *args):
    return runner.invoke(cli.app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    return result


def prune_ok(runner, ckpt, base, out, *extra):
    return ok(invoke(runner, "prune", ckpt, *base, "--groups", 2, "--ratio", 0.5, "-o", out, *extra))


def assert_user_error(result, *fix: str, out_dir: Path | None = None):
    """Non-zero exit, one `error:` line on stderr naming the fix, no traceback, nothing written."""
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for word in fix:
        assert word in lines[0], (word, lines[0])
    assert result.stdout == ""
    if out_dir is not None:
        assert not out_dir.exists()
        leftovers = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]
        assert leftovers == []
    return lines[0]


# ----------------------------------------------------------------------- analyze


def test_analyze_table_lists_every_layer_and_why_it_is_skipped(runner, tiny_args):
    ckpt, base = tiny_args
    text = ok(invoke(runner, "analyze", ckpt, *base)).stdout
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 6:
            rows[cells[0]] = cells[5]
    assert set(rows) >= {"stem", "conv1", "conv2", "shortcut", "dw", "pw", "fc"}
    assert rows["conv1"] == rows["conv2"] == rows["pw"] == rows["fc"] == "prune"
    assert rows["stem"].startswith("skip: stem conv")
    assert rows["shortcut"].startswith("skip: residual shortcut 1x1 conv")
    assert rows["dw"].startswith("skip: depthwise conv")
    assert "What-if" in text and "4 to prune, 3 skipped" in text


def test_analyze_json_has_totals_and_what_if(runner, tiny_args):
    ckpt, base = tiny_args
    a = json.loads(ok(invoke(runner, "analyze", ckpt, *base, "--json", "--ratio", 0.5)).stdout)
    assert a["totals"]["prunable_layers"] == 4 and a["totals"]["skipped_layers"] == 3
    # stem 4608 + conv1 36864 + conv2 18432 + shortcut 2048 + dw 2304 + pw 4096 + fc 160 (+ BatchNorm)
    assert a["totals"]["macs"] >= 68512 and a["totals"]["flops"] == 2 * a["totals"]["macs"]
    # parameters (not BatchNorm running statistics): convs 72+576+1152+128+144+272, BN 16+16+32, fc 170
    assert a["totals"]["params"] == 2578
    assert [w["groups"] for w in a["what_if"]] == [2, 4, 8, 16]
    by_g = {w["groups"]: w for w in a["what_if"]}
    pruned_macs = 36864 + 18432 + 4096 + 160
    assert by_g[4]["macs"] == round(a["totals"]["macs"] - 0.5 * pruned_macs)
    assert by_g[16]["pruned_layers"] == 2  # conv1 (8 filters) and fc (10 units) drop out
    assert {s["name"] for s in a["skipped"]} == {"stem", "shortcut", "dw"}
    assert a["model"]["input_shape"] == [1, 8, 8]


# ------------------------------------------------------------------------- prune


def test_prune_writes_the_artifact_and_a_summary(runner, tiny_args, tmp_path):
    ckpt, base = tiny_args
    out = tmp_path / "art"
    res = prune_ok(runner, ckpt, base, out)
    assert {p.name for p in out.iterdir()} == ARTIFACT_FILES
    assert f"wrote {out}" in res.stdout.replace("\n", "") and "MACs" in res.stdout
    rep = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert {lp["name"] for lp in plan["layers"]} == {"conv1", "conv2", "pw", "fc"}
    assert rep["compressed"]["macs"] < rep["original"]["macs"]
    assert rep["files"]["weights.safetensors"] == (out / "weights.safetensors").stat().st_size
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["prune"]["groups"] == 2 and manifest["settings"]["prune"]["ratio"] == 0.5


def test_prune_json_is_the_report(runner, tiny_args, tmp_path):
    ckpt, base = tiny_args
    out = tmp_path / "art"
    printed = json.loads(prune_ok(runner, ckpt, base, out, "--json").stdout)
    assert printed == json.loads((out / "report.json").read_text())
    assert printed["pruned_layers"]["count"] == 4


def test_same_command_twice_gives_the_same_plan(runner, tiny_args, tmp_path):
    ckpt, base = tiny_args
    prune_ok(runner, ckpt, base, tmp_path / "a", "--seed", 3)
    prune_ok(runner, ckpt, base, tmp_path / "b", "--seed", 3)
    assert (tmp_path / "a" / "plan.json").read_bytes() == (tmp_path / "b" / "plan.json").read_bytes()
    assert load_file(tmp_path / "a" / "weights.safetensors").keys() == load_file(
        tmp_path / "b" / "weights.safetensors").keys()


def test_target_macs_ends_at_or_below_the_target(runner, tiny_args, tmp_path):
    ckpt, base = tiny_args
    out = tmp_path / "art"
    ok(invoke(runner, "prune", ckpt, *base, "--groups", 2, "--target-macs", 0.6, "-o", out))
    rep = json.loads((out / "report.json").read_text())
    assert rep["compressed"]["macs"] <= 0.6 * rep["original"]["macs"]
    assert rep["macs_ratio"] <= 0.6
    assert 0 < rep["settings"]["ratio"] < 0.99


def _plan_layers(out: Path) -> dict[str, dict]:
    return {lp["name"]: lp for lp in json.loads((out / "plan.json").read_text())["layers"]}


def test_include_and_exclude_change_what_is_pruned(runner, tiny_args, tmp_path):
    ckpt, base = tiny_args
    prune_ok(runner, ckpt, base, tmp_path / "ex", "--exclude", "conv1", "--exclude", "f*")
    assert set(_plan_layers(tmp_path / "ex")) == {"conv2", "pw"}
    skipped = {s["name"]: s["reason"] for s in json.loads((tmp_path / "ex" / "plan.json").read_text())["skipped"]}
    assert "--exclude" in skipped["conv1"] and "--exclude" in skipped["fc"]

    prune_ok(runner, ckpt, base, tmp_path / "inc", "--include", "conv*")
    assert set(_plan_layers(tmp_path / "inc")) == {"conv1", "conv2"}

    # --include overrides the stem and shortcut defaults
    prune_ok(runner, ckpt, base, tmp_path / "stem", "--include", "stem", "--include", "shortcut")
    assert set(_plan_layers(tmp_path / "stem")) == {"stem", "shortcut"}


def test_force_replaces_an_existing_output(runner, tiny_args, tmp_path):
    ckpt, base = tiny_args
    out = tmp_path / "art"
    out.mkdir()
    (out / "old.txt").write_text("old")
    prune_ok(runner, ckpt, base, out, "--force")
    assert {p.name for p in out.iterdir()} == ARTIFACT_FILES
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".art.")] == []


# ------------------------------------------------------------------------ report


@pytest.fixture
def artifact(runner, tiny_args, tmp_path):
    ckpt, base = tiny_args
    out = tmp_path / "art"
    prune_ok(runner, ckpt, base, out)
    return out


def test_report_table_json_markdown_and_baseline(runner, artifact, tiny_file):
    ckpt, _ = tiny_file
    table = ok(invoke(runner, "report", artifact)).stdout
    assert "Summary" in table and "Pruned layers" in table and "Left dense" in table
    for name in ("conv1", "conv2", "pw", "fc", "stem", "shortcut", "dw"):
        assert name in table

    rep = json.loads(ok(invoke(runner, "report", artifact, "--json")).stdout)
    saved = json.loads((artifact / "report.json").read_text())
    assert rep["original"] == saved["original"] and rep["compressed"] == saved["compressed"]
    assert rep["stage"] == "pruned" and rep["artifact"] == str(artifact)
    assert set(rep["files"]) == ARTIFACT_FILES

    md = ok(invoke(runner, "report", artifact, "--markdown")).stdout
    assert "MACs" in md and md.startswith("| | original | compressed | ratio |")
    assert "| conv1 |" in md

    with_base = json.loads(ok(invoke(runner, "report", artifact, "--json", "--baseline", ckpt)).stdout)
    assert with_base["files"][f"baseline:{ckpt.name}"] == ckpt.stat().st_size
    assert with_base["original"] == rep["original"]


# ------------------------------------------------------------------ user mistakes


def test_missing_checkpoint(runner, tiny_args, tmp_path):
    _, base = tiny_args
    out = tmp_path / "out"
    r = invoke(runner, "prune", tmp_path / "nope.pt", *base, "-o", out)
    assert_user_error(r, "nope.pt", "does not exist", out_dir=out)


def test_unknown_architecture(runner, tiny_file, tmp_path):
    ckpt, _ = tiny_file
    out = tmp_path / "out"
    r = invoke(runner, "prune", ckpt, "--arch", "torchvision:resnet51", "--input-shape", SHAPE, "-o", out)
    assert_user_error(r, "resnet51", "Did you mean", out_dir=out)
    r = invoke(runner, "prune", ckpt, "--arch", "resnet18", "--input-shape", SHAPE, "-o", out)
    assert_user_error(r, "torchvision:resnet18", out_dir=out)


def test_checkpoint_for_other_classes(runner, tiny_args, tmp_path):
    ckpt, base = tiny_args
    out = tmp_path / "out"
    r = invoke(runner, "prune", ckpt, *base, "--num-classes", 5, "-o", out)
    assert_user_error(r, "--num-classes 10", out_dir=out)


def test_checkpoint_for_other_width(runner, tiny_args, tmp_path):
    ckpt, base = tiny_args
    out = tmp_path / "out"
    r = invoke(runner, "prune", ckpt, *base, "--arch-kwargs", '{"width": 4}', "-o", out)
    assert_user_error(r, "--arch-kwargs", out_dir=out)


def test_groups_larger_than_every_layer(runner, tiny_args, tmp_path):
    ckpt, base = tiny_args
    out = tmp_path / "out"
    r = invoke(runner, "prune", ckpt, *base, "--groups", 64, "-o", out)
    assert_user_error(r, "no layer can be pruned", "--groups", out_dir=out)


@pytest.mark.parametrize("ratio", ["1.5", "-0.1"])
def test_ratio_out_of_range(runner, tiny_args, tmp_path, ratio):
    ckpt, base = tiny_args
    out = tmp_path / "out"
    r = invoke(runner, "prune", ckpt, *base, "--ratio", ratio, "-o", out)
    assert_user_error(r, "[0, 1)", "--ratio", out_dir=out)


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_unreadable_checkpoint(runner, tiny_args, tmp_path, damage):
    ckpt, base = tiny_args
    bad = tmp_path / "bad.pt"
    data = ckpt.read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 2],
                     "random": torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                             dtype=torch.uint8).numpy().tobytes(),
                     "empty": b""}[damage])
    out = tmp_path / "out"
    r = invoke(runner, "prune", bad, *base, "-o", out)
    assert_user_error(r, "bad.pt", out_dir=out)


def test_truncated_safetensors_checkpoint(runner, tiny_args, tmp_path):
    ckpt, base = tiny_args
    from safetensors.torch import save_file

    st = tmp_path / "w.safetensors"
    save_file(torch.load(ckpt, weights_only=True), str(st))
    st.write_bytes(st.read_bytes()[:-100])
    out = tmp_path / "out"
    r = invoke(runner, "prune", st, *base, "-o", out)
    assert_user_error(r, "truncated or corrupt", out_dir=out)


def test_include_of_an_unsupported_layer(runner, tiny_args, tmp_path):
    ckpt, base = tiny_args
    out = tmp_path / "out"
    r = invoke(runner, "prune", ckpt, *base, "--include", "dw", "-o", out)
    assert_user_error(r, "depthwise", "remove it from --include", out_dir=out)


def test_include_matching_nothing(runner, tiny_args, tmp_path):
    ckpt, base = tiny_args
    out = tmp_path / "out"
    r = invoke(runner, "prune", ckpt, *base, "--include", "layer9*", "-o", out)
    assert_user_error(r, "layer9*", "matches no layer", "analyze", out_dir=out)


@pytest.mark.parametrize("text", ['{"width": 8', "[8]"])
def test_bad_arch_kwargs(runner, tiny_args, tmp_path, text):
    ckpt, base = tiny_args
    out = tmp_path / "out"
    r = invoke(runner, "prune", ckpt, *base, "--arch-kwargs", text, "-o", out)
    assert_user_error(r, "--arch-kwargs", '{"width": 32}', out_dir=out)


@pytest.mark.parametrize("shape", ["1,8", "a,b,c", "1,0,8"])
def test_bad_input_shape(runner, tiny_file, tmp_path, shape):
    ckpt, src = tiny_file
    out = tmp_path / "out"
    r = invoke(runner, "prune", ckpt, "--arch", f"{src}:TinyNet", "--input-shape", shape, "-o", out)
    assert_user_error(r, "--input-shape", out_dir=out)


def test_input_shape_the_model_rejects(runner, tiny_file, tmp_path):
    ckpt, src = tiny_file
    out = tmp_path / "out"
    r = invoke(runner, "prune", ckpt, "--arch", f"{src}:TinyNet", "--input-shape", "3,8,8", "-o", out)
    assert_user_error(r, "3,8,8", "--input-shape", out_dir=out)


def test_existing_output_without_force(runner, tiny_args, tmp_path):
    ckpt, base = tiny_args
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = invoke(runner, "prune", ckpt, *base, "-o", out)
    assert_user_error(r, "already exists", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_target_macs_out_of_reach(runner, tiny_args, tmp_path):
    ckpt, base = tiny_args
    out = tmp_path / "out"
    r = invoke(runner, "prune", ckpt, *base, "--target-macs", 0.05, "-o", out)
    assert_user_error(r, "out of reach", "raise --target-macs", out_dir=out)


def test_analyze_errors_too(runner, tiny_file, tmp_path):
    ckpt, src = tiny_file
    r = invoke(runner, "analyze", ckpt, "--arch", f"{src}:TinyNet", "--input-shape", "3,8,8")
    assert_user_error(r, "--input-shape")


def test_report_on_a_folder_that_is_not_an_artifact(runner, tmp_path):
    folder = tmp_path / "notart"
    folder.mkdir()
    (folder / "x.txt").write_text("x")
    assert_user_error(invoke(runner, "report", folder), "not a complete sgcompress artifact", "sgcompress prune")
    assert_user_error(invoke(runner, "report", tmp_path / "missing"), "does not exist")


def test_report_on_a_damaged_artifact(runner, artifact):
    w = artifact / "weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert_user_error(invoke(runner, "report", artifact), "weights.safetensors", "re-create it")


def test_report_on_an_artifact_with_a_damaged_plan(runner, artifact):
    (artifact / "plan.json").write_text('{"schema_version": 1, "layers": [')
    assert_user_error(invoke(runner, "report", artifact), "plan.json")


# Damaged artifacts and impossible output paths (each was a traceback once).


def test_output_below_a_file(runner, tiny_args, tmp_path):
    ckpt, base = tiny_args
    r = invoke(runner, "prune", ckpt, *base, "-o", ckpt / "out")
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert_user_error(r, "-o")


def test_report_on_a_plan_that_is_not_an_object(runner, artifact):
    (artifact / "plan.json").write_text("[1, 2]")
    r = invoke(runner, "report", artifact)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert_user_error(r, "plan.json")


def test_report_on_a_manifest_without_a_model(runner, artifact):
    (artifact / "manifest.json").write_text('{"format": "sgcompress-artifact", "format_version": 1}')
    r = invoke(runner, "report", artifact)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert_user_error(r, "manifest.json")


# -------------------------------------------------------------------- round trip


def test_round_trip_equals_the_in_memory_masked_model(runner, tiny_args, tmp_path):
    ckpt, base = tiny_args
    out = tmp_path / "art"
    prune_ok(runner, ckpt, base, out, "--seed", 5)
    loaded = sgcompress.load(out)

    lm = sgcompress.load_model(ckpt, arch=base[1], input_shape=(1, 8, 8))
    ref = prune_model(lm.model, (1, 8, 8), PruneConfig(groups=2, ratio=0.5, seed=5)).model.eval()

    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref(x), rtol=0, atol=0)

    masked = {n: m for n, m in loaded.named_modules() if isinstance(m, MASKED_TYPES)}
    assert set(masked) == {"conv1", "conv2", "pw", "fc"}
    for name, m in masked.items():
        assert torch.equal(m.connection_mask, ref.get_submodule(name).connection_mask), name
        assert 0 < int((m.connection_mask == 0).sum()) < m.connection_mask.numel(), name
        w = m.weight.detach()
        pruned = (m.connection_mask == 0)
        assert torch.count_nonzero(w[pruned]) == 0, name  # stored weights are exactly zero there
        assert torch.count_nonzero(w[~pruned]) > 0, name
    # the file itself stores zeros: the artifact is usable without sgcompress's masks too
    state = load_file(out / "weights.safetensors")
    for name, m in masked.items():
        stored = state[f"{name}.weight"]
        assert torch.count_nonzero(stored[m.connection_mask == 0]) == 0, name


# ------------------------------------------------------------------ entry point


def test_python_m_help_and_version():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # both at once: each spends its time importing torch
    procs = {arg: subprocess.Popen([sys.executable, "-m", "sgcompress", arg], env=env, cwd=REPO, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for arg in ("--help", "--version")}
    res = {arg: (p.communicate(timeout=120), p.returncode) for arg, p in procs.items()}
    (out, err), rc = res["--help"]
    assert rc == 0, err
    for command in ("analyze", "prune", "report"):
        assert command in out
    assert "Traceback" not in out + err
    (out, err), rc = res["--version"]
    assert rc == 0, err
    assert out.strip() == f"sgcompress {__version__}"
