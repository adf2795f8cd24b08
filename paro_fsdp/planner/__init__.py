"""PaRO strategy planner: estimate memory and step time of all 14 strategies, pick the best that fits.

The paper's guideline as a tool: memory from PARO.md's formulas plus transient buffers and
activations, step time from the per-phase intra / inter bytes over measured (``paro probe``)
or given link rates. ``choose_strategy`` is what ``paro_strategy = "auto"`` calls.
"""

from paro_fsdp.comm.names import AUTO, PLANNER_COMM_NAMES
from paro_fsdp.comm.registry import COMM_NAMES
from paro_fsdp.planner.calibration import (
    Calibration,
    LinkFit,
    calibration_from_dict,
    cluster_from_calibration,
    fit_ho_ring_cost,
    fit_link,
    read_calibration,
    write_calibration,
)
from paro_fsdp.planner.cost import MEMORY_KINDS, StrategyEstimate, estimate
from paro_fsdp.planner.inputs import Cluster, HORingCost, ModelSizes, TrainingSetup, compute_seconds_from_flops
from paro_fsdp.comm.ho_ring import HO_RING_DEPTHS
from paro_fsdp.planner.rank import (
    best_collectives,
    choose_strategy,
    collectives_candidates,
    pareto_front,
    plan,
)
from paro_fsdp.planner.report import describe_assumptions, format_table, plot_pareto
from paro_fsdp.planner.torchtitan_sizes import TorchtitanJob, read_torchtitan_job, sizes_from_model

__all__ = [
    "AUTO",
    "COMM_NAMES",
    "HO_RING_DEPTHS",
    "PLANNER_COMM_NAMES",
    "MEMORY_KINDS",
    "Calibration",
    "Cluster",
    "HORingCost",
    "LinkFit",
    "ModelSizes",
    "StrategyEstimate",
    "TorchtitanJob",
    "TrainingSetup",
    "best_collectives",
    "calibration_from_dict",
    "choose_strategy",
    "cluster_from_calibration",
    "collectives_candidates",
    "compute_seconds_from_flops",
    "describe_assumptions",
    "estimate",
    "fit_ho_ring_cost",
    "fit_link",
    "format_table",
    "pareto_front",
    "plan",
    "plot_pareto",
    "read_calibration",
    "read_torchtitan_job",
    "sizes_from_model",
    "write_calibration",
]
