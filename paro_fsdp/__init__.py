"""PaRO (Partial Redundancy Optimizer) data parallelism on FSDP2.

Parameters, gradients and optimizer states each get a partition granularity: N (none),
I (inside the group of fast-linked ranks) or G (global). See ``ParoStrategy``.
"""

from paro_fsdp.clip import clip_grad_norm_, grad_norm
from paro_fsdp.comm.quant import InterQuant
from paro_fsdp.feedback_state import feedback_state_dict, feedback_template, load_feedback_state_dict
from paro_fsdp.optimizer import ParoOptimizer
from paro_fsdp.parallelize import paro_parallelize
from paro_fsdp.stats import comm_stats, memory_stats
from paro_fsdp.strategy import Granularity, ParoStrategy

__all__ = [
    "Granularity",
    "InterQuant",
    "ParoOptimizer",
    "ParoStrategy",
    "clip_grad_norm_",
    "comm_stats",
    "feedback_state_dict",
    "feedback_template",
    "grad_norm",
    "load_feedback_state_dict",
    "memory_stats",
    "paro_parallelize",
]
