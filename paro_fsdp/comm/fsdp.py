"""FSDP2 custom all-gather / reduce-scatter that run a global collective hierarchically.

For modules sharded with plain ``fully_shard`` over the flattened data-parallel mesh
(``mesh["dp_replicate", "dp_shard"]._flatten()``), FSDP's flat all-gather and reduce-scatter
are replaced by a Collectives object (HO-Ring or the two-phase hierarchical one), so only
(g-1)/n of the data crosses groups. FSDP's calling conventions: the all-gather input aliases
this rank's slice of the output, the output is rank-major and may be uint8 (mixed parameter
dtypes), the reduce-scatter op is AVG (SUM under ``set_force_sum_reduction_for_comms``), and
FSDP waits on what the all-gather returns only when it is a ``dist.Work``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

from paro_fsdp.comm.groups import MeshGroups
from paro_fsdp.comm.ho_ring import HORingCollectives, HORingWork, collectives_for


class FSDPComm:
    """Base of every custom FSDP2 comm in the library: FSDP allocates its buffers through it."""

    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class _CollectivesComm(FSDPComm):
    """Shared part: group validation, whether the collectives can run async."""

    def __init__(self, collectives: Any) -> None:
        self.collectives = collectives
        self._async = "async_op" in inspect.signature(collectives.all_gather).parameters
        self._checked: set[int] = set()

    def _check(self, group: dist.ProcessGroup) -> None:
        if id(group) in self._checked:
            return
        groups: MeshGroups = self.collectives.groups
        expected = groups.mesh.mesh.flatten().tolist()
        ranks = dist.get_process_group_ranks(group)
        if ranks != expected:
            raise ValueError(
                f"FSDP shards this module over ranks {ranks}, but the {self.collectives.name!r} "
                f"collectives run over the mesh's ranks {expected} (group-major); shard it with "
                "fully_shard(module, mesh=mesh['dp_replicate', 'dp_shard']._flatten())"
            )
        self._checked.add(id(group))


def _as_work(handle: Any, result: torch.Tensor) -> dist.Work:
    """FSDP2 waits on what a custom comm returns only if it is a ``dist.Work``."""
    return handle if isinstance(handle, dist.Work) else HORingWork(handle.wait, [result])


class CollectivesAllGather(_CollectivesComm, AllGather):
    """FSDP2 all-gather over the flattened mesh, run by ``collectives``."""

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, async_op: bool = False) -> dist.Work | None:
        self._check(group)
        if async_op and self._async:
            return _as_work(self.collectives.all_gather(output_tensor, input_tensor, async_op=True), output_tensor)
        self.collectives.all_gather(output_tensor, input_tensor)
        return None


class CollectivesReduceScatter(_CollectivesComm, ReduceScatter):
    """FSDP2 reduce-scatter (SUM or AVG) over the flattened mesh, run by ``collectives``."""

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, op: dist.ReduceOp | dist.ReduceOp.RedOpType,
                 async_op: bool = False) -> dist.Work | None:
        self._check(group)
        if async_op and self._async:
            return _as_work(self.collectives.reduce_scatter(output_tensor, input_tensor, op, async_op=True),
                            output_tensor)
        self.collectives.reduce_scatter(output_tensor, input_tensor, op)
        return None


def set_collectives(module: nn.Module, collectives: Any) -> int:
    """Make every FSDP module under ``module`` (itself included) all-gather and reduce-scatter
    with ``collectives``; returns how many FSDP modules were set.

    FSDP2 keeps custom comms per module, so setting only the root would leave the others flat.
    """
    all_gather, reduce_scatter = CollectivesAllGather(collectives), CollectivesReduceScatter(collectives)
    count = 0
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.set_custom_all_gather(all_gather)
            sub.set_custom_reduce_scatter(reduce_scatter)
            count += 1
    if count == 0:
        raise ValueError(f"{type(module).__name__} contains no FSDP module; call fully_shard on it first")
    return count


def use_ho_ring(module: nn.Module, mesh: DeviceMesh) -> HORingCollectives:
    """Opt a plain ``fully_shard`` model into HO-Ring.

    ``module`` must be sharded over ``mesh["dp_replicate", "dp_shard"]._flatten()`` for the 2D
    ``mesh``. Returns the mesh's HO-Ring collectives (byte counts in ``.groups.stats``).
    """
    collectives = collectives_for(mesh)
    set_collectives(module, collectives)
    return collectives
