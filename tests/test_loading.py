"""Tests of sgcompress.loading: architectures, checkpoint forms, safety, damage, mismatches."""

from __future__ import annotations

import inspect
import logging
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from sgcompress.errors import (
    ArchitectureError,
    CheckpointError,
    ConfigError,
    InputShapeError,
    StateDictMismatchError,
    UnsafeCheckpointError,
)
from sgcompress.loading import (
    LoadedModel,
    ModelSpec,
    build_model,
    check_input_shape,
    load_model,
    load_state_dict_strict,
    parse_input_shape,
    read_checkpoint,
)

class Tiny(nn.Module):
    def __init__(self, num_classes: int = 3, width: int = 4, in_channels: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


# The same class in a file of its own, for the path/to/file.py:Class form.
TINY_SRC = "import torch\nfrom torch import nn\n\n\n" + inspect.getsource(Tiny)
ARCH = f"{__name__}:Tiny"
SHAPE = (1, 8, 8)


class Hostile:
    """Unpickling this creates ``path``: proof that code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def tiny(num_classes: int = 3, width: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = Tiny(num_classes=num_classes, width=width)
    m.bn.running_mean.uniform_()  # non-default buffers, so a load is visible
    return m.eval()


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[nn.Module, Path]:
    m = tiny()
    path = tmp_path / "tiny.pt"
    torch.save(m.state_dict(), path)
    return m, path


# ------------------------------------------------------------------ specs and shapes


def test_parse_input_shape_forms_and_errors():
    assert parse_input_shape("1,28,28") == (1, 28, 28)
    assert parse_input_shape(" 3x32x32 ") == (3, 32, 32)
    assert parse_input_shape("(3, 224, 224)") == (3, 224, 224)
    for bad in ("28,28", "a,b,c", "1,0,28", "1,-2,28", "", "1,2,3,4"):
        with pytest.raises(ConfigError, match="C,H,W"):
            parse_input_shape(bad)


def test_model_spec_round_trip_and_validation():
    spec = ModelSpec("torchvision:resnet18", {"width_per_group": 64}, 10, (3, 32, 32))
    d = spec.to_dict()
    assert d == {"arch": "torchvision:resnet18", "arch_kwargs": {"width_per_group": 64},
                 "num_classes": 10, "input_shape": [3, 32, 32]}
    assert ModelSpec.from_dict(d) == spec
    with pytest.raises(ConfigError, match="JSON"):
        ModelSpec("a:b", {"f": object()}, None, (1, 2, 2))
    with pytest.raises(ConfigError, match="num-classes"):
        ModelSpec("a:b", {}, 0, (1, 2, 2))
    with pytest.raises(ConfigError, match="disagrees"):
        ModelSpec("a:b", {"num_classes": 5}, 7, (1, 2, 2))


# -------------------------------------------------------------------- architectures


def test_import_form_passes_kwargs_and_num_classes():
    m = build_model(ModelSpec(ARCH, {"width": 6}, 5, SHAPE))
    assert isinstance(m, Tiny) and m.fc.weight.shape == (5, 6) and m.conv.in_channels == 1


def test_import_form_skips_num_classes_the_class_does_not_take():
    m = build_model(ModelSpec("torch.nn:Identity", {}, 5, SHAPE))  # Identity takes **kwargs only
    assert isinstance(m, nn.Identity)


def test_file_form_stores_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "mymodels").mkdir()
    (tmp_path / "mymodels" / "tiny_file.py").write_text(TINY_SRC)
    src = tiny(num_classes=4)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    monkeypatch.chdir(tmp_path)
    loaded = load_model("w.pt", arch="mymodels/tiny_file.py:Tiny", input_shape=SHAPE)
    assert loaded.spec.arch == f"{tmp_path / 'mymodels' / 'tiny_file.py'}:Tiny"
    assert loaded.spec.num_classes == 4  # read from fc.weight
    assert same_weights(loaded.model, src)
    monkeypatch.chdir("/")
    rebuilt = build_model(loaded.spec)  # absolute path: works from anywhere
    assert rebuilt.fc.out_features == 4


def test_torchvision_form_reads_num_classes_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    import torchvision

    src = torchvision.models.resnet18(num_classes=10)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    loaded = load_model(tmp_path / "r18.pth", arch="torchvision:resnet18", input_shape=(3, 32, 32))
    assert isinstance(loaded, LoadedModel)
    assert loaded.spec.num_classes == 10 and loaded.model.fc.out_features == 10
    assert same_weights(loaded.model, src) and not loaded.model.training
    assert loaded.source == str(tmp_path / "r18.pth")


def test_sgcompress_form_uses_zoo_with_in_channels(monkeypatch):
    seen = {}

    def fake(num_classes=10, in_channels=3, width=4):
        seen.update(num_classes=num_classes, in_channels=in_channels, width=width)
        return Tiny(num_classes=num_classes, width=width, in_channels=in_channels)

    monkeypatch.setitem(sys.modules, "sgcompress.zoo", types.SimpleNamespace(MODELS={"tiny": fake}))
    m = build_model(ModelSpec("sgcompress:tiny", {"width": 2}, 7, (2, 8, 8)))
    assert seen == {"num_classes": 7, "in_channels": 2, "width": 2}
    assert m.conv.in_channels == 2
    with pytest.raises(ArchitectureError, match="Did you mean: tiny"):
        build_model(ModelSpec("sgcompress:tinyy", {}, None, SHAPE))


@pytest.mark.parametrize("arch, needle", [
    ("torchvision:resnet5O", "resnet50"),          # typo -> close match
    ("resnet18", "torchvision:resnet18"),          # bare name -> suggested form
    (f"{__name__}:Tinny", "Tiny"),                 # wrong class
    ("no_such_pkg_xyz.mod:Net", "cannot import"),
    ("missing/file.py:Net", "does not exist"),
    ("torchvision:fasterrcnn_resnet50_fpn", "classification"),
])
def test_unknown_architectures_say_what_to_use(arch, needle):
    with pytest.raises(ArchitectureError, match=needle):
        build_model(ModelSpec(arch, {}, None, SHAPE))


def test_bad_arch_kwargs_is_an_architecture_error():
    with pytest.raises(ArchitectureError, match="arch-kwargs"):
        build_model(ModelSpec(ARCH, {"depth": 3}, None, SHAPE))


# ------------------------------------------------------------------ checkpoint forms


@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "model_state_dict", "net"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_checkpoint_wrappers_and_prefixes(tmp_path, wrap, prefix):
    src = tiny(seed=1)
    sd = {prefix + k: v for k, v in src.state_dict().items()}
    obj = sd if wrap is None else {wrap: sd, "epoch": 3, "optimizer": {"lr": 0.1}}
    torch.save(obj, tmp_path / "c.ckpt")
    loaded = load_model(tmp_path / "c.ckpt", arch=ARCH, input_shape=SHAPE)
    assert same_weights(loaded.model, src)


def test_lightning_style_nested_and_safetensors(tmp_path):
    src = tiny(seed=2)
    torch.save({"state_dict": {"model": src.state_dict()}, "global_step": 10}, tmp_path / "l.ckpt")
    assert same_weights(load_model(tmp_path / "l.ckpt", arch=ARCH, input_shape=SHAPE).model, src)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    sd = read_checkpoint(tmp_path / "w.safetensors")
    assert sd.keys() == src.state_dict().keys()
    assert same_weights(load_model(tmp_path / "w.safetensors", arch=ARCH, input_shape=SHAPE).model, src)


def test_missing_num_batches_tracked_is_filled_and_logged(tmp_path, caplog):
    src = tiny(seed=3)
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pt")
    with caplog.at_level(logging.INFO, logger="sgcompress.loading"):
        loaded = load_model(tmp_path / "old.pt", arch=ARCH, input_shape=SHAPE)
    assert torch.equal(loaded.model.bn.running_mean, src.bn.running_mean)
    assert "num_batches_tracked" in caplog.text


def test_checkpoint_with_weights_needs_arch(ckpt):
    _, path = ckpt
    with pytest.raises(ArchitectureError, match="--arch"):
        load_model(path, input_shape=SHAPE)


def test_checkpoint_without_state_dict_lists_its_keys(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="'epoch'"):
        read_checkpoint(tmp_path / "x.pt")


# ------------------------------------------------------------------------- safety


def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"w": Hostile(str(marker))}, protocol=2))
    zipped = tmp_path / "zipped.pth"
    torch.save({"fc.weight": torch.zeros(1), "x": Hostile(str(marker))}, zipped)
    for path in (raw, zipped):
        with pytest.raises(UnsafeCheckpointError, match="--trust-checkpoint") as info:
            load_model(path, arch=ARCH, input_shape=SHAPE)
        assert str(path) in str(info.value) and "pickled code" in str(info.value)
    assert not marker.exists()


def test_pickled_module_only_with_trust(tmp_path, caplog):
    src = tiny(num_classes=5, seed=4)
    torch.save(src, tmp_path / "full.pt")
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint(tmp_path / "full.pt")
    with caplog.at_level(logging.WARNING, logger="sgcompress.loading"):
        loaded = load_model(tmp_path / "full.pt", input_shape=SHAPE, trust=True)
    assert "trust" in caplog.text
    assert loaded.spec.arch == "pickled-module" and loaded.spec.num_classes == 5
    assert same_weights(loaded.model, src) and not loaded.model.training
    with pytest.raises(ConfigError, match="5 outputs"):
        load_model(tmp_path / "full.pt", num_classes=3, input_shape=SHAPE, trust=True)
    # With an arch, the trusted module only contributes its weights.
    again = load_model(tmp_path / "full.pt", arch=ARCH, input_shape=SHAPE, trust=True)
    assert again.spec.arch == ARCH and same_weights(again.model, src)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated
def test_torchscript_needs_trust_and_arch(tmp_path):
    src = tiny(seed=5)
    torch.jit.trace(src, torch.zeros(1, *SHAPE)).save(str(tmp_path / "ts.pt"))
    with pytest.raises(UnsafeCheckpointError, match="TorchScript"):
        load_model(tmp_path / "ts.pt", arch=ARCH, input_shape=SHAPE)
    with pytest.raises(ArchitectureError, match="TorchScript"):
        load_model(tmp_path / "ts.pt", input_shape=SHAPE, trust=True)
    loaded = load_model(tmp_path / "ts.pt", arch=ARCH, input_shape=SHAPE, trust=True)
    assert same_weights(loaded.model, src)


# ---------------------------------------------------------------- malformed input


def test_missing_directory_and_empty_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="directory"):
        read_checkpoint(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "w.txt").write_bytes(b"hello world, not weights")
    with pytest.raises(CheckpointError, match="not a recognised"):
        read_checkpoint(tmp_path / "w.txt")


def _real_files(tmp_path: Path) -> list[Path]:
    src = tiny(seed=6)
    files = [tmp_path / "z.pt", tmp_path / "legacy.pt", tmp_path / "s.safetensors"]
    torch.save({"state_dict": src.state_dict(), "epoch": 1}, files[0])
    torch.save(src.state_dict(), files[1], _use_new_zipfile_serialization=False)
    save_file(src.state_dict(), str(files[2]))
    return files


def _only_checkpoint_error(path: Path, data: bytes, out: Path) -> None:
    out.write_bytes(data)
    try:
        read_checkpoint(out)
    except CheckpointError as e:
        assert str(out) in str(e)


def test_truncations_give_one_checkpoint_error(tmp_path):
    for path in _real_files(tmp_path):
        data = path.read_bytes()
        out = tmp_path / f"cut{path.suffix}"
        for cut in sorted({1, 7, 8, 9, 30, 64, len(data) // 3, len(data) // 2, len(data) - 10, len(data) - 1}):
            out.write_bytes(data[:cut])
            with pytest.raises(CheckpointError) as info:
                read_checkpoint(out)
            assert str(out) in str(info.value), (path.name, cut)


def test_corrupt_safetensors_header(tmp_path):
    src = tiny(seed=7)
    save_file(src.state_dict(), str(tmp_path / "s.safetensors"))
    data = bytearray((tmp_path / "s.safetensors").read_bytes())
    data[12:20] = b"\xff\xfe{{{{]]"
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        read_checkpoint(tmp_path / "bad.safetensors")
    data = bytearray((tmp_path / "s.safetensors").read_bytes())
    data[0:8] = (10**12).to_bytes(8, "little")  # header length far beyond the file
    (tmp_path / "huge.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="huge.safetensors"):
        read_checkpoint(tmp_path / "huge.safetensors")


def test_zip_with_odd_version_field(tmp_path):
    data = bytearray(_real_files(tmp_path)[0].read_bytes())
    central = data.find(b"PK\x01\x02")  # first central directory entry
    data[central + 6:central + 8] = (95).to_bytes(2, "little")  # "needs zip version 9.5"
    out = tmp_path / "odd.pt"
    out.write_bytes(bytes(data))
    try:
        assert read_checkpoint(out)  # torch's reader ignores the field; Python's zipfile does not
    except CheckpointError as e:
        assert str(out) in str(e)


@settings(max_examples=25, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=512), suffix=st.sampled_from([".pt", ".safetensors", ".ckpt"]))
def test_random_bytes_give_checkpoint_error(tmp_path, data, suffix):
    out = tmp_path / f"random{suffix}"
    out.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(out)
    assert str(out) in str(info.value)


@settings(max_examples=30, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 2), pos=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_bit_flips_load_or_give_checkpoint_error(tmp_path, which, pos, bit):
    path = _real_files(tmp_path)[which]
    data = bytearray(path.read_bytes())
    data[int(pos * len(data))] ^= 1 << bit
    out = tmp_path / f"flip{path.suffix}"
    out.write_bytes(bytes(data))
    try:
        sd = read_checkpoint(out)  # a flip in tensor data is undetectable: must still be tensors
        assert all(isinstance(v, torch.Tensor) for v in sd.values())
    except CheckpointError as e:
        assert str(out) in str(e)


# ------------------------------------------------------------------- mismatches


def test_mismatch_lists_every_problem_with_shapes(tmp_path):
    sd = tiny(width=4).state_dict()
    sd["extra.weight"] = torch.zeros(2)
    del sd["bn.bias"]
    sd["conv.weight"] = torch.zeros(5, 1, 3, 3)
    model = tiny(width=4)
    with pytest.raises(StateDictMismatchError) as info:
        load_state_dict_strict(model, sd, source="ck.pt")
    msg = str(info.value)
    assert "'ck.pt'" in msg and "1 missing, 1 unexpected, 1 with a different shape" in msg
    assert "bn.bias" in msg and "extra.weight" in msg
    assert "conv.weight: checkpoint [5, 1, 3, 3] vs model [4, 1, 3, 3]" in msg
    assert "--arch" in msg
    assert info.value.missing == ["bn.bias"] and info.value.unexpected == ["extra.weight"]


def test_mismatch_of_classifier_only_suggests_num_classes(tmp_path):
    torch.save(tiny(num_classes=7).state_dict(), tmp_path / "c.pt")
    with pytest.raises(StateDictMismatchError, match="--num-classes 7") as info:
        load_model(tmp_path / "c.pt", arch=ARCH, num_classes=3, input_shape=SHAPE)
    assert "fc.weight: checkpoint [7, 4] vs model [3, 4]" in str(info.value)


def test_mismatch_with_extra_prefix_suggests_stripping_it(tmp_path):
    sd = {f"backbone.{k}": v for k, v in tiny().state_dict().items()}
    with pytest.raises(StateDictMismatchError, match="strip prefix 'backbone.'"):
        load_state_dict_strict(tiny(), sd, source="p.pt")


def test_long_mismatch_lists_are_capped_but_counted():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(30)])
    with pytest.raises(StateDictMismatchError) as info:
        load_state_dict_strict(model, {}, source="empty.pt")
    msg = str(info.value)
    assert "60 missing" in msg and "... and 40 more" in msg and "29.bias" not in msg
    assert len(info.value.missing) == 60


# ------------------------------------------------------------------ input shape


def test_wrong_input_shape_names_the_flag(ckpt):
    _, path = ckpt
    with pytest.raises(InputShapeError, match=r"3,8,8.*--input-shape C,H,W") as info:
        load_model(path, arch=ARCH, input_shape=(3, 8, 8))
    assert "channels" in str(info.value)  # the underlying conv error is quoted


def test_check_input_shape_restores_training_mode():
    m = tiny().train()
    check_input_shape(m, SHAPE)
    assert m.training and m.bn.training
    with pytest.raises(InputShapeError, match="--input-shape"):
        check_input_shape(m, (2, 8, 8))
    assert m.training
