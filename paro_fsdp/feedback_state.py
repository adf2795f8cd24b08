"""Error-feedback residuals in checkpoints: each rank's own, exact, under keys that name their layout.

With ``InterQuant(error_feedback=True)`` every rank keeps an fp32 residual per quantized gradient
exchange: what quantization left out of what the rank sent, added to what it sends next. The
residuals are training state (a run that drops them loses that error once), but unlike the
masters and moments they do not reshard: each is the error of one rank's own sends, cut into
that exchange's chunks. So a checkpoint holds every rank's residuals under keys that name the
layout they belong to (strategy, mesh, collectives and depth, format and block size) and the
rank, ``paro_feedback.<layout>.rank<r>.unit<i>.<phase>.<n>``. A run whose layout and rank match
resumes them bit for bit; any other run (a reshard, another strategy, feedback off) finds no keys
of its own and starts its residuals at zero, as a fresh run does.

Residuals are created at their first exchange, so a run about to load has none yet:
:func:`feedback_template` builds the tensors to load into from the checkpoint's saved sizes
(``torch.distributed.checkpoint`` loads into what the state dict holds).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from paro_fsdp.engine import EngineState
from paro_fsdp.parallelize import paro_state

PREFIX = "paro_feedback"
"""The first segment of every residual's key."""

_KEY = re.compile(r"unit(\d+)\.(\w+)\.(\d+)")


def layout_key(state: EngineState) -> str | None:
    """What a residual's meaning depends on, as one key segment (``None``: no error feedback).

    For example ``IIG.2x4.default.int4-b256``: strategy, groups x ranks per group, collectives
    (with HO-Ring's depth), gradient format and block size.
    """
    quant = state.groups.quant
    if quant is None or not quant.error_feedback:
        return None
    comm = state.collectives.name
    depth = getattr(state.collectives, "chunks", None)
    comm += f"-c{depth}" if depth is not None else ""
    return (f"{state.strategy.code}.{state.groups.groups}x{state.groups.group_size}.{comm}."
            f"{quant.grads}-b{quant.block_size}")


def _own_prefix(state: EngineState, prefix: str) -> str | None:
    layout = layout_key(state)
    return None if layout is None else f"{prefix}.{layout}.rank{dist.get_rank()}."


def feedback_state_dict(model: nn.Module, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """This rank's residuals (the live tensors; save them before the next step changes them).

    Args:
        model: a model wrapped by :func:`paro_fsdp.paro_parallelize`.
        prefix: the keys' first segment (one per model part where a rank holds several).

    Returns:
        ``{key: residual}``; empty without error feedback or before the first quantized exchange.
    """
    state = paro_state(model)
    own = _own_prefix(state, prefix)
    if own is None:
        return {}
    return {f"{own}unit{unit}.{phase}.{n}": residual
            for ((unit, phase), n), residual in state.groups.residuals.items()}


def feedback_template(model: nn.Module, saved: Mapping[str, Sequence[int]],
                      prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """The tensors to load this rank's residuals into, for the keys a checkpoint holds.

    Args:
        model: a model wrapped by :func:`paro_fsdp.paro_parallelize`.
        saved: the checkpoint's keys and sizes (its metadata's ``state_dict_metadata``, keys
            relative to where the residuals were saved); other keys are ignored.
        prefix: as for :func:`feedback_state_dict`.

    Returns:
        An fp32 tensor on the mesh's device per residual of this rank's layout and rank (none
        where the checkpoint was saved under another layout, rank, or without error feedback).
    """
    state = paro_state(model)
    own = _own_prefix(state, prefix)
    if own is None:
        return {}
    return {key: torch.empty(tuple(size), dtype=torch.float32, device=state.groups.device)
            for key, size in saved.items() if key.startswith(own)}


def load_feedback_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                             prefix: str = PREFIX) -> int:
    """Make this rank's residuals those of ``state_dict`` (keys of other layouts and ranks ignored).

    Residuals the state dict does not hold restart at zero, so after a load the run continues
    exactly as the one that saved (same layout) or as a fresh one (any other).

    Returns:
        How many residuals were loaded.
    """
    state = paro_state(model)
    own = _own_prefix(state, prefix)
    state.groups.residuals.clear()
    if own is None:
        return 0
    for key, value in state_dict.items():
        match = _KEY.fullmatch(key[len(own):]) if key.startswith(own) else None
        if match is not None:
            unit, phase, n = match.groups()
            local = value.to_local() if hasattr(value, "to_local") else value
            state.groups.residuals[((int(unit), phase), int(n))] = local.to(state.groups.device, torch.float32,
                                                                              copy=True)
    return len(state.groups.residuals)


__all__ = ["PREFIX", "feedback_state_dict", "feedback_template", "layout_key", "load_feedback_state_dict"]
