"""Validation of the PaRO fields of a torchtitan job config, with errors that name field and value."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from paro_fsdp.comm import quant as q
from paro_fsdp.comm.ho_ring import DEFAULT_CHUNKS, HO_RING_DEPTHS
from paro_fsdp.comm.names import AUTO, PLANNER_COMM_NAMES
from paro_fsdp.comm.registry import DEFAULT, HO_RING
from paro_fsdp.planner import collectives_candidates
from paro_fsdp.strategy import Granularity, ParoStrategy

SUPPORTED_MODELS = ("llama3", "qwen3")


class ParoConfigError(ValueError):
    """A PaRO setting of the job config is invalid; the message says which and what is valid."""


@dataclass(frozen=True)
class ParoSettings:
    """The validated PaRO settings of a job: strategy and collectives on a g x m data-parallel mesh.

    With ``paro_strategy = "auto"``, ``auto`` is true and ``strategy`` is ``None`` until the
    planner has chosen one (:func:`torchtitan_patch.auto.choose_auto_strategy`); with
    ``paro_comm = "auto"`` :attr:`plans_collectives` is true until it has chosen the collectives
    and HO-Ring's depth. :meth:`with_choice` gives the settings the model is wrapped with.
    """

    strategy: ParoStrategy | None
    comm: str
    groups: int  # data_parallel_replicate_degree: g
    group_size: int  # data_parallel_shard_degree: m
    auto: bool = False
    calibration: str = ""  # "auto": a `paro probe` file; empty: probe at start-up
    device_memory_gib: float = 0.0  # "auto": memory per rank; 0: ask the device
    ho_ring_chunks: int | None = None  # HO-Ring's pipeline depth; None: its default (or the planner's, with auto)
    quant: q.InterQuant | None = None  # what crosses groups quantized; None: all exact
    quant_auto: bool = False  # paro_quant_* = "auto": ``auto`` chooses between exact and ``quant``
    comm_chosen: bool = False  # ``comm`` / ``ho_ring_chunks`` are the planner's choice
    bucket_cap_mb: float | None = None  # P = N units' bucket cap; None: by strategy

    @property
    def plans_collectives(self) -> bool:
        """Whether the planner still has to choose the collectives and HO-Ring's depth."""
        return self.comm == AUTO

    def with_choice(self, strategy: ParoStrategy, quant: q.InterQuant | None, comm: str,
                    ho_ring_chunks: int | None) -> ParoSettings:
        """The settings the planner's choice runs: ``strategy``, the collectives where
        :attr:`plans_collectives`, and with ``quant_auto`` the quantization."""
        chosen = self.plans_collectives
        return replace(self, strategy=strategy, quant=quant if self.quant_auto else self.quant,
                       comm=comm if chosen else self.comm, ho_ring_chunks=ho_ring_chunks if chosen else self.ho_ring_chunks,
                       comm_chosen=chosen)

    def describe(self) -> str:
        if self.strategy is None:
            name = "auto"
        else:
            name = f"{self.strategy}" + (" (chosen by paro_strategy='auto')" if self.auto else "")
        if self.plans_collectives:
            comm = (f"collectives chosen by the planner: {DEFAULT} or {HO_RING} at depth "
                    f"{'/'.join(map(str, HO_RING_DEPTHS))}")
        else:
            comm = self.comm if self.ho_ring_chunks is None else f"{self.comm}, at most {self.ho_ring_chunks} chunks"
            comm += " (chosen by the planner)" if self.comm_chosen else ""
        if self.quant is not None:
            formats = [f"{what} {fmt}" for what, fmt in (("params", self.quant.params), ("grads", self.quant.grads)) if fmt]
            comm += f"; across groups {' and '.join(formats)} in blocks of {self.quant.block_size}"
            if self.quant.error_feedback:
                comm += " with error feedback"
            if self.quant_auto and self.strategy is None:
                comm += ", or exact, as auto chooses"
        if self.bucket_cap_mb is not None and (self.strategy is None or self.strategy.param is Granularity.N):
            comm += f"; P = N blocks in units of {self.bucket_cap_mb:g} MiB" if self.bucket_cap_mb else \
                "; P = N blocks in a unit each"
        return f"PaRO {name} ({comm}) on {self.groups} group(s) x {self.group_size} rank(s)"


def _valid_strategies() -> str:
    codes = ", ".join(s.code for s in ParoStrategy.all_valid())
    return f"a code of N/I/G ({codes}), an alias (ddp, zero1, zero2, zero3, fsdp, mics, hsdp) or 'auto'"


def _strategy(value: Any) -> ParoStrategy | None:
    """The parsed strategy, or ``None`` for "auto"."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    if not isinstance(value, str):
        raise ParoConfigError(
            f"parallelism.paro_strategy={value!r} is invalid: expected a string, {_valid_strategies()}"
        )
    try:
        return ParoStrategy.parse(value)
    except (ValueError, TypeError) as e:
        raise ParoConfigError(
            f"parallelism.paro_strategy={value!r} is invalid: {e}; or set 'auto' to let the planner choose"
        ) from None


def _auto_fields(par: Any) -> tuple[str, float]:
    """``paro_calibration`` and ``paro_device_memory_gib``, checked."""
    calibration = getattr(par, "paro_calibration", "")
    if not isinstance(calibration, str):
        raise ParoConfigError(
            f"parallelism.paro_calibration={calibration!r} is invalid; it is the path of a `paro probe` JSON "
            f"file, or empty to probe the links at start-up"
        )
    memory = getattr(par, "paro_device_memory_gib", 0.0)
    if isinstance(memory, bool) or not isinstance(memory, (int, float)) or not math.isfinite(memory) or memory < 0:
        raise ParoConfigError(
            f"parallelism.paro_device_memory_gib={memory!r} is invalid; it is the memory per rank in GiB, a "
            f"finite number > 0, or 0 to ask the device"
        )
    return calibration.strip(), float(memory)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What each degree counts, for the messages.
_DEGREE_MEANING = {
    "data_parallel_replicate_degree": "the number of groups (e.g. nodes)",
    "tensor_parallel_degree": "the tensor-parallel degree (1: off)",
    "pipeline_parallel_degree": "the number of pipeline stages' ranks (1: off)",
    "expert_tensor_parallel_degree": "the expert tensor-parallel degree (1: off)",
}


def _degrees(par: Any, world_size: Any) -> tuple[int, int, int, int]:
    """``(g, m, tp, pp)``: the data-parallel mesh and the degrees beside it, checked against ``world_size``.

    Checks what torchtitan's ``ParallelDims`` asserts only after the process groups exist,
    plus what PaRO cannot run: context and expert parallelism.
    """
    if not _is_int(world_size) or world_size < 1:
        raise ParoConfigError(
            f"world size {world_size!r} is invalid: launch at least 1 rank (torchrun sets WORLD_SIZE)"
        )
    for name, meaning in _DEGREE_MEANING.items():
        value = getattr(par, name, 1)
        if not _is_int(value) or value < 1:
            raise ParoConfigError(
                f"parallelism.{name}={value!r} is invalid; it is {meaning} and must be an integer >= 1"
            )
    for name in ("context_parallel_degree", "expert_parallel_degree"):
        value = getattr(par, name, 1)
        if not _is_int(value) or value != 1:
            raise ParoConfigError(
                f"parallelism.{name}={value!r} is not supported with parallelism.paro_strategy; "
                f"set it to 1 (PaRO composes with tensor and pipeline parallelism)"
            )
    m = par.data_parallel_shard_degree
    if not _is_int(m) or (m < 1 and m != -1):
        raise ParoConfigError(
            f"parallelism.data_parallel_shard_degree={m!r} is invalid; it is the number of ranks per group "
            f"and must be an integer >= 1, or -1 for the ranks left over"
        )
    g, tp, pp = par.data_parallel_replicate_degree, par.tensor_parallel_degree, par.pipeline_parallel_degree
    others = g * tp * pp
    if m == -1:
        if world_size % others:
            raise ParoConfigError(
                f"world size {world_size} is not divisible by data_parallel_replicate_degree ({g}) x "
                f"tensor_parallel_degree ({tp}) x pipeline_parallel_degree ({pp}) = {others}, so "
                f"parallelism.data_parallel_shard_degree=-1 has no value; set the degrees so that their product "
                f"is {world_size}"
            )
        m = world_size // others
    if g * m * tp * pp != world_size:
        raise ParoConfigError(
            f"parallelism degrees do not multiply to the world size: data_parallel_replicate_degree ({g}) x "
            f"data_parallel_shard_degree ({m}) x tensor_parallel_degree ({tp}) x pipeline_parallel_degree "
            f"({pp}) = {g * m * tp * pp}, but {world_size} ranks were launched; set the degrees so that their "
            f"product is {world_size} (data_parallel_shard_degree=-1 takes the ranks left over)"
        )
    return g, m, tp, pp


def _check_calibration(path: str, groups: int, group_size: int) -> None:
    """With "auto": ``paro_calibration`` is a readable ``paro probe`` file measured on this g x m layout."""
    from paro_fsdp.planner.calibration import cluster_from_calibration, read_calibration  # noqa: PLC0415

    try:
        calibration = read_calibration(path)
        cluster_from_calibration(calibration, device_memory=1.0)  # checks the rates, per collective kind too
    except (OSError, ValueError) as e:
        raise ParoConfigError(
            f"parallelism.paro_calibration={path!r} is not a usable `paro probe` file: {e}; point it at the "
            f"JSON file `paro probe` writes, or leave it empty to probe the links at start-up"
        ) from None
    if (calibration.nodes, calibration.ranks_per_node) != (groups, group_size):
        raise ParoConfigError(
            f"parallelism.paro_calibration={path!r} was measured on {calibration.nodes} group(s) x "
            f"{calibration.ranks_per_node} rank(s), but this job's PaRO mesh is {groups} x {group_size} "
            f"(data_parallel_replicate_degree x data_parallel_shard_degree); link rates depend on how many ranks "
            f"share them: probe this layout (leave paro_calibration empty) or point it at a matching file"
        )


def _comm(par: Any, g: int, m: int) -> tuple[str, int | None]:
    """``parallelism.paro_comm`` and ``paro_ho_ring_chunks`` checked together: the collectives and
    HO-Ring's depth (``None`` for 0: HO-Ring's default, or the planner's choice with ``auto``).

    Where one link is all there is (one group, or one rank per group), HO-Ring has nothing to
    overlap: ``auto`` is the two-phase collectives, with no planning.
    """
    comm = getattr(par, "paro_comm", DEFAULT)
    chunks = getattr(par, "paro_ho_ring_chunks", 0)
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 0:
        raise ParoConfigError(
            f"parallelism.paro_ho_ring_chunks={chunks!r} is invalid: HO-Ring's pipeline depth is a positive int, "
            f"or 0 for its default ({DEFAULT_CHUNKS}; with paro_comm = 'auto', the planner's choice)"
        )
    if not isinstance(comm, str):
        raise ParoConfigError(f"parallelism.paro_comm={comm!r} is invalid; valid values: {', '.join(PLANNER_COMM_NAMES)}")
    try:
        collectives_candidates(comm, chunks or None, "parallelism.paro_comm", "parallelism.paro_ho_ring_chunks")
    except ValueError as e:
        raise ParoConfigError(f"{e} (0)" if comm != AUTO else str(e)) from None
    if comm == AUTO and (g == 1 or m == 1):
        return DEFAULT, None
    return comm, chunks or None


def _quant(par: Any, auto_strategy: bool) -> tuple[q.InterQuant | None, bool]:
    """``parallelism.paro_quant_*`` as an :class:`InterQuant` (``None`` when both are empty: exact),
    and whether ``auto`` may choose between it and exact traffic (a field set to "auto", which
    stands for int8)."""
    formats, auto = {}, False
    for name, valid in (("params", (q.INT8,)), ("grads", q.FORMATS)):
        field = f"parallelism.paro_quant_{name}"
        value = getattr(par, f"paro_quant_{name}", "")
        if isinstance(value, str) and value.strip().lower() in ("", "none"):
            value = None
        elif value == "auto":
            if not auto_strategy:
                raise ParoConfigError(
                    f"{field}='auto' lets parallelism.paro_strategy='auto' choose whether to quantize, but the "
                    f"strategy is set: set {field} to {' or '.join(map(repr, valid))}, or empty for exact traffic")
            value, auto = q.INT8, True
        try:
            formats[name] = q.check_format(value, field, valid)
        except ValueError as e:
            raise ParoConfigError(f"{e} (empty), or 'auto' with paro_strategy='auto'") from None
    block = getattr(par, "paro_quant_block_size", q.DEFAULT_BLOCK_SIZE)
    try:
        q.check_block_size(block, "parallelism.paro_quant_block_size")
    except ValueError as e:
        raise ParoConfigError(str(e)) from None
    feedback = getattr(par, "paro_quant_error_feedback", False)
    if not isinstance(feedback, bool):
        raise ParoConfigError(f"parallelism.paro_quant_error_feedback={feedback!r} is invalid: true or false")
    if feedback and formats["grads"] is None:
        raise ParoConfigError("parallelism.paro_quant_error_feedback=True corrects quantized gradients, but "
                              "parallelism.paro_quant_grads is empty (exact): set it to 'int8' or 'int4', or leave "
                              "error feedback off")
    if formats["params"] is None and formats["grads"] is None:
        return None, False
    return q.InterQuant(block_size=block, error_feedback=feedback, **formats), auto


def _bucket_cap_mb(par: Any) -> float | None:
    """``parallelism.paro_bucket_cap_mb``: ``None`` (by strategy) or a finite number >= 0."""
    value = getattr(par, "paro_bucket_cap_mb", None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ParoConfigError(
            f"parallelism.paro_bucket_cap_mb={value!r} is invalid: MiB of parameters per unit where P = N, a "
            f"number >= 0 (0: a unit per transformer block), or unset (25 for NNN, a unit per block otherwise)"
        )
    return float(value)


def _check_choice(section: str, name: str, value: Any, valid: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in valid:
        raise ParoConfigError(f"{section}.{name}={value!r} is invalid; valid values: {', '.join(valid)}")


def paro_settings(job_config: Any, world_size: int) -> ParoSettings | None:
    """The job's PaRO settings, or ``None`` when ``parallelism.paro_strategy`` is unset (stock torchtitan).

    Raises :class:`ParoConfigError` on any invalid PaRO field or on a parallel layout PaRO
    cannot run: degrees that are not integers >= 1 (``data_parallel_shard_degree``: or -1) or
    that do not multiply to ``world_size``, context or expert parallelism, a model other than
    the supported dense ones, a schedule or option PaRO does not drive; with "auto", fewer than
    2 data-parallel ranks or a ``paro_calibration`` file that cannot be read or was measured on
    another g x m layout. Everything is checked from the config alone, before any process
    group exists (``torchtitan_patch.train`` calls it before rendezvous).
    """
    par = job_config.parallelism
    value = getattr(par, "paro_strategy", None)
    if value is None or (isinstance(value, str) and value.strip() in ("", "none", "None")):
        return None
    strategy = _strategy(value)
    calibration, device_memory_gib = _auto_fields(par)
    quant, quant_auto = _quant(par, strategy is None)
    model = job_config.model.name
    if model not in SUPPORTED_MODELS:
        raise ParoConfigError(
            f"model.name={model!r} is not supported with parallelism.paro_strategy; PaRO supports "
            f"{', '.join(SUPPORTED_MODELS)} (dense flavors)"
        )
    g, m, _, pp = _degrees(par, world_size)
    comm, ho_ring_chunks = _comm(par, g, m)
    schedule = str(par.pipeline_parallel_schedule)
    if pp > 1 and ("ZeroBubble" in schedule or "DualPipe" in schedule):
        raise ParoConfigError(
            f"parallelism.pipeline_parallel_schedule={schedule!r} is not supported with parallelism.paro_strategy: "
            f"it splits backward into input and weight passes; use 1F1B, GPipe, Interleaved1F1B or LoopedBFS"
        )
    if job_config.optimizer.early_step_in_backward:
        raise ParoConfigError(
            "optimizer.early_step_in_backward=True is not supported with parallelism.paro_strategy: PaRO steps "
            "the optimizer on synchronized gradient partitions after the last micro-batch"
        )
    if job_config.fault_tolerance.enable:
        raise ParoConfigError("fault_tolerance.enable=True is not supported with parallelism.paro_strategy")
    if job_config.training.enable_cpu_offload:
        raise ParoConfigError("training.enable_cpu_offload=True is not supported with parallelism.paro_strategy")
    _check_choice("parallelism", "fsdp_reshard_after_forward", par.fsdp_reshard_after_forward,
                  ("default", "always", "never"))
    from torchtitan.config import TORCH_DTYPE_MAP  # noqa: PLC0415 (torchtitan is loaded by the caller)

    for name in ("mixed_precision_param", "mixed_precision_reduce"):
        _check_choice("training", name, getattr(job_config.training, name), tuple(TORCH_DTYPE_MAP))
    if strategy is None and g * m == 1:
        raise ParoConfigError(
            "parallelism.paro_strategy='auto' needs at least 2 data-parallel ranks to choose between strategies; "
            "with data_parallel_replicate_degree (1) x data_parallel_shard_degree (1) they all keep a full copy "
            "and send nothing: set a strategy code such as 'NNN'"
        )
    if (strategy is None or comm == AUTO) and calibration:
        _check_calibration(calibration, g, m)
    return ParoSettings(strategy, comm, g, m, auto=strategy is None, calibration=calibration,
                        device_memory_gib=device_memory_gib, ho_ring_chunks=ho_ring_chunks, quant=quant,
                        quant_auto=quant_auto, bucket_cap_mb=_bucket_cap_mb(par))
