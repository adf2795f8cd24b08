"""Baseline global collectives for the benchmark: the backend's own, and a flat send/recv ring.

Both have the interface of ``paro_fsdp.comm.hierarchical.HierarchicalCollectives`` and the flat
semantics over the whole world in group-major rank order, so every implementation computes the
same result from the same buffers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from benchmarks.collectives_report import BACKEND_FLAT, FLAT_RING
from paro_fsdp.comm.torch_compat import all_gather_single, reduce_scatter_single


class BackendCollectives:
    """The process group's own collectives over the flattened (world) group.

    On gloo, ``reduce_scatter_single`` is an all-reduce plus a local copy; it is measured as the
    backend provides it.
    """

    name = BACKEND_FLAT

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        all_gather_single(output, input)

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor,
                       op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
        reduce_scatter_single(output, input, op=op)

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
        dist.all_reduce(tensor, op=op)


class FlatRingCollectives:
    """A ring over all n ranks in group-major order, built from send/recv.

    Rank r sends to r+1 and receives from r-1, so the ring enters and leaves each group once:
    one link per group boundary carries (n-1)/n of the data while the other ranks' inter-group
    links idle. This is the "traditional ring" HO-Ring is measured against.
    """

    name = FLAT_RING

    def __init__(self) -> None:
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.next, self.prev = (self.rank + 1) % self.size, (self.rank - 1) % self.size

    def _shift(self, send: torch.Tensor, recv: torch.Tensor) -> None:
        """Send ``send`` to the next rank while receiving ``recv`` from the previous one."""
        ops = [dist.P2POp(dist.isend, send, self.next), dist.P2POp(dist.irecv, recv, self.prev)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def _blocks(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        if tensor.numel() % self.size:
            raise ValueError(f"flat ring: {what} has {tensor.numel()} elements, not a multiple of "
                             f"the world size {self.size}")
        return tensor.view(self.size, -1)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        blocks = self._blocks(output, "output")
        blocks[self.rank].copy_(input.reshape(-1))
        for step in range(self.size - 1):
            self._shift(blocks[(self.rank - step) % self.size], blocks[(self.rank - step - 1) % self.size])

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor,
                       op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
        if op != dist.ReduceOp.SUM:
            raise ValueError(f"flat ring reduce_scatter supports SUM, got {op}")
        blocks = self._blocks(input, "input")
        # After step s this rank holds the partial sum of block r-s-2 over s+2 ranks; the last
        # block to arrive is its own, summed over all n.
        partial, received = blocks[(self.rank - 1) % self.size].clone(), torch.empty_like(blocks[0])
        for step in range(self.size - 1):
            self._shift(partial, received)
            received += blocks[(self.rank - step - 2) % self.size]
            partial, received = received, partial
        output.view(-1).copy_(partial)

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
        blocks = self._blocks(tensor.view(-1), "tensor")
        piece = torch.empty_like(blocks[0])
        self.reduce_scatter(piece, tensor.view(-1), op)
        self.all_gather(tensor.view(-1), piece)
