"""The compression plan: plain data that says, per layer, which connections survive.

A plan is what importance + grouping decided; surgery applies it. It is saved as JSON
(``plan.json`` in an artifact) with a schema version, and it is the only source of the
masks: weights files never carry them.

Per layer the plan keeps
- ``labels``: the k-means cluster of every filter at the last pruning step;
- ``blocks``: the exact mask, as filters grouped by identical kept-input sets. Each block
  is one group of the diverse group convolution: ``filters`` (output channels, sorted)
  and ``inputs`` (kept input channels, sorted). Blocks are ordered by their first filter
  and cover every filter exactly once; a block may keep no input at all.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .errors import ArtifactError

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Block:
    filters: tuple[int, ...]
    inputs: tuple[int, ...]


@dataclass(frozen=True)
class LayerPlan:
    name: str
    kind: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]  # (1, 1) for linear
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    n_clusters: int  # the --groups asked for (k-means clusters per step)
    ratio: float  # connection-sparsity target of this layer
    labels: tuple[int, ...]
    blocks: tuple[Block, ...]

    @property
    def n_connections(self) -> int:
        return self.in_channels * self.out_channels

    @property
    def kept_connections(self) -> int:
        return sum(len(b.filters) * len(b.inputs) for b in self.blocks)

    @property
    def density(self) -> float:
        return self.kept_connections / self.n_connections

    def mask(self) -> torch.Tensor:
        """The ``(C_out, C_in)`` 0/1 float mask this layer entry describes."""
        return mask_from_blocks(self.blocks, self.out_channels, self.in_channels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"] = [{"filters": list(b.filters), "inputs": list(b.inputs)} for b in self.blocks]
        d["summary"] = {
            "kept_connections": self.kept_connections,
            "connections": self.n_connections,
            "sparsity": round(1.0 - self.density, 6),
            "n_blocks": len(self.blocks),
        }
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerPlan":
        try:
            blocks = tuple(Block(tuple(b["filters"]), tuple(b["inputs"])) for b in d["blocks"])
            lp = cls(
                name=d["name"], kind=d["kind"], in_channels=int(d["in_channels"]),
                out_channels=int(d["out_channels"]), kernel_size=tuple(d["kernel_size"]),
                stride=tuple(d["stride"]), padding=tuple(d["padding"]),
                dilation=tuple(d["dilation"]), n_clusters=int(d["n_clusters"]),
                ratio=float(d["ratio"]), labels=tuple(d["labels"]), blocks=blocks,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"plan entry for layer {d.get('name', '?')!r} is malformed: {e!r}") from e
        covered = sorted(f for b in lp.blocks for f in b.filters)
        if covered != list(range(lp.out_channels)):
            raise ArtifactError(
                f"plan entry for layer {lp.name!r}: blocks do not cover filters 0..{lp.out_channels - 1} exactly once"
            )
        if any(i < 0 or i >= lp.in_channels for b in lp.blocks for i in b.inputs):
            raise ArtifactError(f"plan entry for layer {lp.name!r}: an input index is out of range")
        return lp


@dataclass(frozen=True)
class SkippedLayer:
    name: str
    reason: str


@dataclass(frozen=True)
class CompressionPlan:
    method: str
    layers: tuple[LayerPlan, ...]
    skipped: tuple[SkippedLayer, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def layer(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "method": self.method,
            "settings": self.settings,
            "layers": [lp.to_dict() for lp in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompressionPlan":
        if not isinstance(d, dict):
            raise ArtifactError("plan.json is not a JSON object; the artifact is damaged, re-create it")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ArtifactError(
                f"plan schema version {version!r} is not supported (this sgcompress reads {SCHEMA_VERSION}); "
                "re-run `sgcompress prune` with this version"
            )
        return cls(
            method=d.get("method", "sgcnn"),
            layers=tuple(LayerPlan.from_dict(x) for x in d.get("layers", [])),
            skipped=tuple(SkippedLayer(**s) for s in d.get("skipped", [])),
            settings=dict(d.get("settings", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> "CompressionPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"plan.json is not valid JSON: {e}") from e
        return cls.from_dict(data)


def blocks_from_mask(mask: torch.Tensor) -> tuple[Block, ...]:
    """Group the rows (filters) of a ``(C_out, C_in)`` 0/1 mask by identical kept-input sets."""
    rows = (mask.detach().cpu() != 0).numpy()
    by_key: dict[bytes, list[int]] = {}
    for j, row in enumerate(rows):
        by_key.setdefault(row.tobytes(), []).append(j)
    blocks = []
    for filters in by_key.values():
        inputs = tuple(int(i) for i in rows[filters[0]].nonzero()[0])
        blocks.append(Block(tuple(filters), inputs))
    blocks.sort(key=lambda b: b.filters[0])
    return tuple(blocks)


def mask_from_blocks(blocks, out_channels: int, in_channels: int) -> torch.Tensor:
    mask = torch.zeros(out_channels, in_channels)
    for b in blocks:
        if b.filters and b.inputs:
            mask[torch.tensor(b.filters)[:, None], torch.tensor(b.inputs)[None, :]] = 1.0
    return mask
