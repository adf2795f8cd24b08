"""What the planner needs to know: the model, the cluster and the training setup.

All quantities are in SI base units (elements, bytes, bytes per second, seconds) so that the
cost model is plain arithmetic; the command line converts from GiB, GB/s and microseconds.
Validation lives here so every entry point (command line, torchtitan, Python) gets the same
actionable errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from paro_fsdp.comm.stats import INTRA, LINKS
from paro_fsdp.formulas import StateBytes, state_bytes
from paro_fsdp.strategy import ParoStrategy, bucket_bytes

COLLECTIVE_KINDS = ("all_gather", "reduce_scatter", "all_reduce")



def _check_positive(owner: str, name: str, value: float, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}.{name} must be a finite number {bound}, got {value!r}")


def _check_int(owner: str, name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class ModelSizes:
    """Sizes of the model states and of one FSDP unit.

    ``param_bytes`` is the master parameters' dtype and ``grad_bytes`` the accumulated
    gradients'; ``optim_bytes`` the optimizer's own bytes per trainable element (8 for AdamW's
    moments). ``gather_bytes`` and ``reduce_bytes`` are the dtypes on the wire for parameter
    all-gathers (the compute dtype) and gradient reductions, defaulting to the storage dtypes.
    Each strategy stores them as :meth:`layout` says: where the compute dtype is narrower and P
    is coarser than O, a compute-dtype copy at P and the master beside the moments at O. ``block_params`` is the
    size of the largest block (a transformer block), defaulting to ``params / blocks``; where P = N
    consecutive blocks may share a unit (``bucket_cap_mb``, :meth:`blocks_per_unit`; every block
    is counted as one kind, while ``paro_parallelize`` gives a block of another class, such as
    the embeddings, a unit of its own, or none where it is smaller than the cap: the root's).
    ``flops_per_token`` defaults to 6 per parameter (forward and backward of dense training).
    """

    params: int
    trainable: int | None = None
    blocks: int = 1
    param_bytes: int = 4
    grad_bytes: int = 4
    optim_bytes: int = 8
    gather_bytes: int | None = None
    reduce_bytes: int | None = None
    master_bytes: int = 4
    block_params: int | None = None
    flops_per_token: float | None = None
    bucket_cap_mb: float | None = None

    def __post_init__(self) -> None:
        _check_int("ModelSizes", "params", self.params)
        if self.trainable is not None:
            _check_int("ModelSizes", "trainable", self.trainable)
            if self.trainable > self.params:
                raise ValueError(
                    f"ModelSizes.trainable ({self.trainable}) must not exceed ModelSizes.params ({self.params})"
                )
        _check_int("ModelSizes", "blocks", self.blocks)
        for name in ("param_bytes", "grad_bytes", "optim_bytes", "master_bytes", "gather_bytes",
                     "reduce_bytes", "block_params"):
            value = getattr(self, name)
            if value is not None:
                _check_int("ModelSizes", name, value)
        if self.flops_per_token is not None:
            _check_positive("ModelSizes", "flops_per_token", self.flops_per_token)
        if self.bucket_cap_mb is not None:
            _check_positive("ModelSizes", "bucket_cap_mb", self.bucket_cap_mb, allow_zero=True)

    @property
    def trainable_params(self) -> int:
        return self.params if self.trainable is None else self.trainable

    @property
    def units(self) -> int:
        """FSDP units: every block, and the root module with the embeddings and the output."""
        return self.blocks + 1

    @property
    def unit_params(self) -> float:
        return self.block_params if self.block_params is not None else self.params / self.blocks

    def blocks_per_unit(self, strategy: ParoStrategy, groups: int) -> int:
        """Blocks that share one FSDP unit on ``groups`` groups, as ``paro_parallelize`` with the
        same ``bucket_cap_mb`` cuts them (:func:`~paro_fsdp.strategy.bucket_bytes` of stored parameters)."""
        cap = bucket_bytes(strategy, self.bucket_cap_mb, groups)
        if cap == 0:
            return 1
        return min(self.blocks, max(1, math.ceil(cap / (self.unit_params * self.param_bytes))))

    def units_for(self, strategy: ParoStrategy, groups: int) -> int:
        """FSDP units under ``strategy`` on ``groups`` groups: the blocks' (:meth:`blocks_per_unit`) and the root's."""
        return -(-self.blocks // self.blocks_per_unit(strategy, groups)) + 1

    def unit_params_for(self, strategy: ParoStrategy, groups: int) -> float:
        """Parameters of the largest FSDP unit under ``strategy`` on ``groups`` groups."""
        return self.unit_params * self.blocks_per_unit(strategy, groups)

    @property
    def wire_param_bytes(self) -> int:
        return self.param_bytes if self.gather_bytes is None else self.gather_bytes

    def layout(self, strategy: ParoStrategy, master_apart: bool = False) -> StateBytes:
        """Bytes per element of each state under ``strategy`` (``formulas.state_bytes``; ``master_apart``
        where sync_p crosses groups quantized)."""
        return state_bytes(strategy, compute_bytes=self.wire_param_bytes, master_bytes=self.param_bytes,
                           moment_bytes=self.optim_bytes, master_apart=master_apart)

    @property
    def wire_grad_bytes(self) -> int:
        return self.grad_bytes if self.reduce_bytes is None else self.reduce_bytes

    @property
    def training_flops_per_token(self) -> float:
        return 6.0 * self.params if self.flops_per_token is None else self.flops_per_token


@dataclass(frozen=True)
class HORingCost:
    """What an HO-Ring global collective cut into C > 1 chunks costs beyond ``max(a, b) +
    min(a, b) / C`` (a, b: its intra and inter transfer times) and the links' latencies:
    ``fixed + (C - 1) * per_chunk`` seconds. ``fixed`` is what cutting costs at all against the
    two-phase collectives (the strided chunks' copies, for one); ``per_chunk`` what each
    further chunk adds, negative where finer chunks gain more than the overlap term credits
    them with (a slow link kept busier). ``paro probe`` fits both
    (:func:`~paro_fsdp.planner.calibration.fit_ho_ring_cost`).
    """

    fixed: float
    per_chunk: float

    def __post_init__(self) -> None:
        for name in ("fixed", "per_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"HORingCost.{name} must be a finite number of seconds, got {value!r}")

    def seconds(self, chunks: int) -> float:
        """The cost beyond the overlap model of one collective cut into ``chunks``."""
        return self.fixed + (chunks - 1) * self.per_chunk if chunks > 1 else 0.0


@dataclass(frozen=True)
class Cluster:
    """``nodes`` groups of ``ranks_per_node`` ranks, with per-rank link rates.

    Bandwidths are what one rank can send while every rank sends at once (a node's NIC
    rate divided by its ranks when they share one NIC): the formulas count bytes per rank.
    ``intra_bw`` / ``inter_bw`` are the all-gather rates; ``op_bw`` optionally gives other
    collective kinds their own measured rate, ``{"reduce_scatter": {"inter": bytes/s}, ...}``
    (gloo's reduce-scatter, for one, moves its bytes at about half its all-gather rate).
    Latencies are per collective on that link (a ring's start-up and step overheads).
    ``quant_rate`` is how many elements per second a rank quantizes and dequantizes (quantized
    inter-group traffic; ``paro probe`` measures it on the device; ``None``: not known, and
    quantized traffic cannot be priced). ``ho_ring_cost`` gives, per collective kind, what a
    global collective cut into chunks costs beyond the overlap model, as ``paro probe`` fits it
    (:class:`HORingCost`); a kind without one pays each link's latency per chunk.
    """

    nodes: int
    ranks_per_node: int
    intra_bw: float
    inter_bw: float
    device_memory: float
    intra_latency: float = 0.0
    inter_latency: float = 0.0
    op_bw: dict[str, dict[str, float]] = field(default_factory=dict)
    quant_rate: float | None = None
    ho_ring_cost: dict[str, HORingCost] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_int("Cluster", "nodes", self.nodes)
        _check_int("Cluster", "ranks_per_node", self.ranks_per_node)
        for name in ("intra_bw", "inter_bw", "device_memory"):
            _check_positive("Cluster", name, getattr(self, name))
        for name in ("intra_latency", "inter_latency"):
            _check_positive("Cluster", name, getattr(self, name), allow_zero=True)
        if self.quant_rate is not None:
            _check_positive("Cluster", "quant_rate", self.quant_rate)
        for kind, rates in self.op_bw.items():
            if kind not in COLLECTIVE_KINDS or not isinstance(rates, dict) or set(rates) - set(LINKS):
                raise ValueError(f"Cluster.op_bw must map a collective kind ({', '.join(COLLECTIVE_KINDS)}) to "
                                 f"{{link: bytes/s}} with links {', '.join(LINKS)}; got {kind!r}: {rates!r}")
            for link, value in rates.items():
                _check_positive("Cluster", f"op_bw[{kind!r}][{link!r}]", value)
        for kind, cost in self.ho_ring_cost.items():
            if kind not in COLLECTIVE_KINDS or not isinstance(cost, HORingCost):
                raise ValueError(f"Cluster.ho_ring_cost must map a collective kind ({', '.join(COLLECTIVE_KINDS)}) "
                                 f"to an HORingCost; got {kind!r}: {cost!r}")

    def bandwidth(self, kind: str, link: str) -> float:
        """Per-rank rate of collective ``kind`` on ``link`` (the all-gather rate unless measured apart)."""
        base = self.intra_bw if link == INTRA else self.inter_bw
        return self.op_bw.get(kind, {}).get(link, base)

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node


@dataclass(frozen=True)
class TrainingSetup:
    """Per optimizer step: ``accum`` micro-steps; per rank: activation memory and compute time.

    ``compute_seconds`` is the forward and backward time of all ``accum`` micro-steps on one
    rank (0 ranks strategies by communication alone; see ``compute_seconds_from_flops``).
    """

    accum: int = 1
    activation_bytes: float = 0.0
    compute_seconds: float = 0.0

    def __post_init__(self) -> None:
        _check_int("TrainingSetup", "accum", self.accum)
        _check_positive("TrainingSetup", "activation_bytes", self.activation_bytes, allow_zero=True)
        _check_positive("TrainingSetup", "compute_seconds", self.compute_seconds, allow_zero=True)


def compute_seconds_from_flops(model: ModelSizes, tokens_per_micro_step: int, accum: int,
                               device_flops: float) -> float:
    """Compute time of one optimizer step on one rank at a sustained ``device_flops`` (FLOP/s)."""
    _check_int("compute", "tokens_per_micro_step", tokens_per_micro_step)
    _check_int("compute", "accum", accum)
    _check_positive("compute", "device_flops", device_flops)
    return model.training_flops_per_token * tokens_per_micro_step * accum / device_flops
