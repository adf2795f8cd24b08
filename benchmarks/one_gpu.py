"""One GPU: PaRO's engine against stock torchtitan on a 1 x 1 mesh, which is what one GPU can show.

On one rank no strategy sends anything, so the only difference from stock torchtitan is the
engine's own work: copies, casts and waits. For torchtitan 0.3's llama3 in bf16 (selective
activation checkpointing) with compile off and on, each configuration is one launch of
torchtitan's trainer on one rank: stock (torchtitan's FSDP2 on its one-rank mesh, which is also
what its DDP is on one rank), PaRO GGG and PaRO NNN, in alternating order, ``--repeats`` times.
Reported: tokens/s (median of the steps after warm-up, over the repeats), PaRO against stock
(target: at least 0.97), and from a profile of the last steps, device time per step by kind:
copies and casts, collectives and waits, the rest.

    python -m benchmarks.one_gpu                          # on a GPU: the largest flavor that fits, docs/one-gpu.md
    python -m benchmarks.one_gpu --flavor debugmodel --steps 6 --repeats 1 --out /tmp/one.md   # a quick look (CPU too)

The flavor: ``--flavor auto`` (default) takes the first of 3B, 1B and debugmodel whose stock run
fits in the device's memory. Needs torchtitan 0.3 (``bash scripts/setup.sh --stack torchtitan-0.3``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "one-gpu.md"
CONFIGS = {"stock": "None", "PaRO GGG": "GGG", "PaRO NNN": "NNN"}
FLAVORS = ("3B", "1B", "debugmodel")
WARMUP, PROFILED = 2, 2
MARK = "[one_gpu] "
COPY_OPS = ("copy", "_to_copy", "cat", "chunk_cat", "split_with_sizes_copy", "clone", "contiguous", "fill", "zero")
COMM_OPS = ("nccl", "gloo", "c10d", "all_gather", "reduce_scatter", "all_reduce", "wait", "record_stream")


def _kind(name: str) -> str:
    lowered = name.lower()
    if any(op in lowered for op in COMM_OPS):
        return "collectives and waits"
    if any(op in lowered for op in COPY_OPS):
        return "copies and casts"
    return "rest"


def run_worker(flavor: str, strategy: str, compile_model: bool, steps: int) -> None:
    """One training run on this rank; prints its tokens/s per step and the profiled device time by kind."""
    import torch
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.models.common.config_utils import decoder_vocab_size
    from torchtitan.models.llama3 import model_registry
    from torchtitan.tools.logging import init_logger

    from torchtitan_patch.cpu import accelerator_available, enable_cpu_mode
    from torchtitan_patch.v0_3.config_registry import llama3_debug_paro

    if not accelerator_available():
        enable_cpu_mode()
    init_logger()
    config = llama3_debug_paro()
    config.model_spec = model_registry(flavor)
    config.loss = ChunkedLossWrapper.Config(
        loss_fn=CrossEntropyLoss.Config(global_vocab_size=decoder_vocab_size(config.model_spec)))
    config.dump_folder = os.environ.get("ONE_GPU_DUMP", "/tmp/one_gpu")
    config.training.mixed_precision_param = "bfloat16"
    config.training.steps = steps
    config.training.seq_len = 2048 if flavor != "debugmodel" else 256
    config.training.local_batch_size = 1
    config.training.global_batch_size = 2  # 2 micro-batches per step
    config.parallelism.data_parallel_replicate_degree = config.parallelism.data_parallel_shard_degree = 1
    config.parallelism.paro_strategy = None if strategy == "None" else strategy
    config.metrics.enable_tensorboard = False
    config.compile.enable = compile_model
    config.compile.components = ["model", "loss"]
    trainer = config.build()
    data = trainer.batch_generator(trainer.dataloader)
    device = torch.device(trainer.device)
    times: list[float] = []
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    by_kind: dict[str, float] = {}
    while trainer.step < steps:
        trainer.step += 1
        profiled = trainer.step > steps - PROFILED
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if profiled:
            with torch.profiler.profile(activities=activities) as prof:
                trainer.train_step(data)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            for event in prof.key_averages():
                us = event.device_time_total if device.type == "cuda" else event.self_cpu_time_total
                by_kind[_kind(event.key)] = by_kind.get(_kind(event.key), 0.0) + us / 1e6 / PROFILED
        else:
            trainer.train_step(data)
            if device.type == "cuda":
                torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    tokens = config.training.global_batch_size * config.training.seq_len
    steady = times[WARMUP:len(times) - PROFILED] or times[WARMUP:]
    result = {"tokens_per_s": tokens / statistics.median(steady), "step_s": statistics.median(steady),
              "device_s_per_step": by_kind, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    print(MARK + json.dumps(result), flush=True)
    trainer.close()


def _launch(flavor: str, strategy: str, compile_model: bool, steps: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "benchmarks.one_gpu", "--worker", flavor, strategy, str(int(compile_model)), str(steps)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    out = proc.stdout + proc.stderr
    for line in out.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    oom = "out of memory" in out.lower()
    return {"error": "out of memory" if oom else f"exit {proc.returncode}: {out[-1500:]}"}


def _flavor(requested: str, timeout: float) -> str:
    if requested != "auto":
        return requested
    for flavor in FLAVORS:
        if "error" not in _launch(flavor, "None", False, WARMUP + PROFILED + 1, timeout):
            return flavor
    raise SystemExit("no llama3 flavor ran: see the errors above")


def report(flavor: str, results: dict[tuple[bool, str], list[dict]]) -> str:
    device = next((r["device"] for rs in results.values() for r in rs if "device" in r), "?")
    from importlib.metadata import version

    import torch

    lines = [
        "# One GPU: PaRO's engine against stock torchtitan (1 x 1 mesh)",
        "",
        (f"Generated by `python -m benchmarks.one_gpu` on {device}, torch {torch.__version__}, torchtitan "
         f"{version('torchtitan')}: llama3 {flavor}, bf16, selective activation checkpointing, "
         f"2 micro-batches per step. Tokens/s: median of the steps after {WARMUP} warm-up steps, median over the "
         "repeats; device time per step from a profile of the last steps."),
        "",
        "| compile | configuration | tokens/s | vs stock | copies and casts (s/step) | collectives and waits (s/step) | rest (s/step) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for compile_model in (False, True):
        stock = [r["tokens_per_s"] for r in results.get((compile_model, "stock"), []) if "tokens_per_s" in r]
        base = statistics.median(stock) if stock else None
        for name in CONFIGS:
            runs = results.get((compile_model, name), [])
            ok = [r for r in runs if "tokens_per_s" in r]
            if not ok:
                lines.append(f"| {'on' if compile_model else 'off'} | {name} | {runs[0].get('error', '?') if runs else '-'} | | | | |")
                continue
            value = statistics.median(r["tokens_per_s"] for r in ok)
            kinds = ok[-1]["device_s_per_step"]
            ratio = f"{value / base:.3f}x" if base else "-"
            lines.append(f"| {'on' if compile_model else 'off'} | {name} | {value:,.0f} | {ratio} | "
                         f"{kinds.get('copies and casts', 0):.4f} | {kinds.get('collectives and waits', 0):.4f} | "
                         f"{kinds.get('rest', 0):.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        flavor, strategy, compile_model, steps = argv[1:5]
        run_worker(flavor, strategy, compile_model == "1", int(steps))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.one_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--flavor", default="auto", help=f"llama3 flavor, or auto (the first of {', '.join(FLAVORS)} that fits)")
    p.add_argument("--steps", type=int, default=12, help=f"steps per launch ({WARMUP} warm-up, {PROFILED} profiled)")
    p.add_argument("--repeats", type=int, default=2, help="launches per configuration, alternating")
    p.add_argument("--timeout", type=float, default=240, help="seconds allowed per launch")
    p.add_argument("--compile", choices=("both", "off", "on"), default="both")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report")
    args = p.parse_args(argv)
    if args.steps < WARMUP + PROFILED + 1:
        raise SystemExit(f"--steps must be at least {WARMUP + PROFILED + 1}")
    from torchtitan_patch.version import adapter

    if adapter() != "v0_3":
        raise SystemExit("benchmarks.one_gpu runs on torchtitan 0.3: bash scripts/setup.sh --stack torchtitan-0.3")
    flavor = _flavor(args.flavor, args.timeout)
    modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.compile]
    results: dict[tuple[bool, str], list[dict]] = {}
    for repeat in range(args.repeats):
        for compile_model in modes:
            names = list(CONFIGS) if repeat % 2 == 0 else list(reversed(CONFIGS))
            for name in names:
                result = _launch(flavor, CONFIGS[name], compile_model, args.steps, args.timeout)
                results.setdefault((compile_model, name), []).append(result)
                print(f"{flavor} compile={'on' if compile_model else 'off'} {name}: {result}", flush=True)
    args.out.write_text(report(flavor, results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
