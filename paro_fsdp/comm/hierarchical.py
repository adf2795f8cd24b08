"""Global collectives over a 2D mesh done in two phases (one link at a time, no overlap).

These have the semantics of the flat collective over all n ranks in group-major order, but
each rank sends only (g-1)/n of the data across groups. They are what ``comm="default"``
uses; HO-Ring (``paro_fsdp.comm.ho_ring``) overlaps the two phases.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from paro_fsdp.comm.groups import MeshGroups, Pending, completed
from paro_fsdp.comm.names import DEFAULT
from paro_fsdp.comm.stats import INTER, INTRA


class HierarchicalCollectives:
    """Flat all-gather / reduce-scatter / all-reduce as an inter phase and an intra phase.

    With ``async_op=True`` the inter-group phase is left in flight and the call returns a
    :class:`~paro_fsdp.comm.groups.Pending`; an intra phase that follows it is issued at
    ``wait()``, so every rank must wait for its handles in the same order.
    """

    name = DEFAULT

    def __init__(self, groups: MeshGroups) -> None:
        self.groups = groups

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, *, async_op: bool = False) -> Pending | None:
        """``output[r*S:(r+1)*S]`` = ``input`` of flat rank r, for S = ``input.numel()``."""
        if (link := self.groups.single_link) is not None:
            return completed(self.groups.start_all_gather(output.view(-1), input.reshape(-1), link), async_op)
        g, m = self.groups.groups, self.groups.group_size
        s = input.numel()
        column = input.new_empty(g * s)
        inter = self.groups.start_all_gather(column, input.reshape(-1), INTER)

        def finish() -> None:
            inter.wait()
            self.groups.start_all_gather_columns(output.view(g, m, s), column).wait()

        return completed(Pending(None, finish), async_op)

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor,
                       op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, *,
                       async_op: bool = False) -> Pending | None:
        """``output`` = reduction over ranks of ``input[r*S:(r+1)*S]``, r this flat rank."""
        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            raise ValueError(f"hierarchical reduce_scatter supports SUM and AVG, got {op}")
        if (link := self.groups.single_link) is not None:
            return completed(self.groups.start_reduce_scatter(output.view(-1), input.reshape(-1), link, op), async_op)
        g, m = self.groups.groups, self.groups.group_size
        s = output.numel()
        column = input.new_empty(g * s)
        self.groups.start_reduce_scatter_columns(column, input.view(g, m, s)).wait()
        inter = self.groups.start_reduce_scatter(output.view(-1), column, INTER)

        def finish() -> None:
            inter.wait()
            if op == dist.ReduceOp.AVG:
                output.div_(g * m)

        return completed(Pending(None, finish), async_op)

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, *,
                   async_op: bool = False) -> Pending | None:
        """In-place all-reduce over all n ranks: intra reduce-scatter, inter all-reduce, intra all-gather."""
        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            raise ValueError(f"hierarchical all_reduce supports SUM and AVG, got {op}")
        if (link := self.groups.single_link) is not None:
            return completed(self.groups.start_all_reduce(tensor, link, op), async_op)
        m = self.groups.group_size
        flat = tensor.view(-1)
        padded = -(-flat.numel() // m) * m
        work = flat if padded == flat.numel() else torch.cat([flat, flat.new_zeros(padded - flat.numel())])
        piece = work.new_empty(padded // m)
        self.groups.reduce_scatter(piece, work, INTRA)
        inter = self.groups.start_all_reduce(piece, INTER)

        def finish() -> None:
            inter.wait()
            self.groups.all_gather(work, piece, INTRA)
            if work is not flat:
                flat.copy_(work[: flat.numel()])
            if op == dist.ReduceOp.AVG:
                flat.div_(self.groups.world)

        return completed(Pending(None, finish), async_op)
