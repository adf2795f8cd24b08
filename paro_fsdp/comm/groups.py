"""Process groups of a 2D (dp_replicate x dp_shard) mesh and byte-counted collectives on them.

``intra`` is the group a rank shares fast links with (its ``dp_shard`` row); ``inter`` joins
the ranks with the same local index across groups (its ``dp_replicate`` column). Every
collective here runs over one of those and records the bytes it sends in ``stats``.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from paro_fsdp.comm.stats import INTER, INTRA, CommStats

REPLICATE_DIM = "dp_replicate"
SHARD_DIM = "dp_shard"


def validate_mesh(mesh: object) -> DeviceMesh:
    """Check that ``mesh`` is the 2D (dp_replicate, dp_shard) data-parallel mesh."""
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    names = tuple(mesh.mesh_dim_names or ())
    if mesh.ndim != 2 or names != (REPLICATE_DIM, SHARD_DIM):
        raise ValueError(
            f"mesh must be 2D with mesh_dim_names=({REPLICATE_DIM!r}, {SHARD_DIM!r}) "
            f"(groups x ranks per group), got ndim={mesh.ndim} and names={names or None}; build it with "
            f"init_device_mesh(device_type, (groups, ranks_per_group), "
            f"mesh_dim_names=({REPLICATE_DIM!r}, {SHARD_DIM!r})) or slice it out of a larger mesh"
        )
    return mesh


def _uses_gloo(group: dist.ProcessGroup) -> bool:
    try:
        return dist.get_backend(group) == "gloo"
    except (RuntimeError, ValueError):
        return False


class MeshGroups:
    """The intra- and inter-group process groups of a 2D mesh, with counted collectives.

    Ranks are numbered group-major: flat rank ``r = group_index * m + local_index``.
    """

    def __init__(self, mesh: DeviceMesh, stats: CommStats | None = None) -> None:
        self.mesh = validate_mesh(mesh)
        self.intra = mesh.get_group(SHARD_DIM)
        self.inter = mesh.get_group(REPLICATE_DIM)
        self.groups, self.group_size = mesh.size(0), mesh.size(1)
        self.world = self.groups * self.group_size
        coord = mesh.get_coordinate()
        if coord is None:
            raise ValueError("this rank is not part of the PaRO mesh")
        self.group_index, self.local_index = coord
        self.rank = self.group_index * self.group_size + self.local_index
        self.device = torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device()) \
            if mesh.device_type != "cpu" else torch.device("cpu")
        self.stats = stats if stats is not None else CommStats()
        self._gloo = {INTRA: _uses_gloo(self.intra), INTER: _uses_gloo(self.inter)}

    @functools.cached_property
    def flat_mesh(self) -> DeviceMesh:
        """The 1D mesh of all n ranks in group-major order (created on first use, collectively)."""
        return self.mesh[REPLICATE_DIM, SHARD_DIM]._flatten("paro_dp")

    def group(self, link: str) -> dist.ProcessGroup:
        return self.intra if link == INTRA else self.inter

    def size(self, link: str) -> int:
        return self.group_size if link == INTRA else self.groups

    def index(self, link: str) -> int:
        return self.local_index if link == INTRA else self.group_index

    # Counted collectives over one link. Sizes must divide evenly; callers pad.

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, link: str) -> None:
        """Ring all-gather: rank order of ``link``'s group, ``output`` = k * ``input``."""
        k = self.size(link)
        if k == 1:
            output.copy_(input.reshape(-1))
            return
        self.stats.add(link, (k - 1) * input.numel() * input.element_size())
        dist.all_gather_single(output, input, group=self.group(link))

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, link: str,
                       op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
        """Reduce-scatter with ring-optimal traffic ((k-1)/k of ``input`` sent)."""
        k = self.size(link)
        if k == 1:
            output.copy_(input.reshape(-1))
            return
        self.stats.add(link, (k - 1) * output.numel() * output.element_size())
        if self._gloo[link]:
            # gloo's reduce_scatter_tensor is an all-reduce plus a copy (twice the bytes).
            received = torch.empty_like(input)
            dist.all_to_all_single(received, input.contiguous(), group=self.group(link))
            torch.sum(received.view(k, -1), dim=0, out=output.view(-1))
            if op == dist.ReduceOp.AVG:
                output.div_(k)
        else:
            dist.reduce_scatter_single(output, input, op=op, group=self.group(link))

    def all_reduce(self, tensor: torch.Tensor, link: str,
                   op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
        """Ring all-reduce (2(k-1)/k of ``tensor`` sent)."""
        k = self.size(link)
        if k == 1:
            return
        self.stats.add(link, 2 * (k - 1) * tensor.numel() * tensor.element_size() // k)
        if op == dist.ReduceOp.AVG and self._gloo[link]:
            dist.all_reduce(tensor, group=self.group(link))
            tensor.div_(k)
        else:
            dist.all_reduce(tensor, op=op, group=self.group(link))
