"""CIFAR-style ResNets of sgcompress.zoo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from sgcompress.errors import ConfigError
from sgcompress.zoo import MODELS, BasicBlock, resnet20, resnet32, resnet56


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet20_parameter_count_by_hand():
    # Hand derivation, 3 input channels, 10 classes, width 16, convs without bias,
    # BN = 2 parameters per channel, shortcuts 1x1 conv + BN (option B):
    #   stem      conv 3*16*9 = 432            + BN 32                      =     464
    #   stage 1   3 blocks x 2 x (16*16*9 = 2304 + 32)                       =  14,016
    #   stage 2   block 1: 16*32*9 = 4608 + 64 + 32*32*9 = 9216 + 64
    #                      + shortcut 16*32 = 512 + 64                       =  14,528
    #             blocks 2-3: 2 x 2 x (9216 + 64)                            =  37,120
    #   stage 3   block 1: 32*64*9 = 18432 + 128 + 64*64*9 = 36864 + 128
    #                      + shortcut 32*64 = 2048 + 128                     =  57,728
    #             blocks 2-3: 2 x 2 x (36864 + 128)                          = 147,968
    #   fc        64*10 + 10                                                 =     650
    #   total                                                                = 272,474  (0.27 M)
    assert _params(resnet20(num_classes=10, in_channels=3)) == 272_474
    # one input channel removes 2 * 16 * 9 = 288 stem weights
    assert _params(resnet20(num_classes=10, in_channels=1)) == 272_474 - 288
    # each extra class adds 64 weights + 1 bias
    assert _params(resnet20(num_classes=11)) == 272_474 + 65


def test_deeper_models_add_whole_blocks():
    # resnet32 = resnet20 + 2 extra identity blocks per stage:
    # 2 * [2*(2304+32) + 2*(9216+64) + 2*(36864+128)] = 2 * 97,216 = 194,432
    assert _params(resnet32()) == 272_474 + 194_432
    # resnet56 adds 6 per stage over resnet20: 6 * 97,216 = 583,296
    assert _params(resnet56()) == 272_474 + 583_296


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
def test_forward_shapes(in_channels, size):
    torch.manual_seed(0)
    model = resnet20(num_classes=7, in_channels=in_channels).eval()
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_stage_shapes_and_shortcut_names():
    model = resnet20(in_channels=1).eval()
    x = torch.randn(1, 1, 28, 28)
    h = model.relu(model.bn1(model.conv1(x)))
    h1 = model.layer1(h)
    h2 = model.layer2(h1)
    h3 = model.layer3(h2)
    assert h1.shape == (1, 16, 28, 28)
    assert h2.shape == (1, 32, 14, 14)
    assert h3.shape == (1, 64, 7, 7)
    # exactly two projection shortcuts (first block of stages 2 and 3), both named *shortcut*
    projections = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert projections == ["layer2.0.shortcut.0", "layer3.0.shortcut.0"]
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert model.layer2[0].shortcut[0].stride == (2, 2)
    # every 3x3 conv has no bias (BN follows)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_registry_and_builder_signature():
    assert set(MODELS) == {"resnet20", "resnet32", "resnet56"}
    blocks = {name: sum(isinstance(m, BasicBlock) for m in build().modules()) for name, build in MODELS.items()}
    assert blocks == {"resnet20": 9, "resnet32": 15, "resnet56": 27}
    wide = MODELS["resnet20"](num_classes=100, in_channels=3, width=8)
    assert wide.fc.in_features == 32 and wide.fc.out_features == 100
    assert wide.conv1.out_channels == 8


def test_kaiming_init_and_small_head():
    torch.manual_seed(0)
    model = resnet56()
    w = model.layer3[1].conv1.weight.detach()  # 64 out channels, fan_out = 64 * 9
    expected = (2.0 / (64 * 9)) ** 0.5
    assert abs(float(w.std()) - expected) / expected < 0.05
    assert float(model.fc.weight.detach().std()) < 0.02 and float(model.fc.bias.detach().abs().max()) == 0.0
    # small head => initial loss close to ln(10) = 2.303 on random inputs (train-mode BN)
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model.train()(torch.randn(32, 3, 32, 32)), torch.arange(32) % 10)
    assert abs(float(loss) - torch.log(torch.tensor(10.0)).item()) < 0.2


@pytest.mark.parametrize("bad", [dict(num_classes=0), dict(in_channels=0), dict(width=1.5), dict(num_classes=True)])
def test_bad_arguments(bad):
    with pytest.raises(ConfigError):
        resnet20(**bad)


# --------------------------------------------------------------------------- the shipped model

ASSETS = Path(__file__).resolve().parent.parent / "sgcompress" / "assets"
FASHION = Path("/usr/share/datasets/fashion-mnist")


def _shipped():
    meta = json.loads((ASSETS / "resnet20_fashion_mnist.json").read_text())
    weights = load_file(str(ASSETS / "resnet20_fashion_mnist.safetensors"))
    return meta, weights


def test_shipped_model_loads_and_matches_its_metadata():
    meta, weights = _shipped()
    assert meta["arch"] == "sgcompress:resnet20" and meta["input_shape"] == [1, 28, 28]
    assert meta["arch_kwargs"] == {"num_classes": 10, "in_channels": 1, "width": 16}
    assert meta["test_accuracy"] >= 0.91 and meta["val_accuracy"] >= 0.91
    model = MODELS["resnet20"](**meta["arch_kwargs"])
    model.load_state_dict(weights, strict=True)
    floats = [v for k, v in weights.items() if not k.endswith("num_batches_tracked")]
    assert all(v.dtype == torch.float32 for v in floats)
    assert sum(v.numel() for v in floats) == 272_186 + sum(  # parameters + BN running stats
        2 * m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    )


@pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed")
def test_shipped_model_classifies_real_test_images():
    from sgcompress.data import load_data

    meta, weights = _shipped()
    model = MODELS["resnet20"](**meta["arch_kwargs"]).eval()
    model.load_state_dict(weights)
    b = load_data(str(FASHION), input_shape=tuple(meta["input_shape"]), mean=meta["mean"], std=meta["std"])
    x = torch.stack([b.test[i][0] for i in range(500)])
    y = torch.tensor([b.test[i][1] for i in range(500)])
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert acc >= 0.88  # 91.85 % on all 10,000; 500 images leave a few points of noise
