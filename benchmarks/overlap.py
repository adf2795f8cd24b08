"""Where a step's time goes: one torchtitan run's step split into phases, at a link rate and at the floor.

    python -m benchmarks.overlap --config IIG                    # 2x4, A=4, debug model, 250mbit and 20gbit
    python -m benchmarks.overlap --config NIG --rate 1gbit --steps 10

The end-to-end benchmark gives the ratio of a run's step time to its compute floor (the same
run with every link at 20gbit); this says which part of the step the difference sits in. Each
run is one launch of ``benchmarks.e2e``'s configuration on the emulated cluster, with timers
around torchtitan's step: ``pre`` (zero_grad, the micro-batches and the global token count's
all-reduce), each micro-batch's forward + backward, ``clip`` (clipping, which waits for every
sync_g), ``optim`` (the optimizer step, which issues sync_p) and ``post`` (the loss's
all-reduce for logging). Inside them, ``wait_g`` and ``wait_p`` are the seconds the engine blocked
for a sync_g or sync_p still in flight. A thread of local rank 0 of each node also reads the
node link's byte counter every few ms, so each window's bytes say how busy the link was while
the ranks computed and while they waited. Local rank 0 of each node reports; medians over the
steps after warm-up. Writes ``docs/overlap.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.collectives_report import write_generated
from benchmarks.e2e import REPO, SEQ_LEN, _spec, launch, run_worker
from benchmarks.e2e_report import FLOOR_RATE, step_times

PHASES = ("pre", "fb", "clip", "optim", "post", "wait_g", "wait_p")
# Windows of a step in which the node's link counter is read: the first and the last
# micro-batch's forward + backward (sync_p of the step before is waited in the first; sync_g is
# issued in the last), then clipping, the optimizer step and the rest.
WINDOWS = ("first_fb", "last_fb", "clip", "optim", "post")
SAMPLE_S = 0.005
BEGIN, END = "<!-- overlap:begin -->", "<!-- overlap:end -->"
LINE = re.compile(r"\[overlap\] (\{.*\})")


def _sample_link(clock: Any) -> list[tuple[float, int]]:
    """(time, bytes sent) of this node's link every ``SAMPLE_S``, appended by a daemon thread."""
    import threading

    from paro_fsdp.cluster.launch import ENV_IFNAME

    fd = os.open(f"/sys/class/net/{os.environ[ENV_IFNAME]}/statistics/tx_bytes", os.O_RDONLY)
    samples: list[tuple[float, int]] = []

    def run() -> None:
        while True:
            samples.append((clock(), int(os.pread(fd, 32, 0))))
            time.sleep(SAMPLE_S)

    threading.Thread(target=run, daemon=True, name="link-sampler").start()
    return samples


def _sent(samples: list[tuple[float, int]], start: float, end: float) -> int:
    """Bytes the link sent between ``start`` and ``end`` (the last samples at or before each)."""
    import bisect

    def at(t: float) -> int:
        i = bisect.bisect_right(samples, (t, float("inf"))) - 1
        return samples[max(i, 0)][1]

    return at(end) - at(start)


def install_timers() -> None:
    """Wrap torchtitan's step and the engine's waits; print each step's phases and the link's
    bytes in each window (local rank 0)."""
    from torchtitan.train import Trainer

    from paro_fsdp.engine import Unit

    clock = time.perf_counter
    acc: dict[str, Any] = {"wait_g": 0.0, "wait_p": 0.0, "fb": [], "fb_at": []}
    reporter = os.environ.get("LOCAL_RANK", "0") == "0"
    samples = _sample_link(clock) if reporter else []

    def timed_wait(method: Any, key: str) -> Any:
        # Every call: a queued sync_p is started inside the wait, and that is waited time too.
        @functools.wraps(method)
        def wrapped(self: Unit) -> None:
            t = clock()
            method(self)
            acc[key] += clock() - t
        return wrapped

    Unit.wait_grads = timed_wait(Unit.wait_grads, "wait_g")
    Unit.wait_params = timed_wait(Unit.wait_params, "wait_p")

    forward_backward = Trainer.forward_backward_step

    @functools.wraps(forward_backward)
    def timed_forward_backward(self: Any, *args: Any, **kwargs: Any) -> Any:
        t = clock()
        acc.setdefault("first_fb", t)
        out = forward_backward(self, *args, **kwargs)
        acc["last_fb"] = clock()
        acc["fb"].append(acc["last_fb"] - t)
        acc["fb_at"].append((t, acc["last_fb"]))
        return out

    Trainer.forward_backward_step = timed_forward_backward
    train_step = Trainer.train_step

    @functools.wraps(train_step)
    def timed_train_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not getattr(self.optimizers, "_timed", False):
            step = self.optimizers.step

            def timed_step(*a: Any, **k: Any) -> Any:
                acc["optim_start"] = clock()
                out = step(*a, **k)
                acc["optim_end"] = clock()
                return out

            self.optimizers.step, self.optimizers._timed = timed_step, True
        start = clock()
        out = train_step(self, *args, **kwargs)
        end = clock()
        report = {"step": self.step, "total": end - start, "pre": acc["first_fb"] - start,
                  "fb": acc["fb"], "clip": acc["optim_start"] - acc["last_fb"],
                  "optim": acc["optim_end"] - acc["optim_start"], "post": end - acc["optim_end"],
                  "wait_g": acc["wait_g"], "wait_p": acc["wait_p"]}
        if reporter:
            bounds = {"first_fb": acc["fb_at"][0], "last_fb": acc["fb_at"][-1],
                      "clip": (acc["last_fb"], acc["optim_start"]),
                      "optim": (acc["optim_start"], acc["optim_end"]), "post": (acc["optim_end"], end)}
            report["tx"] = {w: _sent(samples, *bounds[w]) for w in WINDOWS}
            report["window"] = {w: bounds[w][1] - bounds[w][0] for w in WINDOWS}
            print(f"[overlap] {json.dumps(report)}", flush=True)
        acc.clear()
        acc.update(wait_g=0.0, wait_p=0.0, fb=[], fb_at=[])
        return out

    Trainer.train_step = timed_train_step


def parse(log: str, warmup: int = 2) -> dict[str, float]:
    """Median per phase (fb: each micro-batch's list summed; fb1: the first micro-batch) over nodes and steps."""
    reports = [json.loads(m[1]) for m in LINE.finditer(log)]
    reports = [r for r in reports if r["step"] > warmup]
    if not reports:
        return {}
    out = {k: statistics.median(r[k] if k != "fb" else sum(r["fb"]) for r in reports)
           for k in ("total", *PHASES)}
    out["fb1"] = statistics.median(r["fb"][0] for r in reports)
    out["tx"] = {w: statistics.median(r["tx"][w] for r in reports) for w in WINDOWS}
    out["window"] = {w: statistics.median(r["window"][w] for r in reports) for w in WINDOWS}
    return out


def render(rows: list[dict[str, Any]], command: str) -> str:
    head = "| run | link | step s | " + " | ".join(PHASES) + " | first fb |\n"
    head += "| --- " * (len(PHASES) + 4) + "|\n"
    body = ""
    for r in rows:
        p = r["phases"]
        if not p:
            body += f"| {r['label']} | {r['rate']} | {r['status']}: {r.get('reason', '')} |\n"
            continue
        body += (f"| {r['label']} | {r['rate']} | {statistics.median(r['step_times']):.3f} | "
                 + " | ".join(f"{p[k]:.3f}" for k in PHASES) + f" | {p['fb1']:.3f} |\n")
    link = _render_link(rows)
    return f"""{BEGIN}
Generated by `{command}`: the emulated cluster (`paro_fsdp.cluster`), torchtitan's llama3
debug model in fp32, `seq_len` {SEQ_LEN}, one sample per micro-batch; each configuration at
the link rate and at {FLOOR_RATE} (its compute floor), in one invocation, back to back.
Seconds per step, medians over the steps after warm-up and over the nodes (local rank 0 of
each). `step s` is the trainer's own step time (the benchmark's); the phases are timed
inside `train_step`: `pre` (zero_grad, loading the micro-batches, the global token count's
all-reduce), `fb` (forward + backward of all micro-batches), `clip` (gradient clipping, which
waits for every sync_g), `optim` (the optimizer step, which issues sync_p), `post` (the loss's
all-reduce for logging), and inside those `wait_g` / `wait_p` (blocked on a sync_g / sync_p in
flight) and `first fb` (the first micro-batch's forward + backward, where sync_p is waited).

{head}{body}
What the node's link sent in each window of the step (MiB, medians over the steps after
warm-up and over the nodes; its counter read every {SAMPLE_S * 1000:.0f} ms by a thread of local rank 0), and
in brackets how busy that kept the link (bytes / (rate x window)). sync_g is issued during
the last micro-batch's backward and finished in `clip`; sync_p is issued in `optim` and
finished by the next step's first micro-batch.

{link}{END}"""


def _render_link(rows: list[dict[str, Any]]) -> str:
    from paro_fsdp.cluster.network import parse_rate

    lines = ["| run | link | " + " | ".join(w.replace("_", " ") for w in WINDOWS) + " |",
             "| --- " * (len(WINDOWS) + 2) + "|"]
    for r in rows:
        p = r["phases"]
        if not p or r["rate"] == FLOOR_RATE:
            continue
        rate = parse_rate(r["rate"]) / 8
        cells = [f"{p['tx'][w] / 2**20:.2f} ({p['tx'][w] / (rate * p['window'][w]):.0%})" if p["window"][w] > 0
                 else "-" for w in WINDOWS]
        lines.append(f"| {r['label']} | {r['rate']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        trainer_args = argv[2:] if argv[1:2] == ["--"] else argv[1:]
        sys.argv = ["torchtitan_patch.train", *trainer_args]  # torchtitan reads it on import
        install_timers()
        run_worker(trainer_args)
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.overlap", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="IIG", help="PaRO strategy code (comma-separated for several) or fsdp/hsdp")
    p.add_argument("--comm", default="ho_ring", help="paro_comm for strategies with global collectives")
    p.add_argument("--topology", default="2x4", help="NODESxRANKS")
    p.add_argument("--rate", default="250mbit")
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "overlap.md")
    args = p.parse_args(argv)
    nodes, ranks = (int(x) for x in args.topology.split("x"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="paro-overlap-") as logs:
        for config in args.config.split(","):
            for rate in (args.rate, FLOOR_RATE):
                spec = _spec("debug", nodes, ranks, args.accum, config, None if config in ("fsdp", "hsdp", "ddp")
                             else args.comm, rate, args.steps, "sweep")
                record = launch(spec, args, Path(logs), module="benchmarks.overlap")
                log = Path(record["log"]).read_text() if record.get("log") else ""
                row = {"label": config, "rate": rate, "status": record["status"], "reason": record.get("reason"),
                       "phases": parse(log) if record["status"] == "ok" else {},
                       "step_times": step_times(record) if record["status"] == "ok" else []}
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_generated(args.out, render(rows, " ".join(["python -m benchmarks.overlap", *argv])), BEGIN, END,
                    "Where the step time goes")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
