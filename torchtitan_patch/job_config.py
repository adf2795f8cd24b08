"""PaRO fields of torchtitan's job config (``[job] custom_config_module = "torchtitan_patch.job_config"``).

torchtitan merges these dataclasses into its own ``JobConfig``, so they are set in the TOML
under ``[parallelism]`` or on the command line (``--parallelism.paro_strategy NIG``). They are
validated when the model is parallelized, by :func:`torchtitan_patch.settings.paro_settings`.
"""

from dataclasses import dataclass, field


@dataclass
class Parallelism:
    paro_strategy: str | None = None
    """
    PaRO strategy replacing torchtitan's FSDP/HSDP/DDP wrapping: a three-letter code of N/I/G
    for parameters, gradients and optimizer states (e.g. "IIG", "NIG", "GGG") or an alias
    (ddp, zero1, zero2, zero3, fsdp, mics, hsdp). Unset: stock torchtitan data parallelism.
    Groups are data_parallel_replicate_degree, ranks per group data_parallel_shard_degree.
    """

    paro_comm: str = "default"
    """
    Global collectives for P=G / G=G / O=G traffic: "default" (intra and inter phases one after
    the other) or "ho_ring" (hierarchical overlapping rings: the phases overlap in chunks).
    """


@dataclass
class JobConfig:
    parallelism: Parallelism = field(default_factory=Parallelism)
