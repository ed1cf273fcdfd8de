"""BatchNorm folding (``export --fold-bn``): which pairs fold, the folded numbers, the export."""

from __future__ import annotations

import json

import pytest
import torch
from test_export import assert_same_function, make_artifact, random_inputs
from test_cli import invoke, ok
from torch import nn
from typer.testing import CliRunner

import sgcompress
from sgcompress.errors import UnsupportedLayerError
from sgcompress.export import export_compact
from sgcompress.fold import conv_bn_pairs, fold_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


class ConvBN(nn.Module):
    def __init__(self, bias: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=bias)
        self.bn = nn.BatchNorm2d(1, eps=1.0)

    def forward(self, x):
        return self.bn(self.conv(x))


@torch.no_grad()
def test_folded_weights_by_hand():
    # w = 2, bias 0.25; BatchNorm mean 1, var 3, eps 1, gamma 2, beta 0.5:
    # s = 2 / sqrt(3 + 1) = 1; w' = 2 * 1 = 2; b' = (0.25 - 1) * 1 + 0.5 = -0.25
    m = ConvBN(bias=True).eval()
    m.conv.weight.fill_(2.0)
    m.conv.bias.fill_(0.25)
    m.bn.running_mean.fill_(1.0)
    m.bn.running_var.fill_(3.0)
    m.bn.weight.fill_(2.0)
    m.bn.bias.fill_(0.5)
    x = torch.tensor([[[[3.0]]]])
    assert float(m(x)) == pytest.approx(5.75)  # conv 2 * 3 + 0.25 = 6.25; BN (6.25 - 1) / 2 * 2 + 0.5
    assert fold_batchnorm(m) == [("conv", "bn")]
    assert isinstance(m.bn, nn.Identity)
    assert float(m.conv.weight) == 2.0 and float(m.conv.bias) == -0.25
    assert float(m(x)) == pytest.approx(5.75)  # 2 * 3 - 0.25


@torch.no_grad()
def test_a_conv_without_bias_gets_one():
    m = ConvBN(bias=False).eval()
    m.bn.running_mean.fill_(0.5)
    x = torch.randn(2, 1, 3, 3)
    want = m(x)
    fold_batchnorm(m)
    assert m.conv.bias is not None
    torch.testing.assert_close(m(x), want)


class Shared(nn.Module):
    """conv_a feeds its BatchNorm and a second branch; bn_b is called twice; conv_c -> bn_c folds."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
        self.conv_b, self.bn_b = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
        self.conv_c, self.bn_c = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)

    def forward(self, x):
        a = self.conv_a(x)
        y = self.bn_a(a) + a
        y = self.bn_b(self.conv_b(y)) + self.bn_b(y)
        return self.bn_c(self.conv_c(y))


def test_only_a_conv_whose_output_feeds_its_batchnorm_alone_folds():
    assert conv_bn_pairs(Shared().eval()) == [("conv_c", "bn_c")]


def test_tiny_net_folds_every_pair_and_keeps_its_function(tiny):
    model = tiny.eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        want = model(x)
        pairs = fold_batchnorm(model)
        got = model(x)
    assert pairs == [("stem", "bn0"), ("conv1", "bn1"), ("conv2", "bn2")]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.bn(self.conv(x))
        return x


def test_an_untraceable_model_is_a_precise_error():
    with pytest.raises(UnsupportedLayerError, match="without --fold-bn"):
        fold_batchnorm(Untraceable())


# --------------------------------------------------------------------- export --fold-bn


@pytest.fixture(scope="module")
def fold_art(tiny_file_module, tmp_path_factory):
    return make_artifact(tiny_file_module, tmp_path_factory.mktemp("fold") / "art")


def test_folded_export_computes_the_masked_function_and_reloads(fold_art, tmp_path, monkeypatch):
    masked = sgcompress.load_artifact(fold_art).model.eval()
    res = export_compact(fold_art, tmp_path / "exp", measure=False, fold_bn=True)
    assert [tuple(p) for p in res.report["folded_batchnorm"]] == [("stem", "bn0"), ("conv1", "bn1"), ("conv2", "bn2")]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in res.model.modules())
    assert_same_function(res.model, masked, random_inputs())
    manifest = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    assert manifest["settings"]["export"]["fold_bn"] == [["stem", "bn0"], ["conv1", "bn1"], ["conv2", "bn2"]]

    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("torch.load")))
    reloaded = sgcompress.load(tmp_path / "exp")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in reloaded.modules())
    with torch.no_grad():
        x = random_inputs(seed=3)
        torch.testing.assert_close(reloaded(x), res.model(x), rtol=0, atol=0)


def test_cli_fold_bn_says_what_it_folded(tiny_file_module, fold_art, tmp_path):
    runner = CliRunner()
    res = ok(invoke(runner, "export", fold_art, "-o", tmp_path / "exp", "--fold-bn", "--strategy", "kernel",
                    "--batch-sizes", "2"))
    assert "BatchNorm folded into 3 convs (dense and masked timed folded likewise)" in res.stdout
    report = json.loads((tmp_path / "exp" / "report.json").read_text())
    assert {r["model"] for r in report["latency"][0]["rows"]} == {"dense", "masked", "compact"}


def test_folded_torchscript_export_computes_the_masked_function(fold_art, tmp_path):
    out = tmp_path / "m.pt"
    ok(invoke(CliRunner(), "export", fold_art, "--format", "torchscript", "--fold-bn", "-o", out))
    scripted = torch.jit.load(str(out))
    assert not any("BatchNorm" in m.original_name for m in scripted.modules())
    assert_same_function(scripted, sgcompress.load_artifact(fold_art).model.eval(), random_inputs(seed=5))
