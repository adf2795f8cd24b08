"""CPU mode for torchtitan 0.3 (:mod:`torchtitan_patch.cpu`), plus an attention kernel CPUs can train.

Beyond the shared shims (device type and module; shim 3, applied by
:class:`~torchtitan_patch.v0_3.trainer.ParoTrainer` to the model's parallelize function),
0.3 needs one more: its language models attend only through FlexAttention or varlen
attention ("sdpa is no longer supported"), and FlexAttention has no CPU backward. In CPU mode
:func:`cpu_flex_attention` takes the place of the compiled FlexAttention call: the same mask
(the ``BlockMask``'s own ``mask_mod``, evaluated to a dense boolean mask) through
``scaled_dot_product_attention``, whose CPU kernels have a backward. Same inputs, same mask,
same result up to the order of sums; O(L^2) memory per head, which is what a CPU run can afford.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_mask

from torchtitan_patch.cpu import point_torchtitan_at_cpu


def cpu_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, score_mod: object,
                       block_mask: BlockMask, scale: float | None, enable_gqa: bool, return_aux: object,
                       kernel_options: dict) -> tuple[torch.Tensor, None]:
    """``FlexAttention.compiled_flex_attn`` for CPU: ``block_mask``'s mask as a dense mask for SDPA.

    Raises:
        NotImplementedError: a score modification or the log-sum-exp is asked for (no torchtitan
            0.3 dense llama3 / qwen3 model does).
    """
    if score_mod is not None or getattr(return_aux, "lse", False):
        raise NotImplementedError("CPU mode's attention supports FlexAttention with a mask only (no score_mod, no lse)")
    batch, _, q_len, kv_len = block_mask.shape
    mask = create_mask(block_mask.mask_mod, batch, 1, q_len, kv_len, device=q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
    return out, None


def apply() -> None:
    """Apply the shims (once, through :func:`torchtitan_patch.cpu.enable_cpu_mode`)."""
    import torchtitan.trainer  # noqa: F401  (loads the modules that copy device_* at import)
    from torchtitan.models.common.attention import FlexAttention

    point_torchtitan_at_cpu()
    FlexAttention.compiled_flex_attn = staticmethod(cpu_flex_attention)

