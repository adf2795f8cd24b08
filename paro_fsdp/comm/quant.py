"""Block-wise quantization of what crosses the inter-group link.

On slow inter-node links PaRO's step is bounded by the bytes that must cross them: the once-per-
step syncs (sync_p, sync_g) and the inter phase of its global collectives. :class:`InterQuant`
sends those as symmetric integers with one fp32 scale per block of ``block_size`` elements
(ZeRO++'s qwZ / qgZ, applied to every PaRO strategy); everything inside a group, the masters, the
moments and checkpoints stay exact.

The rules the collectives in :mod:`paro_fsdp.comm.groups` keep:

- each element is quantized once per hop, and sums are taken in fp32 after dequantization (a
  reduce-scatter is an all-to-all of quantized chunks, never a ring of requantized partial sums);
- a gathered value is the dequantized one on every rank, its owner's included, so every replica
  of a parameter holds the same bits;
- parameters are quantized from what the optimizer produced this step (the fp32 master, or its
  compute-dtype copy), never from an earlier dequantized value, so the error does not accumulate.

A quantized chunk travels as one byte buffer: the fp32 scales first (so they can be viewed in
place), then the payload (int8: one byte per element; int4: two elements per byte, offset by 8),
padded to a multiple of 4 bytes so that the chunks of a batch stay aligned.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Hashable, Iterator
from dataclasses import dataclass

import torch

INT8, INT4 = "int8", "int4"
FORMATS: tuple[str, ...] = (INT8, INT4)
"""The quantized formats, most exact first."""
_LEVELS = {INT8: 127, INT4: 7}
_BITS = {INT8: 8, INT4: 4}
_SCALE_BYTES = 4
DEFAULT_BLOCK_SIZE = 256
PARAM_PHASES = ("param_gather", "sync_p")
GRAD_PHASES = ("grad_reduce", "sync_g")


@dataclass(frozen=True)
class InterQuant:
    """What crosses the inter-group link quantized.

    Attributes:
        params: the format of parameter gathers across groups (sync_p and the inter phase of
            P = G gathers): ``"int8"``, or ``None`` for exact.
        grads: the format of gradient reductions across groups (sync_g and the inter phase of
            G = G reductions): ``"int8"``, ``"int4"``, or ``None`` for exact.
        block_size: elements per scale. Smaller blocks follow the data's range more closely
            (less error) and send more scales (4 bytes each).
        error_feedback: with ``grads``, each rank keeps what quantization left out of the
            gradients it sent (an fp32 residual the size of each quantized collective's input)
            and adds it to the next ones at the same place, so the error does not build up over
            steps (1-bit Adam's and qgZ's error compensation). Residuals are gradient state:
            ``memory_stats``' and the formulas' ``grads`` include them; checkpoints do not.
    """

    params: str | None = None
    grads: str | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    error_feedback: bool = False

    def __post_init__(self) -> None:
        check_format(self.params, "params", (INT8,))
        check_format(self.grads, "grads", FORMATS)
        check_block_size(self.block_size)
        if not isinstance(self.error_feedback, bool):
            raise ValueError(f"error_feedback={self.error_feedback!r} is invalid: True or False")
        if self.error_feedback and self.grads is None:
            raise ValueError("error_feedback=True corrects quantized gradients, but grads=None (exact): set "
                             "grads='int8' or 'int4', or leave error_feedback off")

    @property
    def enabled(self) -> bool:
        return self.params is not None or self.grads is not None

    def format_for(self, phase: str, kind: str) -> str | None:
        """The format of an inter-group collective ``kind`` (``"all_gather"``, ``"reduce_scatter"``,
        ``"all_reduce"``) issued in training phase ``phase``; ``None``: it stays exact."""
        if kind == "all_gather" and phase in PARAM_PHASES:
            return self.params
        if kind != "all_gather" and phase in GRAD_PHASES:
            return self.grads
        return None

    @property
    def label(self) -> str:
        """A short name for tables: ``p8`` int8 parameters, ``g8`` / ``g4`` int8 / int4 gradients,
        ``e`` error feedback."""
        return "".join(f"{what}{_BITS[fmt]}" for what, fmt in (("p", self.params), ("g", self.grads)) if fmt) \
            + ("e" if self.error_feedback else "")

    def bytes_per_element(self, fmt: str | None, element_bytes: int) -> float:
        """Bytes an element of ``element_bytes`` puts on the inter link in ``fmt`` (scales
        included, per-chunk padding excluded)."""
        if fmt is None:
            return float(element_bytes)
        return _BITS[fmt] / 8 + _SCALE_BYTES / self.block_size


class _Slot:
    """Where gradient collectives are issued from (one per unit and phase); its quantized
    exchanges are numbered in issue order, the same at every step."""

    __slots__ = ("key", "issued")

    def __init__(self, key: Hashable) -> None:
        self.key, self.issued = key, 0

    def next_key(self) -> tuple[Hashable, int]:
        self.issued += 1
        return self.key, self.issued - 1


_slot: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar("paro_quant_slot", default=None)


@contextlib.contextmanager
def feedback_slot(key: Hashable) -> Iterator[None]:
    """Gradient collectives issued inside the block keep their error-feedback residuals under
    ``key`` (the engine uses one per unit and phase)."""
    token = _slot.set(_Slot(key))
    try:
        yield
    finally:
        _slot.reset(token)


def current_feedback_key() -> tuple[Hashable, int] | None:
    """The residual key of the next quantized gradient exchange, or ``None`` outside a slot."""
    slot = _slot.get()
    return None if slot is None else slot.next_key()


def check_format(value: object, field: str, valid: tuple[str, ...]) -> str | None:
    """``value`` if it is ``None`` or one of ``valid``; otherwise a ValueError naming ``field``."""
    if value is not None and value not in valid:
        raise ValueError(f"{field}={value!r} is invalid; valid values: {', '.join(valid)}, or None (exact)")
    return value


def check_block_size(value: object, field: str = "block_size") -> int:
    """``value`` if it is an even int in [2, 2**20]; otherwise a ValueError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 1 << 20 or value % 2:
        raise ValueError(f"{field}={value!r} is invalid: elements per quantization scale, an even int "
                         f"from 2 to {1 << 20} (default {DEFAULT_BLOCK_SIZE})")
    return value


def packed_bytes(numel: int, fmt: str, block_size: int) -> int:
    """Bytes of one quantized chunk of ``numel`` elements (scales, payload, alignment)."""
    blocks = -(-numel // block_size)
    payload = -(-numel * _BITS[fmt] // 8)
    return -(-(blocks * _SCALE_BYTES + payload) // 4) * 4


def quantize(rows: torch.Tensor, fmt: str, block_size: int) -> torch.Tensor:
    """Quantize each row of ``rows`` (k, S), any float dtype, into a (k, ``packed_bytes(S)``) uint8 buffer.

    A block's scale is its largest magnitude over the format's largest level; an all-zero block
    gets scale 1, and a block holding inf or nan gets a non-finite scale, so that a non-finite
    gradient stays non-finite after dequantization (an overflow check still sees it). Only the
    sender quantizes; every receiver decodes the same bytes, so replicas agree whatever device
    or rounding the quantization itself used.
    """
    k, numel = rows.shape
    levels, blocks = _LEVELS[fmt], -(-numel // block_size)
    x = rows.float()
    if blocks * block_size != numel:
        x = torch.nn.functional.pad(x, (0, blocks * block_size - numel))
    x = x.view(k, blocks, block_size)
    absmax = x.abs().amax(dim=2)
    scale = torch.where(absmax == 0, torch.ones_like(absmax), absmax / levels)
    q = torch.mul(x, scale.reciprocal().unsqueeze(2)).round_().clamp_(-levels, levels).view(k, -1)[:, :numel]
    payload = -(-numel * _BITS[fmt] // 8)
    out = torch.empty(k, packed_bytes(numel, fmt, block_size), dtype=torch.uint8, device=rows.device)
    head = blocks * _SCALE_BYTES
    out[:, :head] = scale.view(torch.uint8)
    if fmt == INT8:
        out[:, head : head + numel].view(torch.int8).copy_(q)
    else:
        u = q.to(torch.int8).add_(8).view(torch.uint8)
        if numel % 2:
            u = torch.nn.functional.pad(u, (0, 1), value=8)
        torch.bitwise_or(u[:, 0::2], u[:, 1::2] << 4, out=out[:, head : head + payload])
    out[:, head + payload :] = 0
    return out


def dequantize(packed: torch.Tensor, numel: int, fmt: str, block_size: int) -> torch.Tensor:
    """The (k, ``numel``) fp32 values that :func:`quantize` packed into ``packed`` (k, bytes)."""
    k = packed.shape[0]
    blocks = -(-numel // block_size)
    head = blocks * _SCALE_BYTES
    scale = packed[:, :head].contiguous().view(torch.float32)
    values = torch.empty(k, blocks * block_size, dtype=torch.float32, device=packed.device)
    if fmt == INT8:
        values[:, :numel] = packed[:, head : head + numel].view(torch.int8)
    else:
        u = packed[:, head : head + (numel + 1) // 2]
        pairs = values[:, : 2 * u.shape[1]].view(k, -1, 2)  # fits: blocks are even, so an odd count is padded
        pairs[:, :, 0] = u & 15
        pairs[:, :, 1] = u >> 4
        pairs.sub_(8)
    values[:, numel:] = 0
    return values.view(k, blocks, block_size).mul_(scale.unsqueeze(2)).view(k, -1)[:, :numel]
