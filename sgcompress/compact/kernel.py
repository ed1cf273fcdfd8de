"""The ``sgcompress::gconv`` operator: schema, reference implementation, native build.

The schema is always defined (so modules using it can be scripted and traced). Its CPU
implementation is the compiled kernel from :mod:`._kernel_src` when it builds (built once
with ``torch.utils.cpp_extension.load_inline`` and cached by PyTorch), else
:func:`gconv_reference`, a pure-PyTorch version computing the same function.
``SGCOMPRESS_NO_KERNEL=1`` skips the build.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading

import torch
import torch.nn.functional as F

from ._kernel_src import KERNEL_SOURCE

log = logging.getLogger(__name__)

SCHEMA = (
    "gconv(Tensor x, Tensor wpack, Tensor tile_out, Tensor tile_k, Tensor tile_w, Tensor tile_r, "
    "Tensor kidx, Tensor bias, int C_out, int kh, int kw, int dh, int dw, int sh=1, int sw=1, int ph=0, int pw=0) -> Tensor"
)
TILE = 8  # filters per tile; must match kR in the C++ source

_lib = torch.library.Library("sgcompress", "DEF")
_lib.define(SCHEMA)
_state = {"native": None, "error": None}
_lock = threading.Lock()


def _out_size(size: int, k: int, d: int, s: int) -> int:
    return (size - d * (k - 1) - 1) // s + 1


def gconv_reference(x, wpack, tile_out, tile_k, tile_w, tile_r, kidx, bias, C_out: int,
                    kh: int, kw: int, dh: int, dw: int, sh: int = 1, sw: int = 1, ph: int = 0,
                    pw: int = 0) -> torch.Tensor:
    """Pure-PyTorch ``gconv`` (slow, exact): one small conv per tile."""
    if ph or pw:
        x = F.pad(x, [pw, pw, ph, ph])
    n, _, hp, wp = x.shape
    ho, wo = _out_size(hp, kh, dh, sh), _out_size(wp, kw, dw, sw)
    out = x.new_zeros(n, C_out, ho, wo)
    kk = kh * kw
    for t in range(tile_out.shape[0]):
        k0, k1 = int(tile_k[t]), int(tile_k[t + 1])
        fo = tile_out[t]
        valid = fo >= 0
        if not bool(valid.any()):
            continue
        if k1 > k0:
            w = wpack[int(tile_w[t]): int(tile_w[t]) + (k1 - k0) * kk * TILE]
            w = w.view(k1 - k0, kh, kw, TILE).permute(3, 0, 1, 2)[valid]
            y = F.conv2d(x.index_select(1, kidx[k0:k1]), w, None, (sh, sw), 0, (dh, dw))
            out[:, fo[valid]] = y
    if bias.numel() > 0:
        out = out + bias.view(1, -1, 1, 1)
    return out


@torch.library.register_fake("sgcompress::gconv", lib=_lib)
def _gconv_fake(x, wpack, tile_out, tile_k, tile_w, tile_r, kidx, bias, C_out, kh, kw, dh, dw, sh=1, sw=1,
                ph=0, pw=0):
    n, _, h, w = x.shape
    hp, wp = h + 2 * ph, w + 2 * pw
    return x.new_empty(n, C_out, _out_size(hp, kh, dh, sh), _out_size(wp, kw, dw, sw))


def _build_name() -> str:
    """Extension name: the build uses -march=native, so the CPU's feature flags are part of it
    (a cached build is never loaded on a CPU it was not compiled for)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    digest = hashlib.sha1((flags + platform.machine()).encode()).hexdigest()[:10]
    return f"sgcompress_gconv_{digest}"


def _build() -> bool:
    if os.environ.get("SGCOMPRESS_NO_KERNEL") == "1":
        _state["error"] = "disabled by SGCOMPRESS_NO_KERNEL=1"
        return False
    try:
        from torch.utils.cpp_extension import load_inline

        load_inline(
            name=_build_name(),
            cpp_sources=[KERNEL_SOURCE],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        return True
    except Exception as e:  # no compiler, no headers, ...: fall back to the reference
        _state["error"] = f"{type(e).__name__}: {e}"
        log.warning("compact kernel unavailable, using the PyTorch reference: %s", _state["error"])
        return False


def ensure_kernel() -> bool:
    """Build/load the native kernel once; register the reference when it is unavailable.

    Returns whether the native kernel is in use.
    """
    with _lock:
        if _state["native"] is None:
            native = _build()
            if not native:
                _lib.impl("gconv", gconv_reference, "CPU")
            # the kernel is CPU code; a compact model moved to a GPU still computes the same
            # function (slowly: export for that device to get forms that are fast there)
            _lib.impl("gconv", gconv_reference, "CUDA")
            _state["native"] = native
        return bool(_state["native"])


def kernel_status() -> dict:
    return {"native": _state["native"], "error": _state["error"]}
