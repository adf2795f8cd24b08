"""The PaRO fields of a torchtitan 0.3 ``Trainer.Config``, and the view the core reads.

``ParoParallelismConfig`` is torchtitan's ``ParallelismConfig`` with the PaRO fields of
:class:`torchtitan_patch.job_config.Parallelism` (the same fields, defaults and docstrings as
the 0.2.2 TOML), so tyro offers ``--parallelism.paro_strategy IIG`` and the rest on the
command line; ``ParoDebugConfig`` and ``ParoCheckpointConfig`` add ``debug.layout_independent_init``
and ``checkpoint.paro_checksums`` the same way. Its ``spmd_backend`` defaults to ``"partial_dtensor"``, the one backend PaRO
runs under (:func:`check_spmd_backend`).

The core (:mod:`torchtitan_patch.settings`, :mod:`~torchtitan_patch.parallelize`,
:mod:`~torchtitan_patch.auto`, :mod:`~torchtitan_patch.init`) reads a job in the shape of
torchtitan 0.2.2's ``JobConfig``; :func:`job_view` presents a 0.3 config in that shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.config import ParallelismConfig
from torchtitan.config.configs import DebugConfig

from torchtitan_patch import job_config
from torchtitan_patch.settings import ParoConfigError

PARO_SPMD_BACKEND = "partial_dtensor"


@dataclass(kw_only=True, slots=True)
class ParoParallelismConfig(ParallelismConfig, job_config.Parallelism):
    spmd_backend: Literal["partial_dtensor", "full_dtensor", "spmd_types"] = PARO_SPMD_BACKEND
    """
    SPMD backend selector (torchtitan's field; its default here is "partial_dtensor", the one
    PaRO runs under: DTensor for the model-parallel axes only, data parallelism left to PaRO).
    "full_dtensor" and "spmd_types" give data parallelism to FSDP2's multi-axis storage mesh.
    """


@dataclass(kw_only=True, slots=True)
class ParoDebugConfig(DebugConfig, job_config.Debug):
    pass


@dataclass(kw_only=True, slots=True)
class ParoCheckpointConfig(CheckpointManager.Config, job_config.Checkpoint):
    pass


def check_release_fields(config: Any) -> None:
    """Refuse the 0.3 settings that cannot carry PaRO: an SPMD backend other than
    ``partial_dtensor``, and CUDA graphs (on by default on NVIDIA GPUs in 0.3).

    Called with PaRO on; :func:`torchtitan_patch.settings.paro_settings` checks the rest.
    """
    if not config.training.disable_cuda_graphs:
        raise ParoConfigError(
            "training.disable_cuda_graphs=False is not supported with parallelism.paro_strategy: a captured "
            "forward/backward replays one micro-batch's collectives, and PaRO's differ between micro-batches "
            "(the cross-group gradient sync runs after the last one only); set --training.disable_cuda_graphs"
        )
    backend = config.parallelism.spmd_backend
    if backend != PARO_SPMD_BACKEND:
        raise ParoConfigError(
            f"parallelism.spmd_backend={backend!r} cannot carry parallelism.paro_strategy: it hands data "
            f"parallelism to FSDP2's multi-axis storage mesh (fully_shard(dp_mesh_dims=...)) and types every "
            f"activation for it, where PaRO places each state on its own mesh; use "
            f"--parallelism.spmd_backend {PARO_SPMD_BACKEND} (tensor and pipeline parallelism work as usual)"
        )


def job_view(config: Any) -> SimpleNamespace:
    """``config`` (a ``ParoTrainer.Config``) in the shape of torchtitan 0.2.2's ``JobConfig``.

    Sections 0.3 keeps under the same names are passed through; the others hold what 0.3 has
    in their place (the model's name and flavor from ``model_spec``, the dump folder from
    the top level) or the value that 0.3 cannot set (no ``early_step_in_backward``, no
    ``fault_tolerance`` section).
    """
    spec = config.model_spec
    ac = config.activation_checkpoint
    mode = {"FullAC": "full", "SelectiveAC": "selective"}.get(type(ac).__qualname__.split(".")[0], "none")
    return SimpleNamespace(
        parallelism=config.parallelism,
        training=config.training,
        debug=config.debug,
        checkpoint=config.checkpoint,
        metrics=config.metrics,
        model=SimpleNamespace(name=spec.name, flavor=spec.flavor),
        activation_checkpoint=SimpleNamespace(mode=mode if ac is not None else "none"),
        job=SimpleNamespace(dump_folder=config.dump_folder),
        optimizer=SimpleNamespace(early_step_in_backward=False),
        fault_tolerance=SimpleNamespace(enable=False),
    )
