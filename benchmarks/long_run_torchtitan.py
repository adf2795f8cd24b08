"""Long-run stability under torchtitan's own trainer: the debug config (PaRO IIG + HO-Ring) on 4 ranks.

    python -m benchmarks.long_run_torchtitan                      # 1,000 steps of IIG, then of stock HSDP
    python -m benchmarks.long_run_torchtitan --steps 300 --warmup 50 --strategies IIG

``benchmarks/long_run.py`` drives the library's loop with a small model; this runs
``python -m torchtitan_patch.train`` itself (``train_configs/llama3_debug_paro.toml``: llama3
debug model, IIG, HO-Ring, 2 groups x 2) with ``seq_len`` 64 and 2 micro-batches per step, so
the hook, metrics, clipping and dataloader paths run too; then the same with stock torchtitan
HSDP on the same layout (``paro_strategy None``), to tell what PaRO adds. Each rank records per
step the step's wall and CPU time and its resident memory, and every ``--sample-every`` steps
its live tensors (after a collection); the report compares the end of warm-up with the last
step, and gives rank 0's trajectory. Writes ``docs/long-run-torchtitan.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.collectives_report import write_generated
from benchmarks.long_run import live_tensors, rss_bytes

REPO = Path(__file__).resolve().parents[1]
CONFIG = "train_configs/llama3_debug_paro.toml"
RANKS = 4
BEGIN, END = "<!-- long-run-torchtitan:begin -->", "<!-- long-run-torchtitan:end -->"


def trainer_args(steps: int, dump: str, strategy: str) -> list[str]:
    return ["--job.config_file", CONFIG, "--job.dump_folder", dump, "--training.steps", str(steps),
            "--parallelism.paro_strategy", strategy,
            "--training.seq_len", "64", "--training.local_batch_size", "1",
            "--training.global_batch_size", str(2 * RANKS), "--lr_scheduler.warmup_steps", "10",
            "--metrics.log_freq", "100", "--metrics.no-enable-tensorboard", "--checkpoint.no-enable",
            "--activation_checkpoint.mode", "none"]


def worker(record: str, every: int, args: list[str]) -> None:
    """torchtitan's trainer, each rank appending one JSON line per step to ``record.<rank>``."""
    sys.argv = ["torchtitan_patch.train", *args]  # torchtitan reads it on import
    from torchtitan.train import Trainer

    train_step = Trainer.train_step
    out = open(f"{record}.{os.environ['RANK']}", "w")

    @functools.wraps(train_step)
    def recorded(self: Any, *a: Any, **k: Any) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        result = train_step(self, *a, **k)
        row = {"step": self.step, "seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0,
               "rss": rss_bytes()}
        if self.step == 1 or self.step % every == 0:
            gc.collect()
            row["tensors"], row["objects"] = live_tensors(), len(gc.get_objects())
        out.write(json.dumps(row) + "\n")
        out.flush()
        return result

    Trainer.train_step = recorded
    from torchtitan_patch.train import main as train_main

    train_main()


def _median(rows: list[dict[str, Any]], lo: int, hi: int, key: str) -> float:
    return statistics.median(r[key] for r in rows if lo <= r["step"] <= hi)


def report(strategy: str, ranks: list[list[dict[str, Any]]], args: argparse.Namespace, wall: float,
           load: tuple[float, float]) -> str:
    w, n = args.warmup, args.steps
    label = "stock torchtitan HSDP (`paro_strategy None`)" if strategy == "None" else f"PaRO {strategy}, HO-Ring"
    lines = [f"### {label}", "", f"{wall / 60:.1f} min; 1-minute load average {load[0]:.1f} at the start, "
             f"{load[1]:.1f} at the end.", "",
             f"| rank | RSS step {w} MiB | RSS step {n} MiB | growth MiB | live tensors step {w} "
             f"| live tensors step {n} | median step ms, steps {w + 1}-{2 * w} | median step ms, steps "
             f"{n - w + 1}-{n} | median CPU ms, steps {w + 1}-{2 * w} | median CPU ms, steps {n - w + 1}-{n} |",
             "| --- " * 10 + "|"]
    growth = []
    for rank, rows in enumerate(ranks):
        at = {r["step"]: r for r in rows}
        first, last = at[w], at[n]
        growth.append((last["rss"] - first["rss"]) / 2**20)
        lines.append(
            f"| {rank} | {first['rss'] / 2**20:.1f} | {last['rss'] / 2**20:.1f} | {growth[-1]:.1f} | "
            f"{first.get('tensors', '-')} | {last.get('tensors', '-')} | "
            + " | ".join(f"{1e3 * _median(rows, lo, hi, key):.1f}" for key in ("seconds", "cpu")
                         for lo, hi in ((w + 1, 2 * w), (n - w + 1, n))) + " |")
    lines += ["", f"Resident memory grew by at most {max(growth):.1f} MiB on any rank over the {n - w} steps "
              f"after warm-up ({1024 * max(growth) / (n - w):.1f} KiB per step).", "",
              f"Rank 0 every {w} steps (RSS, live tensors and all objects gc tracks at that step, "
              f"median wall time of the {w} steps up to it):",
              "", "| step | RSS MiB | live tensors | objects gc tracks | median step ms |",
              "| --- | --- | --- | --- | --- |"]
    at = {r["step"]: r for r in ranks[0]}
    for step in range(w, n + 1, w):
        lines.append(f"| {step} | {at[step]['rss'] / 2**20:.1f} | {at[step].get('tensors', '-')} | "
                     f"{at[step].get('objects', '-')} | "
                     f"{1e3 * _median(ranks[0], step - w + 1, step, 'seconds'):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1], int(argv[2]), argv[4:] if argv[3:4] == ["--"] else argv[3:])
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.long_run_torchtitan", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--sample-every", type=int, default=50, help="steps between live-tensor counts")
    p.add_argument("--strategies", default="IIG,None", help="paro_strategy values, comma-separated (None: stock HSDP)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "long-run-torchtitan.md")
    args = p.parse_args(argv)
    if args.steps < 2 * args.warmup or args.warmup % args.sample_every or args.steps % args.sample_every:
        p.error("--steps must be at least twice --warmup, and both multiples of --sample-every")
    sections = []
    for strategy in args.strategies.split(","):
        load, start = os.getloadavg()[0], time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="paro-long-run-") as tmp:
            record = str(Path(tmp) / "steps")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}",
                   "--local-ranks-filter=0", "--role=rank", "--tee=3", "-m", "benchmarks.long_run_torchtitan",
                   "--worker", record, str(args.sample_every), "--", *trainer_args(args.steps, tmp, strategy)]
            proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
            if proc.returncode:
                print(f"{strategy}: the training run failed (exit {proc.returncode})", file=sys.stderr)
                return proc.returncode
            ranks = [[json.loads(line) for line in Path(f"{record}.{r}").read_text().splitlines()]
                     for r in range(RANKS)]
        sections.append(report(strategy, ranks, args, time.perf_counter() - start, (load, os.getloadavg()[0])))
        print(sections[-1], flush=True)
    head = (f"Generated by `python -m benchmarks.long_run_torchtitan --steps {args.steps} --warmup {args.warmup} "
            f"--strategies {args.strategies}`: `torchrun --standalone --nproc-per-node {RANKS} -m "
            f"torchtitan_patch.train` on `{CONFIG}` (llama3 debug model, 2 groups x 2), `seq_len` 64, 2 "
            f"micro-batches per step, no checkpoints; one run after the other.")
    write_generated(args.out, "\n\n".join([BEGIN, head, *sections, END]), BEGIN, END,
                    "Long-run stability under torchtitan's trainer")
    return 0

if __name__ == "__main__":
    sys.exit(main())
