"""Compact modules compute exactly what masked layers compute; measuring, choosing, rebuilding."""

import copy
import io
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sgcompress.compact import (
    GroupedConv, KernelConv, SplitConv, build_compact, compact_from_masked, fvcore_handles, layer_groups,
    materialize, max_rel_error, measure_layer, plan_from_masked, portable, rebuild,
)
from sgcompress.compact.spec import groups_macs
from sgcompress.layers import MaskedConv2d, MaskedLinear
from sgcompress.plan import Block, LayerPlan
from sgcompress.surgery import to_masked

TOL = 1e-4
CONV_VARIANTS = [
    ("dense", {}),
    ("kernel", {"merge": "cost", "tile": 8}),
    ("kernel", {"merge": "blocks"}),
    ("split", {"merge": "blocks"}),
    ("split", {"merge": "labels", "max_groups": 2}),
    ("grouped", {"merge": "labels"}),
    ("grouped", {"merge": "cost", "tile": 4}),
]


def sg_like_mask(cout: int, cin: int, n_clusters: int, ratio: float, gen: torch.Generator):
    """Cluster structure like SG-CNN's: each cluster keeps a subset, then a second,
    different clustering prunes again (so blocks differ from clusters)."""
    mask = torch.ones(cout, cin)
    labels = None
    for _ in range(2):
        labels = torch.randint(0, n_clusters, (cout,), generator=gen)
        keep = (torch.rand(n_clusters, cin, generator=gen) >= ratio ** 0.5).float()
        mask = mask * keep[labels]
    return mask, tuple(int(v) for v in labels)


def masked_conv(cin, cout, k, stride, padding, dilation, bias, n_clusters, ratio, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv = MaskedConv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=bias)
    if bias:
        nn.init.normal_(conv.bias)
    mask, labels = sg_like_mask(cout, cin, n_clusters, ratio, gen)
    conv.set_mask(mask)
    return conv, plan_from_masked("layer", conv, labels=labels, n_clusters=n_clusters)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(cin=st.integers(1, 12), cout=st.integers(1, 20), n_clusters=st.integers(1, 4),
       kh=st.integers(1, 3), kw=st.integers(1, 3), stride=st.integers(1, 3), padding=st.integers(0, 2),
       dilation=st.integers(1, 2), ratio=st.floats(0.0, 0.9), bias=st.booleans(), seed=st.integers(0, 1000))
def test_every_conv_strategy_computes_the_masked_function(cin, cout, n_clusters, kh, kw, stride, padding,
                                                          dilation, ratio, bias, seed):
    conv, lp = masked_conv(cin, cout, (kh, kw), stride, padding, dilation, bias, n_clusters, ratio, seed)
    x = torch.randn(2, cin, 9, 10)
    with torch.no_grad():
        ref = conv(x)
        for strategy, options in CONV_VARIANTS:
            out = compact_from_masked(conv, lp, strategy, options)(x)
            assert out.shape == ref.shape
            assert max_rel_error(ref, out) <= TOL, (strategy, options)


@pytest.mark.parametrize("strategy,options", CONV_VARIANTS)
def test_filter_without_inputs_outputs_its_bias_only(strategy, options):
    conv = MaskedConv2d(5, 6, 3, padding=1, bias=True)
    nn.init.normal_(conv.bias)
    mask = torch.ones(6, 5)
    mask[2] = 0
    mask[4] = 0
    mask[5, :3] = 0
    conv.set_mask(mask)
    lp = plan_from_masked("c", conv)
    assert any(not b.inputs for b in lp.blocks)
    x = torch.randn(2, 5, 7, 7)
    with torch.no_grad():
        out = compact_from_masked(conv, lp, strategy, options)(x)
        ref = conv(x)
    assert torch.allclose(out[:, 2], conv.bias[2].expand(2, 7, 7))
    assert torch.allclose(out[:, 4], conv.bias[4].expand(2, 7, 7))
    assert max_rel_error(ref, out) <= TOL


def test_all_filters_without_inputs():
    conv = MaskedConv2d(3, 4, 1, bias=False)
    conv.set_mask(torch.zeros(4, 3))
    lp = plan_from_masked("c", conv)
    x = torch.randn(1, 3, 4, 4)
    for strategy, options in CONV_VARIANTS:
        with torch.no_grad():
            assert torch.equal(compact_from_masked(conv, lp, strategy, options)(x), torch.zeros(1, 4, 4, 4))


@pytest.mark.parametrize("strategy,options", [("dense", {}), ("split", {"merge": "blocks"}),
                                              ("split", {"merge": "cost"})])
def test_linear_strategies(strategy, options):
    torch.manual_seed(0)
    lin = MaskedLinear(30, 20)
    mask, labels = sg_like_mask(20, 30, 3, 0.6, torch.Generator().manual_seed(1))
    mask[7] = 0
    lin.set_mask(mask)
    lp = plan_from_masked("fc", lin, labels=labels, n_clusters=3)
    x = torch.randn(5, 30)
    with torch.no_grad():
        out = compact_from_masked(lin, lp, strategy, options)(x)
        assert max_rel_error(lin(x), out) <= TOL
        assert torch.allclose(out[:, 7], lin.bias[7].expand(5))


def _lp(blocks, cin, labels=()):
    cout = sum(len(b.filters) for b in blocks)
    return LayerPlan("l", "conv", cin, cout, (1, 1), (1, 1), (0, 0), (1, 1), 2, 0.5, tuple(labels), tuple(blocks))


def test_merging_by_hand():
    # f0,f1 keep {0,1}; f2 keeps {0,1,2}. Tiles of 8: apart 8*2 + 8*3 = 40 > together 8*3 = 24.
    lp = _lp([Block((0, 1), (0, 1)), Block((2,), (0, 1, 2))], 4)
    merged = layer_groups(lp, {"merge": "cost", "tile": 8})
    assert [(g.filters, g.inputs) for g in merged] == [((0, 1, 2), (0, 1, 2))]
    assert groups_macs(merged, 8) == 24
    # Without padding: apart 2*2 + 1*3 = 7 < together 3*3 = 9: stays apart.
    apart = layer_groups(lp, {"merge": "cost", "tile": 1})
    assert [(g.filters, g.inputs) for g in apart] == [((0, 1), (0, 1)), ((2,), (0, 1, 2))]
    # Labels merge blocks of one cluster into the union of their inputs.
    lp2 = _lp([Block((0,), (0,)), Block((1,), (3,)), Block((2,), (1,))], 4, labels=(0, 0, 1))
    assert [(g.filters, g.inputs) for g in layer_groups(lp2, {"merge": "labels"})] == [((0, 1), (0, 3)), ((2,), (1,))]
    assert len(layer_groups(lp2, {"merge": "blocks", "max_groups": 1})) == 1


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(16, 16, 1)
        self.c3 = nn.Conv2d(16, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x)) + x
        x = torch.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


def masked_small_cnn():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    to_masked(model, ["c1", "c2", "c3", "fc"])
    gen = torch.Generator().manual_seed(3)
    for name in ["c1", "c2", "c3", "fc"]:
        m = model.get_submodule(name)
        mask, _ = sg_like_mask(m.connection_mask.shape[0], m.connection_mask.shape[1], 3, 0.6, gen)
        m.set_mask(mask)
    return model


def test_materialize_and_rebuild_small_cnn():
    model = masked_small_cnn()
    x = torch.randn(2, 3, 12, 12)
    calls = []
    compact, choices = materialize(model, x, threads=1, repeats=2, progress=lambda *a: calls.append(a[0]))
    assert list(choices) == ["c1", "c2", "c3", "fc"] == calls
    json.dumps(choices)  # plain data
    for name, c in choices.items():
        assert "dense" in c["seconds"]
        assert c["seconds"][min(c["seconds"], key=c["seconds"].get)] <= c["seconds"]["dense"]
        assert not isinstance(compact.get_submodule(name), (MaskedConv2d, MaskedLinear))
    assert "kernel[merge=\"cost\",tile=8]" in choices["c3"]["seconds"]  # stride 2 is a candidate too
    with torch.no_grad():
        ref = model(x)
        assert max_rel_error(ref, compact(x)) <= TOL
        again = rebuild(model, choices)
        assert max_rel_error(ref, again(x)) <= TOL
    forced = {n: {"strategy": "split", "options": {"merge": "blocks"}} for n in choices}
    compact2, choices2 = materialize(model, x, choices=forced)
    assert all(isinstance(compact2.get_submodule(n), (SplitConv, nn.Module)) for n in forced)
    assert isinstance(compact2.c1, SplitConv) and choices2["c1"]["strategy"] == "split"
    with torch.no_grad():
        assert max_rel_error(ref, compact2(x)) <= TOL


def test_measure_layer_always_has_dense():
    conv, lp = masked_conv(8, 8, 3, 1, 1, 1, False, 2, 0.5, 0)
    secs = measure_layer(conv, lp, torch.randn(1, 8, 6, 6), threads=1, repeats=2, strategies=["split"])
    assert set(secs) == {"dense", "split"} and all(s > 0 for s in secs.values())


@pytest.mark.parametrize("strategy,options", CONV_VARIANTS[1:])
def test_torchscript_script_and_trace_round_trip(strategy, options):
    conv, lp = masked_conv(6, 10, 3, 1, 1, 1, True, 3, 0.5, 1)
    mod = compact_from_masked(conv, lp, strategy, options).eval()
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        ref = mod(x)
        for jitted in (torch.jit.script(mod), torch.jit.trace(mod, x)):
            buf = io.BytesIO()
            torch.jit.save(jitted, buf)
            buf.seek(0)
            loaded = torch.jit.load(buf)
            assert torch.allclose(loaded(x), ref, atol=1e-6)


@pytest.mark.parametrize("strategy,options", CONV_VARIANTS[1:])
def test_state_dict_round_trip_through_safetensors(strategy, options, tmp_path):
    from safetensors.torch import load_file, save_file

    conv, lp = masked_conv(7, 9, 3, 1, 1, 1, True, 3, 0.6, 2)
    mod = compact_from_masked(conv, lp, strategy, options)
    save_file({k: v.contiguous() for k, v in mod.state_dict().items()}, tmp_path / "w.safetensors")
    empty = build_compact(lp, strategy, options, bias=True)
    empty.load_state_dict(load_file(tmp_path / "w.safetensors"), strict=True)
    x = torch.randn(1, 7, 6, 6)
    with torch.no_grad():
        assert torch.equal(empty(x), mod(x))
    if strategy != "dense":  # index tables are not saved: only weights
        assert set(mod.state_dict()) <= {"weight", "bias"}


def test_whole_model_reload_from_plan_and_choices(tmp_path):
    from safetensors.torch import load_file, save_file

    model = masked_small_cnn()
    x = torch.randn(1, 3, 10, 10)
    compact, choices = materialize(model, x, threads=1, repeats=1)
    plans = {n: plan_from_masked(n, model.get_submodule(n)) for n in choices}
    save_file({k: v.contiguous() for k, v in compact.state_dict().items()}, tmp_path / "m.safetensors")
    fresh = rebuild(SmallCNN(), choices, plan=plans)  # original architecture, empty compact layers
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"), strict=True)
    with torch.no_grad():
        assert max_rel_error(compact(x), fresh(x)) <= 1e-6


def test_portable_replaces_kernel_and_fvcore_counts_executed_macs():
    from fvcore.nn import FlopCountAnalysis

    conv, lp = masked_conv(8, 12, 3, 1, 1, 1, False, 2, 0.5, 4)
    kmod = compact_from_masked(conv, lp, "kernel", {"merge": "blocks"}).eval()
    x = torch.randn(1, 8, 5, 5)
    split = portable(nn.Sequential(copy.deepcopy(kmod)))[0]
    assert isinstance(split, SplitConv)
    with torch.no_grad():
        assert max_rel_error(kmod(x), split(x)) <= TOL
    kept = sum(len(b.filters) * len(b.inputs) for b in lp.blocks if b.inputs) * 9 * 25
    fl = FlopCountAnalysis(split, x)
    fl.unsupported_ops_warnings(False)
    assert fl.total() == kept  # one small conv per block: exactly the kept connections
    fk = FlopCountAnalysis(kmod, x).set_op_handle(**fvcore_handles())
    fk.unsupported_ops_warnings(False)
    assert fk.total() == kmod.weight.numel() * 25  # packed (tile-padded) weights x output pixels
    assert isinstance(compact_from_masked(conv, lp, "grouped", {}), GroupedConv)
    assert isinstance(kmod, KernelConv)


def test_onnx_export_of_portable_module(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    conv, lp = masked_conv(6, 8, 3, 1, 1, 1, True, 2, 0.5, 5)
    mod = portable(nn.Sequential(compact_from_masked(conv, lp, "kernel", {}))).eval()
    x = torch.randn(1, 6, 7, 7)
    path = tmp_path / "m.onnx"
    torch.onnx.export(mod, (x,), str(path), input_names=["x"], dynamo=False)
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
    with torch.no_grad():
        assert max_rel_error(mod(x), got) <= TOL


@pytest.mark.parametrize("k,stride,pad,dil,size", [
    (1, 1, 0, 1, 12), (1, 1, 0, 1, 33), (3, 1, 1, 1, 30), (3, 1, 2, 2, 17), (5, 1, 2, 1, 7),
    (3, 2, 1, 1, 56), (3, 2, 1, 1, 29), (1, 2, 0, 1, 28), (3, (2, 3), 2, 2, 31), (5, 3, 1, 1, 14)])
def test_kernel_tile_widths_chunks_and_half_tiles(k, stride, pad, dil, size):
    # planes chosen to use both register-tile widths (32/48 pixels), several chunks,
    # row-wrap lanes (padding), clusters of 13 filters (8-wide + 4-wide tiles), and strides
    # whose polyphase planes are uneven (odd sizes) or have a zero-filled last row
    # Both schedules: batch 1 and 2 (whole batch staged, (sample, chunk, tile) items cut into
    # per-thread shares, with 3 or 7 threads shares of unequal length and more threads than
    # some layers have items) and batch 5 with 1 or 2 threads (whole samples per thread,
    # staged one by one; 1x1 groups packed per chunk).
    conv, lp = masked_conv(10, 26, k, stride, pad, dil, True, 2, 0.5, 7)
    threads = torch.get_num_threads()
    try:
        for n, nthreads in ((1, 2), (1, 3), (2, 7), (5, 1), (5, 2)):
            torch.set_num_threads(nthreads)
            x = torch.randn(n, 10, size, size)
            with torch.no_grad():
                for options in ({"merge": "labels"}, {"merge": "blocks"}):
                    mod = compact_from_masked(conv, lp, "kernel", options)
                    assert max_rel_error(conv(x), mod(x)) <= TOL, (n, nthreads, options)
    finally:
        torch.set_num_threads(threads)


def test_kernel_same_padding_reads_in_place_for_any_input_size():
    # stride-1 layers with "same" padding read the input in place, the padding masked per
    # register vector and tap from a table kept per geometry: one module on planes of several
    # sizes (two of one height), non-square, 32- and 48-pixel register tiles, several pixel
    # chunks, then the first size again (its table found again after the others); a 5x5
    # layer with dilation 2 pads 4
    conv, lp = masked_conv(9, 19, 3, 1, 1, 1, True, 3, 0.5, 11)
    conv5, lp5 = masked_conv(9, 19, 5, 1, 4, 2, False, 2, 0.5, 12)
    mod = compact_from_masked(conv, lp, "kernel", {"merge": "cost", "tile": 8})
    mod5 = compact_from_masked(conv5, lp5, "kernel", {"merge": "labels"})
    with torch.no_grad():
        for h, w, n in ((7, 7, 1), (14, 9, 2), (14, 11, 1), (1, 23, 1), (31, 40, 1), (6, 5, 6), (7, 7, 3)):
            x = torch.randn(n, 9, h, w)
            assert max_rel_error(conv(x), mod(x)) <= TOL, (h, w, n)
            if h >= 9 and w >= 9:
                assert max_rel_error(conv5(x), mod5(x)) <= TOL, (h, w, n)


@pytest.mark.parametrize("cin,cout,size,n,nthreads", [
    (10, 60, 7, 5, 1), (10, 60, 5, 6, 2), (10, 60, 4, 5, 1), (12, 60, 23, 5, 2), (900, 60, 7, 5, 1),
    (700, 60, 5, 9, 2), (10, 21, 7, 5, 2), (700, 21, 5, 9, 1), (900, 1200, 7, 5, 1), (40, 1200, 23, 5, 2)])
def test_kernel_1x1_panels_fold_samples_and_split_chunks(cin, cout, size, n, nthreads):
    # 1x1 layers with whole samples per thread pack, per pixel chunk, the union of the rows
    # that any tile reads into one panel, block by block, and every tile reads its own rows of
    # it: groups of several tiles (60 or 1200 filters in 3 clusters) next to one-tile groups
    # (21 filters). Planes under 512 pixels pack several samples side by side (49 and 25
    # pixels: a register vector spans two samples; 16: exactly one vector per sample), and
    # wide layers (700-900 inputs) split the pixels into several chunks with a partial last
    # block.
    conv, lp = masked_conv(cin, cout, 1, 1, 0, 1, True, 3, 0.5, 5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(nthreads)
        x = torch.randn(n, cin, size, size)
        with torch.no_grad():
            mod = compact_from_masked(conv, lp, "kernel", {"merge": "cost", "tile": 8})
            assert max_rel_error(conv(x), mod(x)) <= TOL
    finally:
        torch.set_num_threads(threads)
    tk, ki = mod.tile_k.tolist(), mod.kidx.tolist()
    lists = [ki[tk[t]:tk[t + 1]] for t in range(len(tk) - 1)]
    packed = sum(a == b for a, b in zip(lists, lists[1:]))  # tiles that share the one before's inputs
    assert (packed > 0) if cout >= 60 else (packed < len(lists) - 1)


def test_unknown_strategy_is_a_config_error():
    from sgcompress.errors import ConfigError

    conv, lp = masked_conv(4, 4, 1, 1, 0, 1, False, 2, 0.5, 0)
    with pytest.raises(ConfigError, match="unknown compact strategy 'sparse'"):
        measure_layer(conv, lp, torch.randn(1, 4, 3, 3), repeats=1, strategies=["sparse"])
    with pytest.raises(ConfigError, match="does not apply to layer 's' .linear"):
        build_compact(plan_from_masked("s", MaskedLinear(4, 4)), "kernel", {}, bias=False)


@pytest.mark.parametrize("stride,pad,dil", [(1, 1, 1), (2, 1, 1), ((2, 1), 0, 2), (3, 2, 1)])
def test_reference_gconv_computes_the_masked_function(stride, pad, dil):
    """The pure-PyTorch fallback (used where the kernel cannot be built) is the same function."""
    from sgcompress.compact.kernel import gconv_reference

    conv, lp = masked_conv(9, 21, 3, stride, pad, dil, True, 3, 0.6, 11)
    mod = compact_from_masked(conv, lp, "kernel", {"merge": "cost", "tile": 8})
    x = torch.randn(2, 9, 15, 13)
    with torch.no_grad():
        got = gconv_reference(x, mod.weight, mod.tile_out, mod.tile_k, mod.tile_w, mod.tile_r, mod.kidx,
                              mod.bias, mod.out_channels, mod.kh, mod.kw, mod.dh, mod.dw, mod.sh, mod.sw,
                              mod.ph, mod.pw)
        assert max_rel_error(conv(x), got) <= TOL


def test_without_the_native_kernel_the_op_falls_back_to_the_reference():
    """Where no compiler is available (here: SGCOMPRESS_NO_KERNEL=1) kernel-form layers still run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import torch\n"
        "from test_compact import masked_conv, max_rel_error, TOL\n"
        "from sgcompress.compact import compact_from_masked\n"
        "from sgcompress.compact.kernel import kernel_status\n"
        "conv, lp = masked_conv(9, 21, 3, 2, 1, 1, True, 3, 0.6, 11)\n"
        "mod = compact_from_masked(conv, lp, 'kernel', {})\n"
        "x = torch.randn(2, 9, 15, 13)\n"
        "with torch.no_grad():\n"
        "    assert max_rel_error(conv(x), mod(x)) <= TOL\n"
        "assert kernel_status() == {'native': False, 'error': 'disabled by SGCOMPRESS_NO_KERNEL=1'}\n"
    )
    env = dict(os.environ, SGCOMPRESS_NO_KERNEL="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
