"""Compact modules: each computes exactly what its masked layer computes, from groups.

Every class is built from plain data (geometry + groups + bias flag); index tables are
non-persistent buffers derived from that data, so a state_dict holds only weights and
loads (e.g. from safetensors) into a module rebuilt with :func:`build_compact`.
Output channels are always in the original order.

- :class:`SplitConv` / :class:`SplitLinear`: per group, gather its inputs
  (``index_select``) and run one small dense conv / linear; concatenate; reorder.
- :class:`GroupedConv`: one gather of all groups' inputs (padded to equal length), one
  grouped conv (filters padded to equal count), one reorder.
- :class:`KernelConv`: the ``sgcompress::gconv`` operator: reads inputs and writes outputs
  through index tables, so it copies nothing (a strided layer copies its input once, into
  polyphase planes). :meth:`KernelConv.to_split`
  gives the portable equivalent for ONNX export.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .kernel import TILE, ensure_kernel
from .spec import Group, LayerGeometry


def _out_position(groups: Sequence[Group], out_channels: int, rows_per_group: Sequence[int] | None = None):
    """Index p with p[f] = row of filter f in the concatenation of the groups' outputs."""
    pos = torch.zeros(out_channels, dtype=torch.long)
    start = 0
    for j, g in enumerate(groups):
        pos[list(g.filters)] = torch.arange(start, start + len(g.filters))
        start += rows_per_group[j] if rows_per_group is not None else len(g.filters)
    return pos


def _flat_layout(module: nn.Module, groups: Sequence[Group], kernel: List[int], out_channels: int,
                 bias: bool):
    """Give ``module`` one flat weight holding every group that has inputs, one after another,
    their concatenated input indices (``in_index``) and a bias. Returns those groups, their
    weight shapes and the weight and input offsets (the caller keeps them, annotated for
    TorchScript)."""
    work = [g for g in groups if g.inputs]
    shapes = [[len(g.filters), len(g.inputs), *kernel] for g in work]
    offs = [0]
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        offs.append(offs[-1] + n)
    ioffs = [0]
    for g in work:
        ioffs.append(ioffs[-1] + len(g.inputs))
    module.weight = nn.Parameter(torch.empty(offs[-1]))
    module.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
    module.register_buffer("in_index", torch.tensor([i for g in work for i in g.inputs], dtype=torch.long),
                           persistent=False)
    return work, shapes, offs, ioffs


def _is_identity(pos: torch.Tensor) -> bool:
    return bool(torch.equal(pos, torch.arange(pos.numel())))


class SplitConv(nn.Module):
    def __init__(self, geometry: LayerGeometry, groups: Sequence[Group], bias: bool) -> None:
        super().__init__()
        kh, kw = geometry.kernel_size
        self.out_channels = geometry.out_channels
        self.kernel = [kh, kw]
        self.stride = list(geometry.stride)
        self.padding = list(geometry.padding)
        self.dilation = list(geometry.dilation)
        work, shapes, offs, ioffs = _flat_layout(self, groups, [kh, kw], geometry.out_channels, bias)
        self.shapes: List[List[int]] = shapes
        self.w_offsets: List[int] = offs
        self.i_offsets: List[int] = ioffs
        # filters of input-less groups output zero (plus bias): one zero block at the end
        empty = sum(len(g.filters) for g in groups if not g.inputs)
        self.n_empty = empty
        order = list(work) + [g for g in groups if not g.inputs]
        pos = _out_position(order, geometry.out_channels)
        self.reorder = not _is_identity(pos)
        self.register_buffer("out_pos", pos, persistent=False)

    def group_weight(self, j: int) -> torch.Tensor:
        s = self.shapes[j]
        return self.weight[self.w_offsets[j]: self.w_offsets[j + 1]].view(s[0], s[1], s[2], s[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys: List[torch.Tensor] = []
        for j in range(len(self.shapes)):
            xi = x.index_select(1, self.in_index[self.i_offsets[j]: self.i_offsets[j + 1]])
            ys.append(F.conv2d(xi, self.group_weight(j), None, self.stride, self.padding, self.dilation))
        if self.n_empty > 0 or len(ys) == 0:
            ho = (x.shape[2] + 2 * self.padding[0] - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
            wo = (x.shape[3] + 2 * self.padding[1] - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
            ys.append(x.new_zeros(x.shape[0], self.n_empty, ho, wo))
        y = torch.cat(ys, 1) if len(ys) > 1 else ys[0]
        if self.reorder:
            y = y.index_select(1, self.out_pos)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y


class GroupedConv(nn.Module):
    def __init__(self, geometry: LayerGeometry, groups: Sequence[Group], bias: bool) -> None:
        super().__init__()
        kh, kw = geometry.kernel_size
        self.stride = list(geometry.stride)
        self.padding = list(geometry.padding)
        self.dilation = list(geometry.dilation)
        self.n_groups = len(groups)
        self.in_len = max(1, max(len(g.inputs) for g in groups))
        self.fmax = max(len(g.filters) for g in groups)
        idx = []
        for g in groups:  # pad each group's input list by repeating its last (or channel 0)
            ins = list(g.inputs) or [0]
            idx.extend(ins + [ins[-1]] * (self.in_len - len(ins)))
        self.register_buffer("in_index", torch.tensor(idx, dtype=torch.long), persistent=False)
        self.weight = nn.Parameter(torch.empty(self.n_groups * self.fmax, self.in_len, kh, kw))
        self.bias = nn.Parameter(torch.empty(self.n_groups * self.fmax)) if bias else None
        pos = _out_position(groups, geometry.out_channels, [self.fmax] * self.n_groups)
        self.reorder = not (_is_identity(pos) and self.n_groups * self.fmax == geometry.out_channels)
        self.register_buffer("out_pos", pos, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x.index_select(1, self.in_index), self.weight, self.bias, self.stride, self.padding,
                     self.dilation, self.n_groups)
        if self.reorder:
            y = y.index_select(1, self.out_pos)
        return y


class KernelConv(nn.Module):
    def __init__(self, geometry: LayerGeometry, groups: Sequence[Group], bias: bool) -> None:
        super().__init__()
        ensure_kernel()
        kh, kw = geometry.kernel_size
        self.geometry = geometry
        self.groups = tuple(groups)
        self.out_channels = geometry.out_channels
        self.kh, self.kw = kh, kw
        self.dh, self.dw = geometry.dilation
        self.sh, self.sw = geometry.stride
        self.ph, self.pw = geometry.padding
        tile_out, tile_k, tile_w, tile_r, kidx = [], [0], [], [], []
        off = 0
        for g in groups:
            f = list(g.filters)
            s = 0
            while s < len(f):
                r = TILE if len(f) - s > TILE // 2 else TILE // 2
                ff = f[s: s + r]
                s += r
                tile_out.append(ff + [-1] * (TILE - len(ff)))
                tile_r.append(r)
                kidx.extend(g.inputs)
                tile_k.append(tile_k[-1] + len(g.inputs))
                tile_w.append(off)
                off += len(g.inputs) * kh * kw * TILE
        self.register_buffer("tile_out", torch.tensor(tile_out, dtype=torch.long).view(-1, TILE), persistent=False)
        self.register_buffer("tile_k", torch.tensor(tile_k, dtype=torch.long), persistent=False)
        self.register_buffer("tile_w", torch.tensor(tile_w, dtype=torch.long), persistent=False)
        self.register_buffer("tile_r", torch.tensor(tile_r, dtype=torch.long), persistent=False)
        self.register_buffer("kidx", torch.tensor(kidx, dtype=torch.long), persistent=False)
        self.weight = nn.Parameter(torch.empty(off))
        self.bias = nn.Parameter(torch.empty(geometry.out_channels)) if bias else None
        self.register_buffer("no_bias", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias if self.bias is not None else self.no_bias
        return torch.ops.sgcompress.gconv(x, self.weight, self.tile_out, self.tile_k, self.tile_w, self.tile_r,
                                          self.kidx, b, self.out_channels, self.kh, self.kw, self.dh, self.dw,
                                          self.sh, self.sw, self.ph, self.pw)

    @torch.no_grad()
    def to_split(self) -> SplitConv:
        """The portable (plain PyTorch ops) module computing the same function."""
        new = SplitConv(self.geometry, self.groups, self.bias is not None).to(self.weight.device)
        load_group_weights(new, self.group_weights())
        if self.bias is not None:
            new.bias.copy_(self.bias)
        return new

    def group_weights(self) -> list[torch.Tensor]:
        """Per group, its weight ``(filters, inputs, kh, kw)``."""
        out, t = [], 0
        kk = self.kh * self.kw
        for g in self.groups:
            parts = []
            need = len(g.filters)
            while need > 0:
                r = int(self.tile_r[t])
                k0, k1 = int(self.tile_k[t]), int(self.tile_k[t + 1])
                w0 = int(self.tile_w[t])
                w = self.weight[w0: w0 + (k1 - k0) * kk * TILE].view(k1 - k0, self.kh, self.kw, TILE)
                take = min(r, need)
                parts.append(w.permute(3, 0, 1, 2)[:take])
                need -= take
                t += 1
            out.append(torch.cat(parts, 0))
        return out


class SplitLinear(nn.Module):
    def __init__(self, geometry: LayerGeometry, groups: Sequence[Group], bias: bool) -> None:
        super().__init__()
        self.out_features = geometry.out_channels
        work, shapes, offs, ioffs = _flat_layout(self, groups, [], geometry.out_channels, bias)
        self.shapes: List[List[int]] = shapes
        self.w_offsets: List[int] = offs
        self.i_offsets: List[int] = ioffs
        self.n_empty = sum(len(g.filters) for g in groups if not g.inputs)
        pos = _out_position(list(work) + [g for g in groups if not g.inputs], geometry.out_channels)
        self.reorder = not _is_identity(pos)
        self.register_buffer("out_pos", pos, persistent=False)

    def group_weight(self, j: int) -> torch.Tensor:
        s = self.shapes[j]
        return self.weight[self.w_offsets[j]: self.w_offsets[j + 1]].view(s[0], s[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys: List[torch.Tensor] = []
        for j in range(len(self.shapes)):
            xi = x.index_select(-1, self.in_index[self.i_offsets[j]: self.i_offsets[j + 1]])
            ys.append(F.linear(xi, self.group_weight(j)))
        if self.n_empty > 0 or len(ys) == 0:
            shape = list(x.shape[:-1]) + [self.n_empty]
            ys.append(x.new_zeros(shape))
        y = torch.cat(ys, -1) if len(ys) > 1 else ys[0]
        if self.reorder:
            y = y.index_select(-1, self.out_pos)
        if self.bias is not None:
            y = y + self.bias
        return y


@torch.no_grad()
def load_group_weights(module: nn.Module, weights: Sequence[torch.Tensor]) -> None:
    """Write per-group weights ``(filters, inputs[, kh, kw])`` (same order as the groups the
    module was built from) into ``module``'s own layout."""
    if isinstance(module, (SplitConv, SplitLinear)):
        ws = [w for w in weights if w.shape[1] > 0]
        module.weight.copy_(torch.cat([w.reshape(-1) for w in ws]) if ws else module.weight.new_empty(0))
    elif isinstance(module, GroupedConv):
        module.weight.zero_()
        for j, w in enumerate(weights):
            module.weight[j * module.fmax: j * module.fmax + w.shape[0], : w.shape[1]] = w
    elif isinstance(module, KernelConv):
        module.weight.zero_()
        t = 0
        kk = module.kh * module.kw
        for w in weights:
            s = 0
            while s < w.shape[0]:
                r = int(module.tile_r[t])
                k0, k1 = int(module.tile_k[t]), int(module.tile_k[t + 1])
                w0 = int(module.tile_w[t])
                dst = module.weight[w0: w0 + (k1 - k0) * kk * TILE].view(k1 - k0, module.kh, module.kw, TILE)
                part = w[s: s + r]
                dst[..., : part.shape[0]] = part.permute(1, 2, 3, 0)
                s += r
                t += 1
    else:
        raise TypeError(f"not a compact module: {type(module).__name__}")
