"""Long-run stability: 1,000 optimizer steps of PaRO IIG + HO-Ring on 4 gloo ranks (2 groups x 2),
measuring per step the resident memory, the live tensors and the step time, then rebuilding the
model repeatedly to see what a rebuilt model leaves behind. Writes a markdown report.

    python benchmarks/long_run.py --out docs/long-run.md          # launches 4 ranks itself
    torchrun --standalone --nproc-per-node 4 benchmarks/long_run.py --out docs/long-run.md

The model is a small pre-norm transformer (token embedding, causal attention + MLP blocks, output
projection) wrapped as torchtitan wraps its models: the embedding, each block and the output are
PaRO units, the root takes the final norm. Each step runs ``--accum`` micro-batches, clips
gradients by the global norm and steps AdamW through ``ParoOptimizer``.

Per step: resident memory (VmRSS from /proc/self/status) and step time; every ``--sample-every``
steps: live tensors (objects gc tracks that are tensors, parameters included). Growth is reported
after warm-up: RSS and live tensors at step ``--warmup`` vs the last step, and the median step
time of the ``--warmup`` steps after warm-up vs the last ``--warmup`` steps. Then ``--rebuilds``
times: build, wrap, one step, delete, collect; RSS, live tensors and the library objects still
alive after each.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from paro_fsdp import ParoOptimizer, clip_grad_norm_, paro_parallelize


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp_norm = nn.RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim, bias=False), nn.SiLU(), nn.Linear(4 * dim, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))

    def units(self) -> list[nn.Module]:
        return [self.tok_embeddings, *self.layers, self.output]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STEP_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*step:\s+(\d+)\s+loss")


def torchtitan_step_seconds(steps: int, ranks: int) -> float | None:
    """Median seconds per step of torchtitan's trainer on the debug config (IIG + HO-Ring), from a short run."""
    with tempfile.TemporaryDirectory() as dump:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "--local-ranks-filter=0", "--role=rank", "--tee=3", "-m", "torchtitan_patch.train",
               "--job.config_file", "train_configs/llama3_debug_paro.toml", "--training.steps", str(steps),
               "--job.dump_folder", dump]
        try:
            run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
        except subprocess.TimeoutExpired:
            return None
    times = {}
    for line in re.sub(r"\x1b\[[0-9;]*m", "", run.stdout + run.stderr).splitlines():
        match = _STEP_LINE.search(line)
        if match:
            stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            times[int(match.group(2))] = stamp.timestamp()
    gaps = [times[i] - times[i - 1] for i in sorted(times) if i - 1 in times and i > 2]  # after 2 warm-up steps
    return statistics.median(gaps) if gaps else None


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def live_tensors() -> int:
    count = 0
    with warnings.catch_warnings():  # isinstance on deprecated module attributes warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    count += 1
            except ReferenceError:  # weak proxies
                pass
    return count


def live_objects(*names: str) -> dict[str, int]:
    """Objects gc tracks whose class is one of ``names``."""
    counts = dict.fromkeys(names, 0)
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in counts:
            counts[name] += 1
    return counts


TRACKED = ("RowLayout", "EngineState", "MeshGroups", "HORingCollectives", "DeviceMesh")


def build(args: argparse.Namespace, mesh: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyTransformer(args.vocab, args.dim, args.depth, args.heads)
    model = paro_parallelize(model, mesh, "IIG", blocks=model.units(), comm="ho_ring")
    return model, ParoOptimizer(model, torch.optim.AdamW, lr=1e-3, weight_decay=0.1)


def train_step(model: nn.Module, optim: torch.optim.Optimizer, args: argparse.Namespace, step: int) -> float:
    rank = dist.get_rank()
    total = 0.0
    for micro in range(args.accum):
        gen = torch.Generator().manual_seed(1_000_003 * step + 1_009 * micro + rank)
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
        model.set_requires_gradient_sync(micro == args.accum - 1)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), tokens[:, 1:].reshape(-1)) / args.accum
        loss.backward()
        total += loss.item()
    clip_grad_norm_(model, 1.0)
    optim.step()
    optim.zero_grad()
    return total


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    model, optim = build(args, mesh)
    params = sum(p.numel() for p in model.parameters())  # DTensors: the global sizes
    steps: list[dict[str, Any]] = []
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        dist.barrier()  # every rank starts the step together, so times are the step's, not a straggler's wait
        t0, c0 = time.perf_counter(), time.process_time()
        loss = train_step(model, optim, args, step)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        row = {"step": step, "seconds": seconds, "cpu": cpu, "rss": rss_bytes(), "loss": loss}
        if step == 1 or step % args.sample_every == 0 or step == args.warmup:
            gc.collect()
            row["tensors"] = live_tensors()
        steps.append(row)
    train_seconds = time.perf_counter() - started
    del model, optim
    gc.collect()
    after_train = {"rss": rss_bytes(), "tensors": live_tensors(), **live_objects(*TRACKED)}
    rebuilds = []
    for i in range(1, args.rebuilds + 1):
        model, optim = build(args, mesh)
        train_step(model, optim, args, 10_000 + i)
        del model, optim
        gc.collect()
        rebuilds.append({"rebuild": i, "rss": rss_bytes(), "tensors": live_tensors(), **live_objects(*TRACKED)})
    return {"rank": dist.get_rank(), "params": params, "steps": steps, "train_seconds": train_seconds,
            "after_train": after_train, "rebuilds": rebuilds}


def _mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def _at(steps: list[dict[str, Any]], step: int) -> dict[str, Any]:
    return steps[step - 1]


def _median_ms(steps: list[dict[str, Any]], lo: int, hi: int, key: str = "seconds") -> float:
    return 1e3 * statistics.median(r[key] for r in steps[lo:hi])


def _commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "paro_fsdp"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" with uncommitted changes under paro_fsdp/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(results: list[dict[str, Any]], args: argparse.Namespace, load: tuple[tuple[float, ...], ...],
           wall: float) -> str:
    n, w = args.steps, args.warmup
    lines = [
        "# Long-run stability",
        "",
        f"Generated by `benchmarks/long_run.py` on {datetime.date.today().isoformat()} "
        f"({platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, commit {_commit()}); "
        f"command: `python benchmarks/long_run.py "
        f"{' '.join(a for a in sys.argv[1:] if not a.startswith('--torchtitan-step-seconds'))}`.",
        "",
        f"{n} optimizer steps of PaRO IIG with HO-Ring (`comm=\"ho_ring\"`) on {len(results)} gloo ranks as "
        f"2 groups x {len(results) // 2}, each step {args.accum} micro-batches of {args.batch} x {args.seq} "
        f"tokens, global-norm clipping and AdamW through `ParoOptimizer`. The model is a small pre-norm "
        f"transformer (vocabulary {args.vocab}, dim {args.dim}, {args.depth} blocks of causal attention "
        f"with {args.heads} heads and an MLP; {results[0]['params']:,} parameters), wrapped as torchtitan wraps its "
        f"models: embedding, each block and the output projection one PaRO unit each.",
        "",
        "This is the library loop (`paro_parallelize` + `ParoOptimizer`), not torchtitan's trainer: on this "
        "shared 2-core machine (1-minute load average "
        f"{load[0][0]:.1f} at the start, {load[1][0]:.1f} at the end) "
        + (f"torchtitan's debug model (`train_configs/llama3_debug_paro.toml`, IIG + HO-Ring, 4 ranks) took "
           f"{args.torchtitan_step_seconds:.2f} s per step in a {args.torchtitan_probe_steps}-step run just "
           f"before, so 1,000 steps would take about {args.torchtitan_step_seconds * 1000 / 60:.0f} min of all "
           "the machine's cores. " if args.torchtitan_step_seconds else
           "1,000 steps of the torchtitan debug model on 4 ranks would take well over half an hour. ")
        + "The training loop, engine, optimizer partition and HO-Ring "
        "collectives are the same ones torchtitan's hook drives. The run was niced (`nice -n 19`), so wall "
        "step times include waiting for the CPU behind other work; compare medians, and the CPU time a "
        "step used (`time.process_time`), which waiting does not inflate.",
        "",
        f"Wall time: {wall / 60:.1f} min ({results[0]['train_seconds'] / 60:.1f} min of training).",
        "",
        f"## Growth after warm-up (first {w} steps)",
        "",
        f"| rank | RSS step {w} MiB | RSS step {n} MiB | growth MiB | live tensors step {w} | "
        f"live tensors step {n} | median step ms, steps {w + 1}-{2 * w} | median step ms, steps "
        f"{n - w + 1}-{n} | median CPU ms, steps {w + 1}-{2 * w} | median CPU ms, steps {n - w + 1}-{n} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        s = r["steps"]
        a, b = _at(s, w), _at(s, n)
        lines.append(
            f"| {r['rank']} | {_mib(a['rss'])} | {_mib(b['rss'])} | {_mib(b['rss'] - a['rss'])} | {a['tensors']} | "
            f"{b['tensors']} | {_median_ms(s, w, 2 * w):.1f} | {_median_ms(s, n - w, n):.1f} | "
            f"{_median_ms(s, w, 2 * w, 'cpu'):.1f} | {_median_ms(s, n - w, n, 'cpu'):.1f} |"
        )
    growth = max(_at(r["steps"], n)["rss"] - _at(r["steps"], w)["rss"] for r in results)
    tensors_flat = all(_at(r["steps"], n)["tensors"] == _at(r["steps"], w)["tensors"] for r in results)
    lines += ["", f"After warm-up, resident memory grew by at most {_mib(growth)} MiB on any rank over "
              f"{n - w} steps ({growth / (n - w) / 1024:.1f} KiB per step), and the live tensors "
              + ("did not change on any rank." if tensors_flat else "changed (see the table).")
              + " Ranks of group 0 count more live tensors than those of group 1 throughout; the counts are "
              "flat on each."]
    cpu = [(_median_ms(r["steps"], w, 2 * w, "cpu"), _median_ms(r["steps"], n - w, n, "cpu")) for r in results]
    wall = [(_median_ms(r["steps"], w, 2 * w), _median_ms(r["steps"], n - w, n)) for r in results]
    lines += ["", f"Step time: the median CPU time of a step went from {min(a for a, _ in cpu):.1f}-"
              f"{max(a for a, _ in cpu):.1f} ms (steps {w + 1}-{2 * w}, over the ranks) to "
              f"{min(b for _, b in cpu):.1f}-{max(b for _, b in cpu):.1f} ms (steps {n - w + 1}-{n}); the median "
              f"wall time from {min(a for a, _ in wall):.0f}-{max(a for a, _ in wall):.0f} ms to "
              f"{min(b for _, b in wall):.0f}-{max(b for _, b in wall):.0f} ms, while the machine's load average "
              f"went from {load[0][0]:.1f} to {load[1][0]:.1f}."]
    lines += ["", "Every rank's first-step, warm-up and last values, and the maximum RSS after warm-up:", "",
              "| rank | RSS step 1 MiB | max RSS steps "
              f"{w}-{n} MiB | live tensors step 1 | loss step 1 | loss step {n} |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        s = r["steps"]
        peak = max(x["rss"] for x in s[w - 1:])
        lines.append(f"| {r['rank']} | {_mib(s[0]['rss'])} | {_mib(peak)} | {s[0]['tensors']} | "
                     f"{s[0]['loss']:.4f} | {s[-1]['loss']:.4f} |")
    lines += ["", f"Rank 0 every {args.sample_every * 2} steps (RSS and live tensors at that step, median wall and "
              f"CPU time of a step over the {args.sample_every * 2} steps up to it):", "",
              "| step | RSS MiB | live tensors | median step ms | median CPU ms |", "| --- | --- | --- | --- | --- |"]
    s0 = results[0]["steps"]
    for step in range(args.sample_every * 2, n + 1, args.sample_every * 2):
        row = _at(s0, step)
        lo = step - args.sample_every * 2
        lines.append(f"| {step} | {_mib(row['rss'])} | {row.get('tensors', '')} | {_median_ms(s0, lo, step):.1f} | "
                     f"{_median_ms(s0, lo, step, 'cpu'):.1f} |")
    lines += ["", f"## Rebuilding the model ({args.rebuilds} times)", "",
              "After training, the model and optimizer were deleted; then, on the same mesh, each rebuild "
              "built, wrapped and stepped a fresh model once and deleted it. A bounded library leaves the "
              "counts flat; what grows by a fixed amount per rebuild is held by a cache.", "",
              "| rank 0 | RSS MiB | live tensors | " + " | ".join(f"live {t}" for t in TRACKED) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in TRACKED) + " |"]
    r0 = results[0]
    shown = [("after training", r0["after_train"])]
    shown += [(f"rebuild {x['rebuild']}", x) for x in r0["rebuilds"]
              if x["rebuild"] in (1, 2, args.rebuilds // 2, args.rebuilds)]
    for label, x in shown:
        lines.append(f"| {label} | {_mib(x['rss'])} | {x['tensors']} | " + " | ".join(str(x[t]) for t in TRACKED)
                     + " |")
    first, last = r0["rebuilds"][0], r0["rebuilds"][-1]
    per = {k: (last[k] - first[k]) / max(1, len(r0["rebuilds"]) - 1) for k in ("tensors", "RowLayout", "MeshGroups")}
    if per["RowLayout"] > 0:
        lines += ["", f"Each rebuild leaves {per['tensors']:g} tensors, {per['RowLayout']:g} `RowLayout`s and "
                  f"{per['MeshGroups']:g} `MeshGroups` alive: `RowLayout.slices` (paro_fsdp/layout.py) is a "
                  "`functools.cache` on a method, so the cache, global to the class, keeps every layout it was "
                  "called on, and with it the layout's parameters (`ParamRegion.param`) and `MeshGroups` (the "
                  "mesh and its process groups), for the life of the process. After the trained model was "
                  f"deleted, its {r0['after_train']['RowLayout']} layouts were still alive, with "
                  f"{r0['after_train']['tensors']} live tensors. A trainer that builds one model is unaffected (its layouts live as long as the "
                  "model); a process that builds models repeatedly (tests, sweeps, in-process restarts) grows "
                  "with the size of every model it built."]
    else:
        lines += ["", "Rebuilding leaves nothing behind: the counts are flat."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--sample-every", type=int, default=50, help="steps between live-tensor counts")
    parser.add_argument("--rebuilds", type=int, default=20)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=4, help="ranks to launch when not under torchrun (even)")
    parser.add_argument("--out", default=None, help="markdown report to write (rank 0)")
    parser.add_argument("--torchtitan-probe-steps", type=int, default=8,
                        help="first time this many steps of torchtitan's debug run, to report its step time (0: skip)")
    parser.add_argument("--torchtitan-step-seconds", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write every rank's raw measurements here (rank 0)")
    args = parser.parse_args()
    if args.steps < 2 * args.warmup:
        parser.error(f"--steps {args.steps} must be at least twice --warmup {args.warmup}")
    if "RANK" not in os.environ:  # launch ourselves under torchrun
        extra = []
        if args.torchtitan_probe_steps > 2 and args.torchtitan_step_seconds is None:
            seconds = torchtitan_step_seconds(args.torchtitan_probe_steps, args.ranks)
            extra = [f"--torchtitan-step-seconds={seconds}"] if seconds else []
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc-per-node={args.ranks}", __file__, *sys.argv[1:], *extra])
    start_load = os.getloadavg()
    started = time.perf_counter()
    dist.init_process_group("gloo")
    try:
        result = run(args)
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, result)
    finally:
        dist.destroy_process_group()
    if result["rank"] == 0:
        text = report(everyone, args, (start_load, os.getloadavg()), time.perf_counter() - started)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(everyone, f)


if __name__ == "__main__":
    main()
