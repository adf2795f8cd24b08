"""``paro`` command line: ``paro plan`` ranks the 14 strategies, ``paro probe`` measures the links.

Units on the command line are the ones people quote: GiB of device memory, GB/s (1e9 bytes/s)
per rank of link rate, microseconds of latency. Every bad value is reported with its flag, the
value given and what is valid.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Sequence

from paro_fsdp.comm.ho_ring import DEFAULT_CHUNKS, HO_RING_DEPTHS
from paro_fsdp.comm.names import AUTO, PLANNER_COMM_NAMES
from paro_fsdp.comm.quant import DEFAULT_BLOCK_SIZE, INT8, InterQuant
from paro_fsdp.comm.quant import FORMATS as QUANT_FORMATS
from paro_fsdp.comm.registry import DEFAULT, HO_RING

GIB = 2**30
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, "expected a number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, "expected a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def count(text: str) -> int:
    """A parameter count: ``7000000000``, ``6.7e9``, ``7B``, ``350M``, ``1.5k``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a parameter count such as 7000000000, 6.7e9, 7B or 350M, "
                                         f"got {text!r}")
    value = float(match.group(1)) * _SUFFIX[match.group(2).lower()]
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite parameter count such as 7B or 6.7e9, got {text!r}")
    value = round(value)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a parameter count >= 1, got {text!r}")
    return value


TRAINABLE_BARE_MIN = 1000
"""Smallest ``--trainable`` count accepted without a suffix: below it a fraction was likely meant."""


def trainable(text: str) -> int | float:
    """A count (see ``count``) or a fraction of ``--params``: ``1/16``, ``3/1000``, ``0.003``.

    A bare number of 1 or more without a suffix is a count, and below :data:`TRAINABLE_BARE_MIN`
    it is refused as ambiguous: ``--trainable 16`` is far more often 1/16 of the model, or 16M,
    than 16 parameters. Such a small count is written with a suffix (``0.016k``).
    """
    text = text.strip()
    if "/" in text:
        num, _, den = text.partition("/")
        try:
            value = float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"expected a count or a fraction of --params like 1/16, got {text!r}") \
                from None
    else:
        try:
            value = float(text)
        except ValueError:
            return count(text)
        if value >= 1:
            if value < TRAINABLE_BARE_MIN:
                raise argparse.ArgumentTypeError(_ambiguous_trainable(text, value))
            return count(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a fraction of --params must be in (0, 1], got {text!r}")
    return value


def _ambiguous_trainable(text: str, value: float) -> str:
    k = f"{value:g}"
    fraction = f"1/{k} = {1 / value:.4g}" if value > 1 else "1/16 = 0.0625, or 1/1 for all of them"
    return (f"{text}: did you mean a fraction of --params ({fraction}) or a count with a suffix ({k}M, {k}B)? "
            f"A count without a suffix must be >= {TRAINABLE_BARE_MIN:,}; write a smaller one with a suffix "
            f"({value / 1000:g}k) if you mean exactly {k}")


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (a torchtitan config, or explicit sizes)")
    src.add_argument("--config", metavar="TOML", help="torchtitan job config: sizes from [model] name/flavor, "
                     "seq_len, batch sizes, mixed precision and activation checkpointing from [training]")
    src.add_argument("--params", type=count, help="parameter count Psi (7B, 6.7e9, ...)")
    src.add_argument("--trainable", type=trainable,
                     help="trainable parameters Psi': a count (4B, 350M; without a suffix at least "
                     f"{TRAINABLE_BARE_MIN:,}), or a fraction of --params (1/16, 3/1000, 0.0625); default all")
    src.add_argument("--blocks", type=positive_int, help="transformer blocks = FSDP units (default: n_layers "
                     "of --config, else 32)")
    src.add_argument("--param-bytes", type=positive_int,
                     help="bytes per master parameter (default 4, fp32); where the compute dtype is narrower and "
                          "P is coarser than O, P holds a compute-dtype copy and the master moves to O")
    src.add_argument("--grad-bytes", type=positive_int, help="bytes per stored gradient (default 4)")
    src.add_argument("--optim-bytes", type=positive_int, default=8,
                     help="optimizer state bytes per trainable parameter besides the master (default 8: AdamW's "
                          "moments)")
    src.add_argument("--gather-bytes", type=positive_int,
                     help="bytes per element of the compute dtype, what parameter all-gathers move (default: "
                          "--config's mixed_precision_param, else 2: bf16)")
    src.add_argument("--reduce-bytes", type=positive_int,
                     help="bytes per element of gradient reductions (default: --config's mixed_precision_reduce, "
                          "else --grad-bytes)")

    cl = p.add_argument_group("cluster (explicit, or measured by `paro probe`)")
    cl.add_argument("--calibration", metavar="JSON", help="file written by `paro probe`: shape, bandwidths and "
                    "latencies (explicit flags override it)")
    cl.add_argument("--nodes", type=positive_int, help="groups of fast-linked ranks (nodes), g")
    cl.add_argument("--ranks-per-node", type=positive_int, help="ranks per group, m")
    cl.add_argument("--intra-bw", type=positive_float, help="intra-node GB/s per rank")
    cl.add_argument("--inter-bw", type=positive_float,
                    help="inter-node GB/s per rank while all ranks send (node NIC rate / ranks sharing it)")
    cl.add_argument("--intra-latency", type=non_negative_float, help="microseconds per intra collective (default 0)")
    cl.add_argument("--inter-latency", type=non_negative_float, help="microseconds per inter collective (default 0)")
    cl.add_argument("--memory", type=positive_float, required=True, help="device memory per rank, GiB")

    tr = p.add_argument_group("training")
    tr.add_argument("--accum", type=positive_int,
                    help="micro-steps per optimizer step A (default: from --config's batch sizes, else 1)")
    tr.add_argument("--activation-memory", type=non_negative_float,
                    help="activation memory per rank, GiB (default: rough estimate from --config, else 0)")
    tr.add_argument("--step-compute-seconds", type=non_negative_float,
                    help="forward+backward seconds of one optimizer step (all micro-steps) per rank")
    tr.add_argument("--device-tflops", type=positive_float,
                    help="sustained TFLOP/s per rank: compute time = FLOPs per token x tokens / this")
    tr.add_argument("--tokens", type=positive_int, help="tokens per rank per micro-step, for --device-tflops "
                    "(default: --config's local_batch_size x seq_len)")
    tr.add_argument("--comm", choices=PLANNER_COMM_NAMES,
                    help=f"global collectives: two phases in sequence ({DEFAULT}), overlapped ({HO_RING}), or "
                         f"{AUTO}: each strategy with the fastest of both (and of HO-Ring's depths); "
                         f"default: --config's parallelism.paro_comm, else {DEFAULT}")
    tr.add_argument("--ho-ring-chunks", type=positive_int,
                    help=f"with --comm {HO_RING}: its pipeline depth, at most this many chunks per global collective "
                         f"(default: --config's parallelism.paro_ho_ring_chunks, else {DEFAULT_CHUNKS}; with --comm "
                         f"{AUTO}, the planner tries {', '.join(map(str, HO_RING_DEPTHS))})")
    q = p.add_argument_group("quantized inter-group traffic (each strategy is then ranked exact and quantized)")
    q.add_argument("--quant-params", choices=(INT8,), help="parameters crossing groups as block-quantized int8")
    q.add_argument("--quant-grads", choices=QUANT_FORMATS, help="gradients crossing groups as block-quantized int8 "
                                                                "or int4")
    q.add_argument("--quant-error-feedback", action="store_true",
                   help="with --quant-grads: keep fp32 residuals of the quantized gradients (their memory is counted)")
    q.add_argument("--quant-block-size", type=positive_int, default=DEFAULT_BLOCK_SIZE,
                   help=f"elements per fp32 scale (default {DEFAULT_BLOCK_SIZE})")
    q.add_argument("--quant-rate", type=positive_float,
                   help="M elements per second a rank quantizes and dequantizes (default: --calibration's, "
                        "which `paro probe` measures on the device)")

    p.add_argument("--plot", metavar="FILE.png", help="plot memory per rank against step time (needs matplotlib)")


def _pick(flag: object, *fallbacks: object) -> object:
    for value in (flag, *fallbacks):
        if value is not None:
            return value
    return None


def _scaled(flag: str, value: float, scale: float, unit: str, error: Callable[[str], None]) -> float:
    """``value`` given in ``unit`` in base units, or an error naming ``flag`` when that overflows."""
    scaled = value * scale
    if not math.isfinite(scaled):
        error(f"{flag} {value:g}: {value:g} {unit} is too large to compute with; give a realistic value")
    return scaled


def _plan_inputs(args: argparse.Namespace, error: Callable[[str], None]):
    """Resolve flags, the calibration file and the torchtitan config into planner inputs."""
    from paro_fsdp.planner import (Cluster, ModelSizes, TrainingSetup,  # noqa: PLC0415 (keeps --help fast)
                                   compute_seconds_from_flops, read_calibration, read_torchtitan_job)

    if (args.config is None) == (args.params is None):
        error("give the model as exactly one of --config TOML (a torchtitan job) or --params COUNT")
    cal = None
    if args.calibration:
        try:
            cal = read_calibration(args.calibration)
        except (OSError, ValueError) as e:
            error(f"--calibration: {e}")
    job = None
    if args.config:
        try:
            job = read_torchtitan_job(args.config, optim_bytes=args.optim_bytes)
        except (OSError, ValueError, ImportError) as e:
            error(f"--config: {e}")
        base = job.model
        params, blocks = base.params, _pick(args.blocks, base.blocks)
        block_params = base.block_params if args.blocks is None else None
    else:
        params, blocks, block_params = args.params, _pick(args.blocks, 32), None
        base = None
    train = args.trainable
    if isinstance(train, float):
        fraction, train = train, round(train * params)
        if train < 1:
            error(f"--trainable: {fraction:g} of the {params:,} parameters of the model is less than 1 parameter; "
                  f"give a larger fraction or a count (e.g. 100M)")
    if train is not None and train > params:
        error(f"--trainable: {train} trainable parameters exceed the {params} parameters of the model; give at "
              f"most {params}, or a fraction of the model such as 1/16")

    shape = {}
    for flag, attr, job_attr in (("--nodes", "nodes", "groups"), ("--ranks-per-node", "ranks_per_node", "group_size")):
        shape[attr] = _pick(getattr(args, attr), getattr(cal, attr, None), getattr(job, job_attr, None))
        if shape[attr] is None:
            error(f"{flag} is required (or --calibration FILE from `paro probe`, or --config with "
                  f"parallelism.data_parallel_replicate_degree / data_parallel_shard_degree)")
    rates = {}
    for flag, attr, link in (("--intra-bw", "intra_bw", "intra"), ("--inter-bw", "inter_bw", "inter")):
        measured = getattr(cal, link).bandwidth if cal else None
        given = getattr(args, attr)
        rates[attr] = _pick(None if given is None else _scaled(flag, given, 1e9, "GB/s", error), measured)
        if rates[attr] is None:
            error(f"{flag} is required (or --calibration FILE from `paro probe`)")
    latency = {}
    for attr, link in (("intra_latency", "intra"), ("inter_latency", "inter")):
        given = getattr(args, attr)
        latency[attr] = given * 1e-6 if given is not None else (getattr(cal, link).latency if cal else 0.0)

    model = ModelSizes(
        params=params, trainable=train, blocks=blocks, block_params=block_params,
        param_bytes=_pick(args.param_bytes, 4), grad_bytes=_pick(args.grad_bytes, 4), optim_bytes=args.optim_bytes,
        gather_bytes=_pick(args.gather_bytes, base.gather_bytes if base else 2),
        reduce_bytes=_pick(args.reduce_bytes, base.reduce_bytes if base else None),
        flops_per_token=base.flops_per_token if base else None,
    )
    # Measured per-kind rates hold for a link only while its rate is the calibration's.
    op_bw = {kind: {link: fit.bandwidth for link, fit in links.items() if getattr(args, f"{link}_bw") is None}
             for kind, links in (cal.ops.items() if cal else ())}
    memory = _scaled("--memory", args.memory, GIB, "GiB", error)
    quant_rate = _pick(None if args.quant_rate is None else _scaled("--quant-rate", args.quant_rate, 1e6,
                                                                     "M elements/s", error),
                       cal.quant_rate if cal and cal.quant_rate else None)
    if (args.quant_params or args.quant_grads) and quant_rate is None:
        error("--quant-params / --quant-grads need the rate a rank quantizes at: --quant-rate (M elements/s), or "
              "--calibration FILE from `paro probe`, which measures it on the device")
    try:
        cluster = Cluster(device_memory=memory, **shape, **rates, **latency, quant_rate=quant_rate,
                          op_bw={kind: links for kind, links in op_bw.items() if links})
    except ValueError as e:  # the flags are checked above: what is left comes from the calibration file
        error(f"--calibration: {e}")
    try:
        accum = _pick(args.accum, job.accum(cluster.world) if job else None, 1)
    except ValueError as e:
        error(f"--config: {e} (or give --accum)")
    if args.activation_memory is not None:
        activations = _scaled("--activation-memory", args.activation_memory, GIB, "GiB", error)
    else:
        activations = job.activation_bytes() if job else 0.0
    if args.step_compute_seconds is not None and args.device_tflops is not None:
        error("give at most one of --step-compute-seconds and --device-tflops")
    compute = args.step_compute_seconds or 0.0
    if args.device_tflops is not None:
        tokens = _pick(args.tokens, job.tokens_per_micro_step if job else None)
        if tokens is None:
            error("--device-tflops needs --tokens (tokens per rank per micro-step) or --config")
        compute = compute_seconds_from_flops(model, tokens, accum,
                                             _scaled("--device-tflops", args.device_tflops, 1e12, "TFLOP/s", error))
    comm_field = "--comm" if args.comm is not None else "parallelism.paro_comm"
    chunks_field = "--ho-ring-chunks" if args.ho_ring_chunks is not None else "parallelism.paro_ho_ring_chunks"
    args.comm = _pick(args.comm, job.comm if job else None, DEFAULT)
    args.ho_ring_chunks = _pick(args.ho_ring_chunks, job.ho_ring_chunks if job else None)
    from paro_fsdp.planner import collectives_candidates  # noqa: PLC0415

    try:
        collectives_candidates(args.comm, args.ho_ring_chunks, field=comm_field, chunks_field=chunks_field)
    except ValueError as e:
        error(str(e))
    quant = None
    if args.quant_params or args.quant_grads:
        try:
            quant = InterQuant(params=args.quant_params, grads=args.quant_grads, block_size=args.quant_block_size,
                               error_feedback=args.quant_error_feedback)
        except ValueError as e:
            error(f"--quant-*: {e}")
    setup = TrainingSetup(accum=accum, activation_bytes=activations, compute_seconds=compute)
    return model, cluster, setup, job, quant


def _run_plan(args: argparse.Namespace, error: Callable[[str], None]) -> int:
    from paro_fsdp.planner import describe_assumptions, format_table, plan, plot_pareto  # noqa: PLC0415

    model, cluster, setup, job, quant = _plan_inputs(args, error)
    ranking = plan(model, cluster, setup, args.comm, args.ho_ring_chunks, quant)
    lines = []
    if job is not None:
        lines.append(f"torchtitan: {job.name} {job.flavor} ({args.config}), seq_len {job.seq_len}, "
                     f"local batch {job.local_batch_size}, activation checkpointing {job.activation_checkpoint}")
    lines += describe_assumptions(model, cluster, setup, args.comm, args.ho_ring_chunks, quant)
    print("\n".join(f"# {line}" for line in lines))
    print(format_table(ranking))
    best = ranking[0]
    if best.fits:
        print(f"best that fits: {best.label}")
    else:
        smallest = min(ranking, key=lambda e: e.total_memory)
        print(f"nothing fits in {args.memory:g} GiB per rank; the smallest, {smallest.strategy.code}, needs "
              f"{smallest.total_memory / GIB:.3f} GiB")
    if args.plot:
        plot_pareto(ranking, args.plot, cluster.device_memory,
                    title=f"{cluster.nodes}x{cluster.ranks_per_node} ranks, comm={args.comm}")
        print(f"plot written to {args.plot}")
    return 0 if best.fits else 1


def _run_probe(args: argparse.Namespace, error: Callable[[str], None]) -> int:
    from paro_fsdp.probe import run_from_args  # noqa: PLC0415

    return run_from_args(args, error)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paro", description="PaRO strategy planner and link probe")
    sub = parser.add_subparsers(dest="command", required=True)
    plan_p = sub.add_parser("plan", help="rank the 14 PaRO strategies for a model and cluster",
                            description="Estimate memory per rank and step time of every PaRO strategy and "
                                        "rank those that fit. Exit status 1 when none fits.")
    _add_plan_args(plan_p)
    plan_p.set_defaults(handler=_run_plan, error=plan_p.error)
    probe_p = sub.add_parser("probe", help="measure intra/inter-node bandwidth and latency (under torchrun)",
                             description="Time all-gathers inside and across nodes on the 2D mesh, fit "
                                         "latency + bytes/bandwidth per link and write a calibration file. "
                                         "Run under torchrun: torchrun --nproc-per-node M ... -m paro_fsdp probe")
    from paro_fsdp.probe import add_probe_args  # noqa: PLC0415

    add_probe_args(probe_p)
    probe_p.set_defaults(handler=_run_probe, error=probe_p.error)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args, args.error)


if __name__ == "__main__":
    sys.exit(main())
