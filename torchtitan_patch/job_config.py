"""PaRO fields of torchtitan's job config (``[job] custom_config_module = "torchtitan_patch.job_config"``).

torchtitan merges these dataclasses into its own ``JobConfig``, so they are set in the TOML
under ``[parallelism]`` or on the command line (``--parallelism.paro_strategy NIG``). They are
validated when the model is parallelized, by :func:`torchtitan_patch.settings.paro_settings`.
``[debug] layout_independent_init`` switches :mod:`torchtitan_patch.init` (on by default).
"""

from dataclasses import dataclass, field

from paro_fsdp.comm.registry import DEFAULT


@dataclass
class Parallelism:
    paro_strategy: str | None = None
    """
    PaRO strategy replacing torchtitan's FSDP/HSDP/DDP wrapping: a three-letter code of N/I/G
    for parameters, gradients and optimizer states (e.g. "IIG", "NIG", "GGG"), an alias
    (ddp, zero1, zero2, zero3, fsdp, mics, hsdp), or "auto": the planner ranks all strategies
    for this model on the measured links at start-up and the fastest that fits is trained.
    Unset: stock torchtitan data parallelism. Groups are data_parallel_replicate_degree, ranks
    per group data_parallel_shard_degree.
    """

    paro_comm: str = DEFAULT
    """
    Global collectives for P=G / G=G / O=G traffic: "default" (intra and inter phases one after
    the other), "ho_ring" (hierarchical overlapping rings: the phases overlap in chunks), or
    "auto": the planner prices both, HO-Ring at depths 2, 4, 8 and 16, on the links probed at
    start-up (or paro_calibration) and runs the fastest (the shipped configs set it).
    """

    paro_ho_ring_chunks: int = 0
    """
    With paro_comm = "ho_ring": its pipeline depth, at most this many chunks (of at least 1 MiB)
    per global collective. More chunks hide more of the intra-node phase behind the inter-node
    one, and each chunk pays its own collectives' latency. 0: HO-Ring's default (16); with
    paro_comm = "auto", the planner's choice.
    """

    paro_bucket_cap_mb: float | None = None
    """
    Where parameters are not partitioned (P = N: NNN, NNI, NII, NNG, NIG, NGG), consecutive
    transformer blocks share one unit (one set of hooks and one gradient reduction, as DDP's
    buckets) until it holds at least this many MiB of parameters, and an embedding or output
    projection smaller than that stays with the root's unit. 0: a unit per block. Unset: by
    strategy, 25 MiB (DDP's bucket) for NNN on one group and a unit per block otherwise: there
    each unit's gradient reduction across groups overlaps the backward, and the parameter sync
    after the step the next forward, block by block.
    """

    paro_quant_params: str = ""
    """
    Parameters crossing groups (sync_p, the inter phase of P=G gathers) as block-quantized
    "int8" (a quarter of fp32's bytes, a half of bf16's). Lossy: the fp32 masters, optimizer
    states and checkpoints stay exact, and every replica holds the same dequantized values.
    "auto" (with paro_strategy = "auto"): int8 if the planner estimates it faster. Empty: exact.
    """

    paro_quant_grads: str = ""
    """
    Gradients crossing groups (sync_g, the inter phase of G=G reductions) as block-quantized
    "int8" or "int4", exchanged all-to-all and summed in fp32. Lossy. "auto" (with paro_strategy =
    "auto"): int8 if the planner estimates it faster. Empty: exact.
    """

    paro_quant_error_feedback: bool = False
    """
    With paro_quant_grads: each rank keeps what quantization left out of the gradients it sent
    (an fp32 residual per quantized collective, counted in the metrics' grads memory) and adds it
    to the next ones, so int4's error does not build up. Residuals are not checkpointed.
    """

    paro_quant_block_size: int = 256
    """
    With paro_quant_params or paro_quant_grads: elements per fp32 scale (an even int). Smaller
    blocks follow the values' range more closely and send more scales.
    """

    paro_calibration: str = ""
    """
    With paro_strategy or paro_comm = "auto": a link calibration written by `paro probe` (JSON) for this
    job's groups x ranks per group. Empty: every rank probes the links at start-up, and rank 0
    writes the result to <dump_folder>/paro_calibration.json for the next run to reuse.
    """

    paro_device_memory_gib: float = 0
    """
    With paro_strategy = "auto": memory per rank in GiB that a strategy must fit in. 0: the
    accelerator's total memory; on CPU, the host's memory divided by its ranks (with a warning).
    """


@dataclass
class Debug:
    layout_independent_init: bool = True
    """
    Start from the same weights whatever the parallel layout, strategy and device: each rank
    initializes the whole unsharded model on CPU from debug.seed and keeps its shard
    (torchtitan_patch.init). Costs the full model in host memory per rank while initializing.
    False: torchtitan's init_weights on the sharded model, whose values depend on the layout.
    """


@dataclass
class Checkpoint:
    paro_checksums: bool = True
    """
    After every synchronous checkpoint save, record each file's size and CRC-32 in the step
    folder's paro_manifest.json (each rank checksums the files it wrote), and verify them
    before loading it: a corrupted or truncated file stops the load with an error naming it.
    False: no manifest; loads still check that every file the checkpoint's index refers to is
    present and long enough (torchtitan_patch.checkpoint).
    """


@dataclass
class JobConfig:
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    debug: Debug = field(default_factory=Debug)
