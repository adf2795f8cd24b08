"""``paro_parallelize``: wrap a model for one PaRO strategy on a 2D data-parallel mesh."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from paro_fsdp.comm.groups import SHARD_DIM, MeshGroups, per_mesh, validate_mesh
from paro_fsdp.comm.quant import InterQuant
from paro_fsdp.comm.registry import DEFAULT, check_comm, check_ho_ring_chunks, make_collectives
from paro_fsdp.engine import EngineState, Unit
from paro_fsdp.strategy import Granularity, ParoStrategy, bucket_bytes

logger = logging.getLogger("paro_fsdp")

_STATE_ATTR = "_paro_state"


class ParoModule:
    """Mixin the root module gets: FSDP2's accumulation idiom, interpreted per strategy."""

    def set_requires_gradient_sync(self, requires_gradient_sync: bool, *, recurse: bool = True) -> None:
        """Call with ``True`` before the last micro-batch's backward, ``False`` before the others.

        Gradients are then reduced across groups once per optimizer step. What is deferred
        depends on the strategy: with G=I or G=G, per-micro-step reductions inside the
        partition still run, since they are what keeps gradient memory at 1/m or 1/n.
        """
        paro_state(self).set_last_microstep(bool(requires_gradient_sync))

    def wait_parameters(self) -> None:
        """Finish the parameter updates still in flight after ``optimizer.step()`` (sync_p).

        Forward, backward, state dicts and loads do this themselves, unit by unit, just before
        they read; call it before reading parameters any other way (e.g. ``model.parameters()``).
        """
        paro_state(self).wait_params()

    def set_gradient_divide_factor(self, factor: float) -> None:
        """Divide summed gradients by ``factor`` instead of n (e.g. 1.0 when the loss is already
        normalized by the global token count, as torchtitan does)."""
        if not factor > 0:
            raise ValueError(f"gradient divide factor must be positive, got {factor!r}")
        paro_state(self).divide_factor = float(factor)


def paro_state(model: nn.Module) -> EngineState:
    """The engine state of a model wrapped by :func:`paro_parallelize`."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} was not wrapped by paro_parallelize; call "
            f"paro_parallelize(model, mesh, strategy=...) first and pass the module it returns"
        )
    return state


def _param_mesh(groups: MeshGroups, level: Granularity) -> DeviceMesh:
    """The mesh FSDP2 shards parameters over for granularity ``level``."""
    mesh = groups.mesh
    if level is Granularity.I:
        return mesh[SHARD_DIM]
    if level is Granularity.G:
        return groups.flat_mesh
    # N: a 1-rank mesh that shares the root mesh, so TP DTensors still compose. Its process
    # groups are created once per mesh, not once per call. The dim goes by index: torch 2.11's
    # _unflatten rejects every dim name it has.
    return per_mesh(mesh, "paro_none", lambda: mesh._unflatten(
        1, (mesh.size(1), 1), ("paro_shard", "paro_none"))["paro_none"])


def bucket_blocks(blocks: Sequence[nn.Module], cap_bytes: float) -> list[list[nn.Module]]:
    """``blocks`` in order, cut into runs of consecutive blocks of one class, each run closed
    once it holds at least ``cap_bytes`` of trainable parameters; ``cap_bytes`` 0: one block
    per run. A block left out of every run stays with the root's unit.

    Only blocks of one class share a run: a model's repeated layers run one after another in
    its forward, while a block of its own kind may run apart from them (an output projection
    called by a chunked loss after the forward, once per chunk), and FSDP2 reduces a unit
    whose modules' backwards come apart in pieces, which the engine's one row per unit cannot
    take. Such a block (neither neighbour of its class) holding less than ``cap_bytes`` is left
    to the root, whose unit is reduced once the whole backward is done: it would not fill a
    bucket, and a unit of its own costs hooks and collectives at every micro-step (embeddings
    and output projection of a small model).
    """
    runs: list[list[nn.Module]] = []
    held = cap_bytes
    for block in blocks:
        if held >= cap_bytes or type(block) is not type(runs[-1][0]):
            runs.append([])
            held = 0
        runs[-1].append(block)
        held += _trainable_bytes(block)
    kinds = [type(block) for block in blocks]
    to_root = {id(block) for i, block in enumerate(blocks)
               if kinds[i] not in kinds[max(i - 1, 0):i] + kinds[i + 1:i + 2] and _trainable_bytes(block) < cap_bytes}
    return [run for run in runs if id(run[0]) not in to_root]


def _trainable_bytes(block: nn.Module) -> int:
    return sum(_local(p).numel() * p.element_size() for p in block.parameters() if p.requires_grad)


def _local(p: nn.Parameter) -> torch.Tensor:
    return p._local_tensor if isinstance(p, DTensor) else p


def paro_parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    strategy: str | ParoStrategy,
    *,
    blocks: Sequence[nn.Module] | None = None,
    comm: str = DEFAULT,
    ho_ring_chunks: int | None = None,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
    sync_p_window: int | None = 2,
    quant: InterQuant | None = None,
    bucket_cap_mb: float | None = None,
) -> nn.Module:
    """Shard ``model`` for a PaRO strategy on ``mesh`` = (dp_replicate, dp_shard) = (groups, ranks per group).

    Each of ``blocks`` becomes one FSDP2 unit (gathered, reduced and synchronized together),
    then the root takes the remaining parameters, as torchtitan wraps transformer blocks. Where
    P = N nothing is gathered, so a unit is what DDP calls a bucket, the gradients reduced
    together, and consecutive blocks of one class may share one (``bucket_cap_mb``): each unit costs its own
    hooks and collectives at every micro-step.

    Args:
        model: a freshly built module, not yet wrapped by ``fully_shard``; its parameters may
            be tensor-parallel DTensors on the same root mesh.
        mesh: a 2D mesh named (dp_replicate, dp_shard).
        strategy: a :class:`ParoStrategy` or its code / alias (``"IIG"``, ``"zero3"``).
        blocks: submodules of ``model`` to wrap as their own units, in execution order.
        comm: the global collectives, one of
            :data:`~paro_fsdp.comm.registry.COMM_NAMES`: ``"default"`` (the backend's, in two
            phases) or ``"ho_ring"`` (hierarchical overlapping rings).
        ho_ring_chunks: with ``comm="ho_ring"``, its pipeline depth: each global collective is
            cut into at most this many chunks of at least 1 MiB. More chunks overlap more of the
            intra-node phase with the inter-node one; each chunk costs its own collectives.
            ``None``: 16.
        mp_policy: FSDP2's mixed precision policy.
        reshard_after_forward: passed to ``fully_shard`` (P=N units never reshard after forward:
            on their 1-rank mesh that would only copy the parameters once more in backward).
        sync_p_window: how many units' parameter updates (sync_p) are on the wire at once
            after ``optimizer.step()``; the others start, in forward order, as the next forward
            consumes the earlier ones. A bounded window keeps small collectives issued between
            the step and the next forward (a loss or token-count all-reduce) from waiting behind
            the whole update on a shared link; the link stays busy as long as it is slower
            than forward. ``None``: all at once.
        quant: what crosses the inter-group link block-quantized (:class:`InterQuant`:
            parameters as int8, gradients as int8 or int4, summed in fp32). Lossy, so off by
            default; intra-group traffic, the fp32 masters, the moments and checkpoints stay exact.
        bucket_cap_mb: where P = N, consecutive blocks of one class (a model's repeated layers)
            join one unit until it holds at least this many MiB of trainable parameters (this
            rank's, as stored), and a block with no neighbour of its class that holds less
            stays with the root (:func:`bucket_blocks`); 0 keeps one unit per block. ``None``:
            25 MiB (DDP's bucket) where P = O = N on one group, else one unit per block (each
            unit's gradient reduction across groups then overlaps the backward, its sync_p the
            next forward), see
            :func:`~paro_fsdp.strategy.bucket_bytes`. Other strategies keep one unit per block
            (it bounds what is gathered at once).

    Returns:
        ``model`` itself, whose class gains ``set_requires_gradient_sync`` and
        ``set_gradient_divide_factor`` (:class:`ParoModule`).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: the model is already parallelized, the mesh, strategy, ``comm``,
            ``ho_ring_chunks``, ``sync_p_window`` or ``bucket_cap_mb`` is invalid, or a block is not a
            submodule of ``model``.
        TypeError: ``quant`` is not an :class:`InterQuant` or ``None``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if getattr(model, _STATE_ATTR, None) is not None or any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} is already parallelized (paro_parallelize or fully_shard); "
            f"parallelize a freshly built model once"
        )
    if sync_p_window is not None and (isinstance(sync_p_window, bool) or not isinstance(sync_p_window, int)
                                      or sync_p_window < 1):
        raise ValueError(f"sync_p_window must be a positive int or None (all at once), got {sync_p_window!r}")
    if bucket_cap_mb is not None and (isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float))
                                      or not bucket_cap_mb >= 0):
        raise ValueError(f"bucket_cap_mb must be a number >= 0 (0: one unit per block) or None (by strategy), "
                         f"got {bucket_cap_mb!r}")
    if quant is not None and not isinstance(quant, InterQuant):
        raise TypeError(f"quant must be a paro_fsdp.InterQuant or None, got {type(quant).__name__}; "
                        f"e.g. InterQuant(params='int8', grads='int8')")
    mesh = validate_mesh(mesh)
    requested = ParoStrategy.parse(strategy)
    check_comm(comm)
    check_ho_ring_chunks(ho_ring_chunks, comm)
    g, m = mesh.size(0), mesh.size(1)
    effective = requested.effective_on(g, m)
    if effective != requested:
        logger.info(
            "PaRO strategy %s on %d group(s) x %d rank(s) runs as %s (I collapses to %s)",
            requested, g, m, effective, "N" if m == 1 else "G",
        )
    blocks = list(blocks or [])
    for i, block in enumerate(blocks):
        if not any(block is sub for sub in model.modules()):
            raise ValueError(f"blocks[{i}] ({type(block).__name__}) is not a submodule of the model")

    groups = MeshGroups(mesh, quant=quant if quant is not None and quant.enabled else None)
    state = EngineState(effective, requested, groups, make_collectives(comm, groups, ho_ring_chunks=ho_ring_chunks),
                        compute_dtype=mp_policy.param_dtype if mp_policy is not None else None,
                        sync_p_window=sync_p_window)
    fsdp_mesh = _param_mesh(groups, effective.param)
    # P=N units live on a 1-rank mesh, where resharding after forward only frees a copy of the
    # parameters that backward would make again at once.
    kwargs = {"mesh": fsdp_mesh, "reshard_after_forward": reshard_after_forward and effective.param is not Granularity.N}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    unit_modules = [*bucket_blocks(blocks, bucket_bytes(effective, bucket_cap_mb, groups.groups)), [model]]
    for modules in unit_modules:
        fully_shard(modules if len(modules) > 1 else modules[0], **kwargs)
    model.__class__ = type(f"Paro{type(model).__name__}", (ParoModule, type(model)), {})
    setattr(model, _STATE_ATTR, state)
    state.units = [Unit(modules, state, i) for i, modules in enumerate(unit_modules)]
    for unit in state.units:  # a state dict reads, and a load writes, what a sync_p in flight would overwrite
        for module in unit.modules:
            module.register_state_dict_pre_hook(lambda *_, u=unit: u.wait_params())
            module.register_load_state_dict_pre_hook(lambda *_, u=unit: u.prepare_load())
    state.set_last_microstep(True)
    return model
