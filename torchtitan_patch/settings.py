"""Validation of the PaRO fields of a torchtitan job config, with errors that name field and value."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from paro_fsdp.comm.registry import DEFAULT, check_comm
from paro_fsdp.strategy import ParoStrategy

SUPPORTED_MODELS = ("llama3", "qwen3")


class ParoConfigError(ValueError):
    """A PaRO setting of the job config is invalid; the message says which and what is valid."""


@dataclass(frozen=True)
class ParoSettings:
    """The validated PaRO settings of a job: strategy and collectives on a g x m data-parallel mesh.

    With ``paro_strategy = "auto"``, ``auto`` is true and ``strategy`` is ``None`` until the
    planner has chosen one (:func:`torchtitan_patch.auto.choose_auto_strategy`); then
    :meth:`with_strategy` gives the settings the model is wrapped with.
    """

    strategy: ParoStrategy | None
    comm: str
    groups: int  # data_parallel_replicate_degree: g
    group_size: int  # data_parallel_shard_degree: m
    auto: bool = False
    calibration: str = ""  # "auto": a `paro probe` file; empty: probe at start-up
    device_memory_gib: float = 0.0  # "auto": memory per rank; 0: ask the device

    def with_strategy(self, strategy: ParoStrategy) -> ParoSettings:
        return replace(self, strategy=strategy)

    def describe(self) -> str:
        if self.strategy is None:
            name = "auto"
        else:
            name = f"{self.strategy}" + (" (chosen by paro_strategy='auto')" if self.auto else "")
        return f"PaRO {name} ({self.comm}) on {self.groups} group(s) x {self.group_size} rank(s)"


def _strategy(value: Any) -> ParoStrategy | None:
    """The parsed strategy, or ``None`` for "auto"."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
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


def paro_settings(job_config: Any, world_size: int) -> ParoSettings | None:
    """The job's PaRO settings, or ``None`` when ``parallelism.paro_strategy`` is unset (stock torchtitan).

    Raises :class:`ParoConfigError` on any invalid PaRO field or on a parallel layout PaRO
    cannot run: degrees that do not multiply to ``world_size``, context or expert parallelism,
    a model other than the supported dense ones.
    """
    par = job_config.parallelism
    value = getattr(par, "paro_strategy", None)
    if value is None or (isinstance(value, str) and value.strip() in ("", "none", "None")):
        return None
    strategy = _strategy(value)
    calibration, device_memory_gib = _auto_fields(par)
    comm = getattr(par, "paro_comm", DEFAULT)
    try:
        check_comm(comm, field="parallelism.paro_comm")
    except ValueError as e:
        raise ParoConfigError(str(e)) from None
    model = job_config.model.name
    if model not in SUPPORTED_MODELS:
        raise ParoConfigError(
            f"model.name={model!r} is not supported with parallelism.paro_strategy; PaRO supports "
            f"{', '.join(SUPPORTED_MODELS)} (dense flavors)"
        )
    for name in ("context_parallel_degree", "expert_parallel_degree"):
        if getattr(par, name) != 1:
            raise ParoConfigError(
                f"parallelism.{name}={getattr(par, name)} is not supported with parallelism.paro_strategy; "
                f"set it to 1 (PaRO composes with tensor and pipeline parallelism)"
            )
    g = par.data_parallel_replicate_degree
    if not isinstance(g, int) or g < 1:
        raise ParoConfigError(
            f"parallelism.data_parallel_replicate_degree={g!r} is invalid; it is the number of groups "
            f"(e.g. nodes) and must be an integer >= 1"
        )
    others = g * par.tensor_parallel_degree * par.pipeline_parallel_degree
    m = par.data_parallel_shard_degree
    if m == -1:
        if world_size % others:
            raise ParoConfigError(
                f"world size {world_size} is not divisible by data_parallel_replicate_degree ({g}) x "
                f"tensor_parallel_degree ({par.tensor_parallel_degree}) x pipeline_parallel_degree "
                f"({par.pipeline_parallel_degree}) = {others}, so data_parallel_shard_degree=-1 has no value"
            )
        m = world_size // others
    if not isinstance(m, int) or m < 1:
        raise ParoConfigError(
            f"parallelism.data_parallel_shard_degree={m!r} is invalid; it is the number of ranks per group "
            f"and must be an integer >= 1, or -1 for the ranks left over"
        )
    if g * m * par.tensor_parallel_degree * par.pipeline_parallel_degree != world_size:
        raise ParoConfigError(
            f"parallelism degrees do not multiply to the world size: data_parallel_replicate_degree ({g}) x "
            f"data_parallel_shard_degree ({m}) x tensor_parallel_degree ({par.tensor_parallel_degree}) x "
            f"pipeline_parallel_degree ({par.pipeline_parallel_degree}) = "
            f"{g * m * par.tensor_parallel_degree * par.pipeline_parallel_degree}, but {world_size} ranks were "
            f"launched"
        )
    schedule = par.pipeline_parallel_schedule
    if par.pipeline_parallel_degree > 1 and ("ZeroBubble" in schedule or "DualPipe" in schedule):
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
    if strategy is None and g * m == 1:
        raise ParoConfigError(
            "parallelism.paro_strategy='auto' needs at least 2 data-parallel ranks to choose between strategies; "
            "with data_parallel_replicate_degree (1) x data_parallel_shard_degree (1) they all keep a full copy "
            "and send nothing: set a strategy code such as 'NNN'"
        )
    return ParoSettings(strategy, comm, g, m, auto=strategy is None, calibration=calibration,
                        device_memory_gib=device_memory_gib)
