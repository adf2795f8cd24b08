"""``paro_strategy = "auto"``: rank the strategies for the model being trained and train the best that fits;
``paro_comm = "auto"``: choose the global collectives and HO-Ring's depth.

The parallelize hook calls :func:`auto_strategy` after torchtitan's TP / AC / compile and
before PaRO wraps the model (once per trainer: pipeline stages after the first reuse the
choice), so the planner (:mod:`paro_fsdp.planner`) sees the real
model: its parameters (a TP shard counts locally), its blocks, the job's mixed-precision
dtypes on the wire, the micro-batches per step and a rough activation estimate. Compute time
is not modelled: strategies are ranked by communication, against the links of a ``paro probe``
file (``parallelism.paro_calibration``) or of a probe that every rank runs now on the
``(dp_replicate, dp_shard)`` mesh. Rank 0 plans and logs the assumptions and the ranking; its
choice, or its error, is broadcast, so every rank wraps the model alike (or fails alike).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims
from torchtitan.tools.logging import logger

from paro_fsdp.comm.device import broadcast_object
from paro_fsdp.comm.quant import InterQuant
from paro_fsdp.comm.registry import DEFAULT
from paro_fsdp.planner import (
    Calibration,
    ModelSizes,
    TorchtitanJob,
    TrainingSetup,
    choose_strategy,
    cluster_from_calibration,
    collectives_candidates,
    describe_assumptions,
    estimate,
    format_table,
    read_calibration,
    sizes_from_model,
    write_calibration,
)
from paro_fsdp.probe import quant_rate, run_probe
from paro_fsdp.strategy import ParoStrategy
from torchtitan_patch.models import backwards_per_step as _backwards_per_step
from torchtitan_patch.settings import ParoConfigError, ParoSettings

CALIBRATION_FILE = "paro_calibration.json"  # written under job.dump_folder after a start-up probe
ADAM_STATES = 2  # moments per parameter of Adam / AdamW, the optimizers PaRO's container builds
_GIB = 2**30

# The strategy chosen for a trainer, by id of its ParallelDims (unhashable), with a reference
# that proves the id is still that object.
@dataclass(frozen=True)
class AutoChoice:
    """What the planner chose: the strategy (``paro_strategy = "auto"``, else the job's), the
    global collectives and HO-Ring's depth (``paro_comm = "auto"``, else the job's)
    and, where ``paro_quant_*`` = "auto" allowed it, the quantization of the inter-group traffic
    (``None``: exact)."""

    strategy: ParoStrategy
    quant: InterQuant | None = None
    comm: str = DEFAULT
    ho_ring_chunks: int | None = None

    @property
    def code(self) -> str:
        return self.strategy.code

    def __str__(self) -> str:
        comm = self.comm if self.ho_ring_chunks is None else f"{self.comm} at depth {self.ho_ring_chunks}"
        return (f"{self.strategy} with {comm} collectives"
                + ("" if self.quant is None else f" and {self.quant.label} quantized traffic"))


_AUTO_CHOICES: "dict[int, tuple[weakref.ref[ParallelDims], AutoChoice]]" = {}


def device_memory_bytes(settings: ParoSettings, device_type: str) -> float:
    """Memory per rank a strategy must fit in: ``paro_device_memory_gib``, else the device's total.

    CPU ranks share the host: each gets the host's memory divided by the ranks on it, with a
    warning, since other processes and the OS use some of it.
    """
    if settings.device_memory_gib > 0:
        return settings.device_memory_gib * _GIB
    if device_type == "cpu":
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        logger.warning(
            f"PaRO auto: parallelism.paro_device_memory_gib is 0 on CPU; planning with the host's "
            f"{host / _GIB:.1f} GiB shared by {ranks} rank(s), {host / ranks / _GIB:.1f} GiB each "
            f"(set parallelism.paro_device_memory_gib to plan for another budget)"
        )
        return host / ranks
    module = torch.get_device_module(device_type)
    return float(module.get_device_properties(module.current_device()).total_memory)


def _model_dim(model: nn.Module) -> int:
    """The hidden size: in ``model_args`` on torchtitan 0.2.2, in the model's ``config`` on 0.3."""
    args = getattr(model, "model_args", None) or model.config
    return args.dim


def plan_inputs(model: nn.Module, job_config: Any, backwards_per_step: int) -> tuple[ModelSizes, TrainingSetup]:
    """The planner's model sizes and training setup for ``model`` as this job trains it."""
    training = job_config.training
    stored = next(model.parameters()).element_size()
    gather = TORCH_DTYPE_MAP[training.mixed_precision_param].itemsize
    sizes = sizes_from_model(
        model, param_bytes=stored, grad_bytes=stored, optim_bytes=ADAM_STATES * stored,
        gather_bytes=gather, reduce_bytes=TORCH_DTYPE_MAP[training.mixed_precision_reduce].itemsize,
        bucket_cap_mb=getattr(job_config.parallelism, "paro_bucket_cap_mb", None),
    )
    job = TorchtitanJob(
        name=job_config.model.name, flavor=job_config.model.flavor, model=sizes, dim=_model_dim(model),
        seq_len=training.seq_len, local_batch_size=training.local_batch_size,
        global_batch_size=training.global_batch_size, activation_checkpoint=job_config.activation_checkpoint.mode,
        activation_dtype_bytes=gather,
    )
    return sizes, TrainingSetup(accum=backwards_per_step, activation_bytes=job.activation_bytes())


def plan(model: nn.Module, settings: ParoSettings, job_config: Any, backwards_per_step: int,
         calibration: Calibration, device_memory: float) -> tuple[AutoChoice, list[str]]:
    """The planner's choice, and the lines to log: assumptions (``#``), then the ranking.

    With ``paro_strategy = "auto"``, the fastest strategy that fits; every strategy is priced
    with the quantization the job sets (with ``paro_quant_*`` = "auto", also exact, and the
    choice says which of the two is faster) and, where the collectives are the planner's to
    choose, with the fastest of them. With a strategy set, only its collectives are chosen,
    and the ranking lists it under each candidate.
    """
    if (calibration.nodes, calibration.ranks_per_node) != (settings.groups, settings.group_size):
        raise ParoConfigError(
            f"parallelism.paro_calibration={settings.calibration!r} was measured on {calibration.nodes} group(s) x "
            f"{calibration.ranks_per_node} rank(s), but this job's PaRO mesh is {settings.groups} x "
            f"{settings.group_size} (data_parallel_replicate_degree x data_parallel_shard_degree); link rates "
            f"depend on how many ranks share them: probe this layout (leave paro_calibration empty) or point it "
            f"at a matching file"
        )
    sizes, setup = plan_inputs(model, job_config, backwards_per_step)
    cluster = cluster_from_calibration(calibration, device_memory)
    if settings.quant is not None and cluster.quant_rate is None:  # a file from before paro probe measured it
        cluster = replace(cluster, quant_rate=quant_rate(torch.device(calibration.device_type or "cpu")))
    if settings.strategy is None:
        try:
            _, ranking = choose_strategy(sizes, cluster, setup, settings.comm, settings.ho_ring_chunks,
                                         settings.quant, exact=settings.quant is None or settings.quant_auto)
        except ValueError as e:
            raise ParoConfigError(f"parallelism.paro_strategy='auto': {e}") from None
    else:
        ranking = sorted((estimate(settings.strategy, sizes, cluster, setup, comm, chunks, settings.quant)
                          for comm, chunks in collectives_candidates(settings.comm, settings.ho_ring_chunks)),
                         key=lambda e: e.step_seconds)
    assumptions = describe_assumptions(sizes, cluster, setup, settings.comm, settings.ho_ring_chunks,
                                       settings.quant)
    lines = [f"# {line}" for line in assumptions]
    best = ranking[0]
    choice = AutoChoice(best.strategy, best.quant, best.comm, best.ho_ring_chunks)
    return choice, [*lines, *format_table(ranking).splitlines()]


def _calibration_on_rank0(settings: ParoSettings, probed: Calibration | None, job_config: Any) -> Calibration:
    if probed is None:
        try:
            calibration = read_calibration(settings.calibration)
        except (OSError, ValueError) as e:
            raise ParoConfigError(f"parallelism.paro_calibration: {e}") from None
        logger.info(f"PaRO auto: link rates from {settings.calibration}")
        return calibration
    folder = job_config.job.dump_folder
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, CALIBRATION_FILE)
    write_calibration(probed, path)
    logger.info(f"PaRO auto: links probed; calibration written to {path} "
                f"(reuse it with --parallelism.paro_calibration {path})")
    return probed


def _probe(mesh: DeviceMesh, chunking: bool) -> Calibration:
    """The start-up probe; its fits come from times reduced over all ranks, so all ranks agree or all raise.
    ``chunking``: time HO-Ring's chunks too (only a choice of its depth needs them)."""
    try:
        return run_probe(mesh, chunking=chunking)
    except ValueError as e:
        raise ParoConfigError(
            f"PaRO auto (paro_strategy or paro_comm = 'auto'): the start-up probe of the links failed ({e}); run "
            f"`torchrun ... -m paro_fsdp probe --sizes ...` on this layout and set parallelism.paro_calibration "
            f"to the file it writes"
        ) from None


def choose_auto_strategy(model: nn.Module, settings: ParoSettings, mesh: DeviceMesh, job_config: Any,
                         backwards_per_step: int) -> AutoChoice:
    """The strategy (and quantization) every rank trains with; collective: every rank calls it at the same point.

    Probes the links of ``mesh`` first (every rank) unless ``settings.calibration`` names a file,
    which only rank 0 reads. Raises :class:`ParoConfigError` on every rank when rank 0 cannot plan
    (a bad calibration file, an unwritable dump folder, no strategy that fits).
    """
    probed = None if settings.calibration else _probe(mesh, settings.plans_collectives)
    decision: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            calibration = _calibration_on_rank0(settings, probed, job_config)
            device_memory = device_memory_bytes(settings, mesh.device_type)
            choice, lines = plan(model, settings, job_config, backwards_per_step, calibration, device_memory)
            what = "strategies" if settings.strategy is None else f"{settings.strategy.code}'s collectives"
            logger.info(f"PaRO auto: {what} ranked for this model\n" + "\n".join(lines))
            logger.info(f"PaRO auto: chose {choice}, the fastest estimate"
                        + (" that fits in memory" if settings.strategy is None else ""))
            decision[0] = ("chosen", (choice.code, choice.quant is not None, choice.comm, choice.ho_ring_chunks))
        except (ParoConfigError, OSError, ValueError) as e:  # ValueError: the planner's input checks
            decision[0] = ("error", str(e))
    outcome, value = broadcast_object(decision[0], src=0)  # on the default group's device (NCCL: this GPU)
    if outcome == "error":
        raise ParoConfigError(value)
    code, quantized, comm, chunks = value
    return AutoChoice(ParoStrategy.parse(code), settings.quant if quantized else None, comm, chunks)


def auto_strategy(model: nn.Module, settings: ParoSettings, mesh: DeviceMesh, parallel_dims: ParallelDims,
                  job_config: Any) -> AutoChoice:
    """The strategy (and quantization) "auto" chose for this trainer, choosing it (collectively) on the first call.

    Under pipeline parallelism the first call is every rank's first stage, so rank 0 plans
    with the sizes of its first stage.

    Args:
        model: the model (stage) about to be wrapped, after TP / AC / compile.
        settings: the job's PaRO settings, with ``auto`` set.
        mesh: the ``(dp_replicate, dp_shard)`` mesh the start-up probe runs on.
        parallel_dims: the trainer's parallel dimensions; the choice is cached per object.
        job_config: torchtitan's job config.

    Returns:
        The choice, the same for every stage of one trainer.

    Raises:
        ParoConfigError: on every rank, when rank 0 cannot plan (see :func:`choose_auto_strategy`).
    """
    key = id(parallel_dims)
    cached = _AUTO_CHOICES.get(key)
    if cached is not None and cached[0]() is parallel_dims:
        return cached[1]
    strategy = choose_auto_strategy(model, settings, mesh, job_config, _backwards_per_step(job_config, parallel_dims))
    _AUTO_CHOICES[key] = (weakref.ref(parallel_dims, lambda _: _AUTO_CHOICES.pop(key, None)), strategy)
    return strategy
