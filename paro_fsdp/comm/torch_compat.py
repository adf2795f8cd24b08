"""What differs between the torch releases paro-fsdp runs on (2.11 to 2.15).

torch 2.13 renamed ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` to
``all_gather_single`` / ``reduce_scatter_single`` and deprecated the old names, and gave
``new_group`` a ``sort_ranks`` argument, while the CUDA images clusters run still ship earlier
releases (2.11 has only the old names and always sorts). Every caller in paro-fsdp goes
through these, so one library runs on both. torch 2.14 and 2.15 keep the 2.13 names and
argument, and the FSDP2 internals ``paro_fsdp.fsdp_seam`` reads; their ``fully_shard(...,
dp_mesh_dims=...)`` (a multi-axis data-parallel storage mesh) is never passed by paro-fsdp, which
shards each unit over the mesh its strategy gives, so it changes nothing here (CI runs the
library suite on 2.13.0, 2.14.1 and 2.15.0).
"""

import inspect
from typing import Any

import torch
import torch.distributed as dist

all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_NEW_GROUP_KEEPS_ORDER = "sort_ranks" in inspect.signature(dist.new_group).parameters


def new_group_in_order(ranks: list[int], **kwargs: Any) -> dist.ProcessGroup:
    """``dist.new_group`` whose group ranks follow the order of ``ranks``.

    Before torch 2.13 ``new_group`` always sorts the ranks; an ascending list, which every mesh
    sliced from a row-major root mesh gives, is the only order it can keep.
    """
    if _NEW_GROUP_KEEPS_ORDER:
        return dist.new_group(ranks, sort_ranks=False, **kwargs)
    if ranks != sorted(ranks):
        raise NotImplementedError(f"torch {torch.__version__} sorts a process group's ranks, and this "
                                  f"group needs the order {ranks}; upgrade to torch >= 2.13")
    return dist.new_group(ranks, **kwargs)


__all__ = ["all_gather_single", "new_group_in_order", "reduce_scatter_single"]
