"""The sharding engine: how gradients and parameters move between granularities.

FSDP2 owns the parameters at granularity P (``fully_shard`` over a 1-rank mesh for N, the
``dp_shard`` mesh for I, the flattened mesh for G) and gathers them every micro-step. Every
gradient FSDP2 reduces passes through :meth:`Unit.on_reduced` (its all-reduce hook, with
FSDP's own division disabled). There the engine reduces it further to G (once per
micro-step), accumulates it in fp32, and after the last micro-step reduces it to the
optimizer's granularity O (``sync_g``, overlapped with the rest of backward). After the
optimizer step, :meth:`Unit.sync_params` brings the updated O slices back to P (``sync_p``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

from paro_fsdp.comm.groups import MeshGroups
from paro_fsdp.comm.stats import INTER, INTRA, CommStats, phase
from paro_fsdp.layout import ParamRegion, RowLayout
from paro_fsdp.strategy import Granularity, ParoStrategy

N, I, G = Granularity.N, Granularity.I, Granularity.G


class Collectives(Protocol):
    """Global collectives over the 2D mesh with flat (group-major) semantics."""

    groups: MeshGroups
    name: str

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None: ...
    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor,
                       op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None: ...
    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None: ...


@dataclass
class EngineState:
    """Everything ``paro_parallelize`` attaches to the root module."""

    strategy: ParoStrategy  # what runs (degenerate meshes collapse I)
    requested: ParoStrategy  # what the user asked for
    groups: MeshGroups
    collectives: Collectives
    units: list["Unit"] = field(default_factory=list)
    last_microstep: bool = True
    optimizer: object | None = None
    divide_factor: float | None = None  # None: the mean over all n ranks

    @property
    def stats(self) -> CommStats:
        return self.groups.stats

    def set_last_microstep(self, last: bool) -> None:
        """Record whether the next backward ends the accumulation window.

        FSDP2 defers its own reduction only where the strategy keeps full gradients (G=N);
        for G=I/G the per-micro-step reduction is the point of the strategy.
        """
        self.last_microstep = last
        for unit in self.units:
            FSDPModule.set_requires_gradient_sync(
                unit.module, last or self.strategy.grad is not N, recurse=False
            )

    def grads_ready(self) -> bool:
        return all(u.optim_grad is not None for u in self.units if u.layout.regions)


class Unit:
    """One FSDP2 module's trainable parameters and their gradient / optimizer slices."""

    def __init__(self, module: FSDPModule, state: EngineState) -> None:
        self.module = module
        self.state = state
        s = state.strategy
        group = module._get_fsdp_state()._fsdp_param_group
        regions, offset = [], 0
        for fsdp_param in group.fsdp_params if group is not None else []:
            if not fsdp_param.sharded_param.requires_grad:
                continue
            local = fsdp_param.sharded_param._local_tensor
            regions.append(ParamRegion(fsdp_param.sharded_param, offset, local.numel()))
            offset += fsdp_param.padded_sharded_param_size.numel()
        self.layout = RowLayout(regions, offset, s.param, state.groups)
        self.grad_accum: torch.Tensor | None = None  # fp32, at granularity max(P, G)
        self.optim_grad: torch.Tensor | None = None  # fp32, averaged, at granularity O
        self.partial_intra: torch.Tensor | None = None  # GIG only: intra-reduced sums
        if group is not None:  # frozen units are gathered too: hierarchically, and counted
            module.set_custom_all_gather(_UnitAllGather(self))
        if regions:
            module.set_force_sum_reduction_for_comms(True)  # the engine divides once, by n
            module.set_all_reduce_hook(self.on_reduced)
            module.set_custom_reduce_scatter(_UnitReduceScatter(self))
            for region in regions:
                region.param.register_post_accumulate_grad_hook(_drop_grad)

    # Reductions between granularities. Data is the compact buffer of the owned chunks.

    def _scatter(self, x: torch.Tensor, src: Granularity, dst: Granularity) -> torch.Tensor:
        """Reduce-scatter from granularity ``src`` to the finer ``dst``."""
        if dst == src:
            return x
        groups, chunk = self.state.groups, self.layout.chunk
        out = x.new_empty(self.layout.compact_numel(dst))
        if src is N and dst is I:
            g, m = groups.groups, groups.group_size
            by_local = x.view(g, m, chunk).transpose(0, 1).contiguous()
            groups.reduce_scatter(out, by_local.view(-1), INTRA)
        elif src is N:
            self.state.collectives.reduce_scatter(out, x)
        else:
            groups.reduce_scatter(out, x, INTER)
        return out

    def _complete(self, x: torch.Tensor, level: Granularity) -> None:
        """Sum over the ranks that hold copies of the same chunks at ``level``."""
        if level is N:
            self.state.collectives.all_reduce(x)
        elif level is I:
            self.state.groups.all_reduce(x, INTER)

    def gather(self, x: torch.Tensor, src: Granularity, dst: Granularity) -> torch.Tensor:
        """All-gather from granularity ``src`` to the coarser ``dst``."""
        if dst == src:
            return x
        groups, chunk = self.state.groups, self.layout.chunk
        out = x.new_empty(self.layout.compact_numel(dst))
        if src is I:  # I -> N with P=N: columns of all local ranks, back to rank order
            g, m = groups.groups, groups.group_size
            by_local = x.new_empty(m * g * chunk)
            groups.all_gather(by_local, x, INTRA)
            out.view(g, m, chunk).copy_(by_local.view(m, g, chunk).transpose(0, 1))
        elif dst is N:
            self.state.collectives.all_gather(out, x)
        else:
            groups.all_gather(out, x, INTER)
        return out

    # Gradient path.

    def fsdp_reduce_phase(self) -> str:
        """FSDP's own reduction is once per step (sync_g) when the strategy keeps full gradients."""
        s = self.state.strategy
        return "sync_g" if s.grad < s.param else "grad_reduce"

    def on_reduced(self, reduce_output: torch.Tensor) -> None:
        """FSDP2's hook: ``reduce_output`` is this rank's row, summed over P's ranks."""
        s, last = self.state.strategy, self.state.last_microstep
        if s.grad < s.param and not last:
            return  # accumulation happens upstream of this hook (FSDP or the GIG reduce-scatter)
        x = self.layout.pad(reduce_output)
        level = max(s.param, s.grad)
        with phase("grad_reduce"):
            x = self._scatter(x, s.param, level)
        if self.grad_accum is None:
            self.grad_accum = x.float() if x.dtype != torch.float32 else x.clone()
        else:
            self.grad_accum += x
        if not last:
            return
        x, self.grad_accum = self.grad_accum, None
        with phase("sync_g"):
            x = self._scatter(x, level, s.optim)
            self._complete(x, s.optim)
        x.div_(self.state.divide_factor or self.state.groups.world)
        if self.optim_grad is None:
            self.optim_grad = x
        else:  # several synchronized backwards before one step: gradients add up, as in DDP
            self.optim_grad += x

    def zero_grad(self) -> None:
        self.grad_accum = self.optim_grad = self.partial_intra = None

    # Parameter path.

    def sync_params(self, compact: torch.Tensor) -> None:
        """Write the O-granularity parameter slices (``compact``) back to every P copy."""
        s = self.state.strategy
        with phase("sync_p"):
            row = self.gather(compact, s.optim, s.param)
        self.write_row(row)

    def write_row(self, row: torch.Tensor) -> None:
        for region in self.layout.regions:
            region.local_flat().copy_(row[region.offset : region.offset + region.numel])

    def grad_bytes(self) -> int:
        """Bytes of gradient state this unit keeps between micro-steps."""
        held = [t for t in (self.grad_accum, self.partial_intra, self.optim_grad) if t is not None]
        fsdp = self.module._get_fsdp_state()._fsdp_param_group
        for p in fsdp.fsdp_params if fsdp is not None else []:
            if p.unsharded_accumulated_grad is not None:
                held.append(p.unsharded_accumulated_grad)
            elif p.sharded_param.requires_grad and getattr(p, "_unsharded_param", None) is not None \
                    and p._unsharded_param.grad is not None:
                held.append(p._unsharded_param.grad)
        return sum(t.numel() * t.element_size() for t in held)


def _drop_grad(param: torch.Tensor) -> None:
    """The engine keeps gradients in its own buffers; FSDP's per-parameter copy is dropped."""
    param.grad = None


class _UnitAllGather(AllGather):
    """FSDP2 parameter all-gather at P: intra-group for I, hierarchical global for G."""

    def __init__(self, unit: Unit) -> None:
        self.unit = unit

    def allocate(self, size, *, dtype, device):  # noqa: ANN001 - FSDP2's Comm signature
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op=False):  # noqa: ANN001
        state = self.unit.state
        with phase("param_gather"):
            if state.strategy.param is G:
                state.collectives.all_gather(output_tensor, input_tensor)
            else:  # I (N runs on a 1-rank group, where this is a local copy)
                if group.size() > 1:
                    state.groups.all_gather(output_tensor, input_tensor, INTRA)
        return None


class _UnitReduceScatter(ReduceScatter):
    """FSDP2 gradient reduce-scatter at P, byte-optimal on every backend.

    For GIG (P=G, G=I) it keeps intra-group sums between micro-steps and crosses groups only
    after the last one, writing zeros (ignored by the hook) before that.
    """

    def __init__(self, unit: Unit) -> None:
        self.unit = unit

    def allocate(self, size, *, dtype, device):  # noqa: ANN001
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):  # noqa: ANN001
        unit, state = self.unit, self.unit.state
        if op != dist.ReduceOp.SUM:
            raise RuntimeError(f"PaRO units reduce with SUM and divide once; FSDP asked for {op}")
        s, groups = state.strategy, state.groups
        if s.param is I:
            with phase(unit.fsdp_reduce_phase()):
                groups.reduce_scatter(output_tensor, input_tensor, INTRA)
        elif s.grad is not I:
            with phase(unit.fsdp_reduce_phase()):
                state.collectives.reduce_scatter(output_tensor, input_tensor)
        else:
            g, m, chunk = groups.groups, groups.group_size, output_tensor.numel()
            by_local = input_tensor.view(g, m, chunk).transpose(0, 1).contiguous()
            column = input_tensor.new_empty(g * chunk)
            with phase("grad_reduce"):
                groups.reduce_scatter(column, by_local.view(-1), INTRA)
            if unit.partial_intra is None:
                unit.partial_intra = column.float()
            else:
                unit.partial_intra += column
            if not state.last_microstep:
                output_tensor.zero_()
                return None
            column, unit.partial_intra = unit.partial_intra, None
            reduced = column.new_empty(chunk)
            with phase("sync_g"):
                groups.reduce_scatter(reduced, column, INTER)
            output_tensor.copy_(reduced)
        return None
