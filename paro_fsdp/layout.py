"""Where each rank's slice of a unit's gradients and optimizer states lies in its local storage.

A unit is one FSDP2 module. On each rank its trainable parameters form a *row*: the
concatenation of their local storages in FSDP's padded layout, which is exactly the layout of
FSDP's reduce-scatter output. The row is cut into ``split`` equal chunks so that a finer
granularity than P picks whole chunks:

- P=N (row = whole unit, ``split`` = n): chunk r belongs to flat rank r; at I granularity a
  rank owns chunks ``{j*m + local_index}`` (its column), at G granularity chunk ``rank``.
- P=I (row = 1/m of the unit, ``split`` = g): at G granularity a rank owns chunk ``group_index``.
- P=G (row = 1/n, ``split`` = 1): everything is already owned.

These choices make the hierarchical reductions land each rank's chunks contiguously.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from paro_fsdp.comm.groups import MeshGroups
from paro_fsdp.strategy import Granularity


@dataclass
class ParamRegion:
    """One trainable parameter's place in the row: ``[offset, offset + numel)``."""

    param: torch.nn.Parameter
    offset: int
    numel: int  # real local elements; the region up to the next offset is FSDP padding

    def local_flat(self) -> torch.Tensor:
        local = self.param._local_tensor if isinstance(self.param, DTensor) else self.param
        return local.detach().view(-1)[: self.numel]


@dataclass
class Slice:
    """The part of one parameter that falls into one owned chunk."""

    region: ParamRegion
    param_start: int  # element offset inside the parameter's local storage
    compact_start: int  # element offset inside the compact buffer of the owning level
    numel: int

    def param_view(self) -> torch.Tensor:
        return self.region.local_flat()[self.param_start : self.param_start + self.numel]


class RowLayout:
    """Chunking of one unit's row and the chunks each granularity owns on this rank."""

    def __init__(self, regions: list[ParamRegion], row_numel: int, param_level: Granularity,
                 groups: MeshGroups) -> None:
        self.regions = regions
        self.param_level = param_level
        self.groups = groups
        self.split = {Granularity.N: groups.world, Granularity.I: groups.groups, Granularity.G: 1}[param_level]
        self.chunk = -(-row_numel // self.split) if row_numel else 0
        self.row_numel = row_numel
        self.padded_numel = self.chunk * self.split
        self._slices: dict[Granularity, list[Slice]] = {}

    def owned_chunks(self, level: Granularity) -> list[int]:
        """Chunk indices this rank owns at ``level`` (never coarser than the parameters' level)."""
        if level < self.param_level:
            raise ValueError(f"level {level.name} is coarser than the parameters' {self.param_level.name}")
        g, m = self.groups.groups, self.groups.group_size
        if level == self.param_level:
            return list(range(self.split))
        if self.param_level is Granularity.N and level is Granularity.I:
            return [j * m + self.groups.local_index for j in range(g)]
        if self.param_level is Granularity.N:
            return [self.groups.rank]
        return [self.groups.group_index]

    def compact_numel(self, level: Granularity) -> int:
        return len(self.owned_chunks(level)) * self.chunk

    def slices(self, level: Granularity) -> list[Slice]:
        """Intersections of owned chunks with parameters, in compact-buffer order (fixed per level)."""
        if level not in self._slices:
            self._slices[level] = self._cut(level)
        return self._slices[level]

    def _cut(self, level: Granularity) -> list[Slice]:
        out = []
        for c, chunk in enumerate(self.owned_chunks(level)):
            lo, hi = chunk * self.chunk, (chunk + 1) * self.chunk
            for region in self.regions:
                a, b = max(lo, region.offset), min(hi, region.offset + region.numel)
                if a < b:
                    out.append(Slice(region, a - region.offset, c * self.chunk + a - lo, b - a))
        return out

    def pad(self, row: torch.Tensor) -> torch.Tensor:
        """``row`` (FSDP's layout, ``row_numel`` elements) padded to ``split`` equal chunks."""
        if row.numel() != self.row_numel:
            raise RuntimeError(
                f"gradient row has {row.numel()} elements, expected {self.row_numel}: every trainable "
                f"parameter of a PaRO unit must receive a gradient in each backward (freeze unused "
                f"parameters with requires_grad_(False))"
            )
        if self.padded_numel == self.row_numel:
            return row
        return torch.cat([row, row.new_zeros(self.padded_numel - self.row_numel)])
