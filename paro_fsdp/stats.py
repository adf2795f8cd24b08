"""What a PaRO model costs on this rank: bytes sent and model-state memory."""

from __future__ import annotations

import torch.nn as nn

from paro_fsdp.comm.stats import CommStats
from paro_fsdp.parallelize import paro_state


def comm_stats(model: nn.Module) -> CommStats:
    """Bytes this rank has sent since the last ``reset()``, by phase and link (intra / inter)."""
    return paro_state(model).stats


def memory_stats(model: nn.Module) -> dict[str, int]:
    """Model-state bytes held on this rank now: ``{"params", "grads", "optim"}``.

    ``params`` counts the local parameter storage (FSDP's sharded parameters, frozen ones
    included), ``grads`` the gradient state kept between micro-steps (with the error-feedback
    residuals of quantized traffic, ``InterQuant.error_feedback``), ``optim`` the
    optimizer's per-element state for this rank's slices (with the fp32 masters where P holds
    a narrower copy).
    """
    state = paro_state(model)
    params = sum(p._local_tensor.numel() * p.element_size() if hasattr(p, "_local_tensor")
                 else p.numel() * p.element_size() for p in model.parameters())
    grads = sum(u.grad_bytes() for u in state.units)
    optim = state.optimizer.state_bytes() if state.optimizer is not None else 0
    return {"params": params, "grads": grads, "optim": optim}
