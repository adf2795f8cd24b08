"""End to end: torchtitan trained under stock FSDP / HSDP / DDP and the PaRO strategies on the emulated cluster.

Every run is one torchtitan launch (``python -m torchtitan_patch.train`` on CPU/gloo ranks)
through ``paro_fsdp.cluster``: a topology (nodes x ranks), a link rate, A micro-batches per
step, a model (llama3 debug or the 57M flavor of ``torchtitan_patch.v0_2.flavors``) and a data
parallel configuration; each also runs with every link at 20gbit, its compute floor. The report
gives tokens/s, step time, bytes on each node's link and model-state memory beside PARO.md's
formulas, the loss curves, targets, the paper's claims set against the measurements, and
(full sweep) the scaling of the best PaRO strategy and stock FSDP over 1, 2 and 4 nodes.

    python -m benchmarks.e2e --quick         # 2x4, 250mbit, A=4, debug model: FSDP, HSDP, PaRO GGG/IIG/NIG (+ floors)
    python -m benchmarks.e2e                 # the full sweep (many hours on a small machine; --list says how many)
    python -m benchmarks.e2e --list          # the runs a command would make and a rough time estimate, nothing run
    python -m benchmarks.e2e --render        # re-render docs/BENCHMARKS.md and its plots from docs/benchmarks/e2e.json

Needs root (network namespaces); see ``python -m paro_fsdp.cluster --help``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.collectives import _csv, _topology, topology_arg
from benchmarks.e2e_report import (
    ANY_COMM,
    FLOOR_RATE,
    FULL_GRID,
    MODELS,
    STOCK,
    best_paro,
    comm_matters,
    config_label,
    failure_reason,
    formula_link_bytes,
    formula_memory,
    layout,
    link_bytes_per_step,
    parse_run,
    render,
    run_key,
    scenario_rows,
    step_times,
    tokens_per_step,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DOC = REPO / "docs" / "BENCHMARKS.md"
DEFAULT_RAW = REPO / "docs" / "benchmarks" / "e2e.json"
CONFIG_FILE = "train_configs/llama3_debug_paro.toml"
SEQ_LEN, LOCAL_BATCH = 128, 1
QUICK = {"models": ["debug"], "topologies": ["2x4"], "rates": ["250mbit"], "accum": [4],
         "configs": ["fsdp", "hsdp", "GGG", "IIG", "NIG"], "comms": ["ho_ring"]}
FULL = {**FULL_GRID, "configs": None, "comms": ["ho_ring", "default"]}
# Steps per run when --steps is not given: warm-up + 6 (debug) or + 4 (57M, about 10x the compute) timed steps.
# torchtitan's learning-rate schedule depends on the step count, so losses compare only at equal counts.
DEFAULT_STEPS = {"debug": 8, "57M": 6}
SCALING_NODES, SCALING_RANKS, SCALING_ACCUM = (1, 2, 4), 2, 4
# Host memory a rank needs besides its model states: Python, torch and torchtitan (about 0.6 GiB
# measured with the debug model) and the unsharded model copy of the layout-independent init.
RANK_BASE_BYTES = 0.7 * 2**30
MEMORY_SHARE = 0.85  # of MemAvailable that the ranks of one launch may plan to use
# Launch overhead per rank (imports, rendezvous, model build) on this 2-core machine, for --list: the saved
# launches' time beyond their steps is 21 s (debug) and 27 s (57M) at 8 ranks, 8 s at 2.
STARTUP_PER_RANK_S = 3.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="only the 2x4, 250mbit, A=4 debug-model rows: stock FSDP and HSDP, PaRO GGG/IIG/NIG with "
                        "ho_ring, their floors; no scaling")
    p.add_argument("--models", type=_csv(str), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--topologies", type=_csv(str), help="NODESxRANKS, comma-separated (default 2x4,4x2)")
    p.add_argument("--rates", type=_csv(str), help="link rates, tc units (default 250mbit,1gbit)")
    p.add_argument("--accum", type=_csv(int), help="micro-batches per step A, comma-separated (default 1,4)")
    p.add_argument("--configs", type=_csv(str),
                   help=f"{', '.join(STOCK)} (stock torchtitan) and PaRO codes or aliases (default: all 3 + all 14)")
    p.add_argument("--comms", type=_csv(str), help="paro_comm values for strategies with global collectives")
    p.add_argument("--steps", type=int, help="training steps per run; the first 2 are warm-up (default: "
                        + ", ".join(f"{m} {n}" for m, n in DEFAULT_STEPS.items()) + ")")
    p.add_argument("--only", choices=("sweep", "scaling"), help="run only the sweep or only the scaling runs")
    p.add_argument("--scaling-config", default="best",
                   help="PaRO strategy[:comm] for the scaling runs; 'best' = fastest PaRO row of the model at 4x2, "
                        "A=4, first rate (measured in this or a saved sweep), else IIG")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per launch")
    p.add_argument("--doc", type=Path, default=DEFAULT_DOC, help="markdown report (plots go to its folder/benchmarks)")
    p.add_argument("--raw", type=Path, default=DEFAULT_RAW, help="raw results JSON")
    p.add_argument("--logs", type=Path, help="folder for every launch's full output (default: a new /tmp folder)")
    p.add_argument("--merge", action="store_true", help="keep saved runs that this invocation does not re-measure")
    p.add_argument("--resume", action="store_true",
                   help="with --merge: skip planned runs whose saved result is ok (continue an interrupted sweep)")
    p.add_argument("--list", action="store_true", help="print the planned runs and a time estimate, run nothing "
                   "(with --resume: only the runs it would launch)")
    p.add_argument("--render", action="store_true", help="only re-render the doc and plots from the raw results")
    return p


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.configs is None:
        from paro_fsdp.strategy import ParoStrategy

        args.configs = list(STOCK) + [s.code for s in ParoStrategy.all_valid()]
    if args.quick and args.only is None:
        args.only = "sweep"
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; valid: {', '.join(MODELS)}")
    for topology in args.topologies:
        if not _topology(topology):
            raise SystemExit(f"--topologies: {topology!r} is not NODESxRANKS with both >= 2 (e.g. 2x4)")
    args.configs = [_config(c) for c in args.configs]
    from paro_fsdp.comm.registry import check_comm

    for comm in args.comms:
        check_comm(comm, "--comms")
    if args.steps is not None and args.steps <= 3:
        raise SystemExit("--steps must be > 3: the first 2 steps are warm-up and a median needs a few more")
    if args.resume:
        args.merge = True
    return args


def _config(text: str) -> str:
    if text.lower() in STOCK:
        return text.lower()
    from paro_fsdp.strategy import ParoStrategy

    try:
        return ParoStrategy.parse(text).code
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--configs: {e}") from None


# --------------------------------------------------------------------------------------------
# Planning


def _spec(model: str, nodes: int, ranks: int, accum: int, config: str, comm: str | None, rate: str,
          steps: int, mode: str) -> dict:
    return {"model": model, "flavor": MODELS[model], "nodes": nodes, "ranks": ranks, "accum": accum,
            "config": config, "comm": comm, "rate": rate, "steps_requested": steps, "seq_len": SEQ_LEN,
            "local_batch": LOCAL_BATCH, "modes": [mode]}


def _steps(args: argparse.Namespace, model: str) -> int:
    return args.steps if args.steps is not None else DEFAULT_STEPS[model]


def _config_comms(config: str, comms: list[str]) -> list[str | None]:
    if config in STOCK:
        return [None]
    return list(comms) if comm_matters(config) else [ANY_COMM]


def _rates(nodes: int, rates: list[str]) -> list[str]:
    """The floor first (each config's floor next to its constrained runs), none but it on one node."""
    return [FLOOR_RATE] if nodes == 1 else [FLOOR_RATE, *rates]


def sweep_plan(args: argparse.Namespace) -> list[dict]:
    plan = []
    for model in args.models:
        for topology in args.topologies:
            nodes, ranks = _topology(topology)
            for accum in sorted(args.accum, reverse=True):
                for config in args.configs:
                    for comm in _config_comms(config, args.comms):
                        plan += [_spec(model, nodes, ranks, accum, config, comm, rate, _steps(args, model), "sweep")
                                 for rate in _rates(nodes, args.rates)]
    return plan


def scaling_config(args: argparse.Namespace, model: str, runs: list[dict]) -> tuple[str, str]:
    """The PaRO strategy and comm of the scaling runs (``--scaling-config``)."""
    if args.scaling_config != "best":
        code, _, comm = args.scaling_config.partition(":")
        code = _config(code)
        return code, (comm or args.comms[0]) if comm_matters(code) else ANY_COMM
    rows = scenario_rows(runs, model, 4, SCALING_RANKS, SCALING_ACCUM, args.rates[0])
    best = best_paro(rows)
    return (best["config"], best["comm"]) if best else ("IIG", ANY_COMM)


def scaling_plan(args: argparse.Namespace, runs: list[dict]) -> list[dict]:
    plan = []
    for model in args.models:
        code, comm = scaling_config(args, model, runs)
        for config, c in ((code, comm), ("fsdp", None)):
            for nodes in SCALING_NODES:
                plan += [_spec(model, nodes, SCALING_RANKS, SCALING_ACCUM, config, c, rate, _steps(args, model),
                               "scaling")
                         for rate in _rates(nodes, args.rates)]
    return plan


def _merge_modes(plan: list[dict]) -> list[dict]:
    """One spec per run key; a run serving both the sweep and the scaling keeps both modes."""
    out: dict[tuple, dict] = {}
    for spec in plan:
        key = run_key(spec)
        if key in out:
            out[key]["modes"] = sorted(set(out[key]["modes"]) | set(spec["modes"]))
        else:
            out[key] = dict(spec)
    return list(out.values())


# --------------------------------------------------------------------------------------------
# Memory and time estimates


@functools.lru_cache(maxsize=None)
def model_params(model: str) -> int:
    """Parameters of a benchmark model (built on the meta device)."""
    import torch

    from torchtitan_patch.version import adapter

    with torch.device("meta"):
        if adapter() == "v0_3":
            from torchtitan.models.llama3 import model_registry

            return sum(p.numel() for p in model_registry(_v0_3_flavor(model)).model.build().parameters())
        from torchtitan.models.llama3 import Transformer, llama3_args

        import torchtitan_patch.v0_2.flavors  # noqa: F401

        return sum(p.numel() for p in Transformer(llama3_args[MODELS[model]]).parameters())


def _v0_3_flavor(model: str) -> str:
    """The llama3 flavor of a benchmark model on torchtitan 0.3, where only torchtitan's own flavors exist."""
    if MODELS[model] != "debugmodel":
        raise SystemExit(f"--models {model}: the {MODELS[model]} flavor is registered for torchtitan 0.2.2 only "
                         f"(torchtitan_patch.v0_2.flavors); on torchtitan 0.3 use --models debug")
    return MODELS[model]


def _available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_check(spec: dict) -> str | None:
    """Why ``spec`` does not fit in this machine's free memory now, or None if it should."""
    params = model_params(spec["model"])
    per_rank = formula_memory({**spec, "params": params}) + 4 * params + RANK_BASE_BYTES
    need, available = per_rank * spec["nodes"] * spec["ranks"], _available_memory()
    if need > MEMORY_SHARE * available:
        return (f"does not fit: about {need / 2**30:.1f} GiB for {spec['nodes'] * spec['ranks']} ranks "
                f"({per_rank / 2**30:.2f} GiB each), {available / 2**30:.1f} GiB available")
    return None


def estimate_seconds(spec: dict, runs: list[dict]) -> float:
    """Rough time of one launch: start-up + steps x (compute + link bytes / rate), without overlap.

    Compute is the saved floor of the same run, else the machine's FLOP rate over all saved floors. Link bytes are
    what the same run sent at another rate, else the formula's times what the same config sent over its formula
    in other saved runs of its topology and A (stock torchtitan sends up to 7x it)."""
    from paro_fsdp.cluster.network import parse_rate

    params = model_params(spec["model"])
    ok = [r for r in runs if r["status"] == "ok" and step_times(r)]
    same = [r for r in ok if run_key(r)[:-1] == run_key(spec)[:-1]]
    floor = next((r for r in same if r["rate"] == FLOOR_RATE), None)
    if floor:
        compute = statistics.median(step_times(floor))
    else:
        # Effective FLOP rate of the whole machine from the saved floors (6 x params per token).
        rates = [tokens_per_step(r) * 6 * r["params"] / statistics.median(step_times(r)) for r in ok
                 if r["rate"] == FLOOR_RATE and r.get("params")]
        flops = statistics.median(rates) if rates else 2e10  # about what 8 debug-model ranks reach on 2 cores
        compute = tokens_per_step(spec) * 6 * params / flops
    link = 0.0
    if spec["rate"] != FLOOR_RATE:
        measured = [b for b in map(link_bytes_per_step, (r for r in same if r["rate"] != FLOOR_RATE)) if b]
        if measured:
            sent = statistics.median(measured)
        else:
            like = (spec["config"], spec["nodes"], spec["ranks"], spec["accum"])
            ratios = [link_bytes_per_step(r) / formula_link_bytes(r) for r in ok
                      if (r["config"], r["nodes"], r["ranks"], r["accum"]) == like and r["rate"] != FLOOR_RATE
                      and link_bytes_per_step(r) and formula_link_bytes(r)]
            sent = (formula_link_bytes({**spec, "params": params}) or 0.0) * (statistics.median(ratios)
                                                                               if ratios else 1.0)
        link = sent * 8 / parse_rate(spec["rate"])
    return STARTUP_PER_RANK_S * spec["nodes"] * spec["ranks"] + spec["steps_requested"] * (compute + link)


# --------------------------------------------------------------------------------------------
# Launching


def torchtitan_args(spec: dict, dump_folder: str) -> list[str]:
    """The trainer's command line for one run: the debug job (the TOML on torchtitan 0.2.2, its
    config function on 0.3) with the run's overrides."""
    from torchtitan_patch.version import adapter

    replicate, shard, strategy = layout(spec["config"], spec["nodes"], spec["ranks"])
    n = spec["nodes"] * spec["ranks"]
    if adapter() == "v0_3":
        _v0_3_flavor(spec["model"])
        job = ["--module", "torchtitan_patch.v0_3", "--config", "llama3_debug_paro", "--dump_folder", dump_folder]
        no_ac = ["activation-checkpoint:none"]  # tyro's subcommand: last
    else:
        job = ["--job.config_file", CONFIG_FILE, "--job.dump_folder", dump_folder,
               "--job.description", f"e2e {config_label(spec['config'], spec['comm'])} @ {spec['rate']}",
               "--model.flavor", spec["flavor"]]
        no_ac = ["--activation_checkpoint.mode", "none"]
    argv = [*job,
            "--training.local_batch_size", str(spec["local_batch"]),
            "--training.global_batch_size", str(spec["local_batch"] * n * spec["accum"]),
            "--training.seq_len", str(spec["seq_len"]), "--training.steps", str(spec["steps_requested"]),
            "--parallelism.data_parallel_replicate_degree", str(replicate),
            "--parallelism.data_parallel_shard_degree", str(shard),
            "--parallelism.paro_strategy", strategy,
            "--metrics.log_freq", "1", "--metrics.no-enable-tensorboard", "--metrics.disable-color-printing",
            "--checkpoint.no-enable"]
    if spec["config"] not in STOCK:
        argv += ["--parallelism.paro_comm", "ho_ring" if spec["comm"] == ANY_COMM else spec["comm"]]
    if spec.get("ho_ring_chunks"):  # benchmarks.ho_ring_depth's runs; the sweep keeps HO-Ring's default
        argv += ["--parallelism.paro_ho_ring_chunks", str(spec["ho_ring_chunks"])]
    for field, value in (spec.get("quant") or {}).items():  # benchmarks.quant_speed's runs; the sweep is exact
        argv += [f"--parallelism.paro_quant_{field}", str(value)]
    if spec.get("bucket_cap_mb") is not None:  # benchmarks.bucket_cap's runs; the sweep keeps the default
        argv += ["--parallelism.paro_bucket_cap_mb", str(spec["bucket_cap_mb"])]
    return [*argv, *no_ac]


def cluster_target(spec: dict, dump_folder: str, module: str = "benchmarks.e2e") -> list[str]:
    """What each node's torchrun runs: ``module``'s worker (rank 0 of each node echoed) with the trainer's args."""
    return ["--local-ranks-filter", "0", "--role", "rank", "--tee", "3",
            "-m", module, "--worker", "--", *torchtitan_args(spec, dump_folder)]


def launch(spec: dict, args: argparse.Namespace, log_dir: Path, module: str = "benchmarks.e2e") -> dict:
    """One run on a fresh emulated cluster; a record whose status says whether it worked and why not.

    ``module`` is the worker each rank runs (``--worker``): this one, or one that instruments
    the trainer before it calls :func:`run_worker`.
    """
    from paro_fsdp.cluster import ClusterError, EmulatedCluster

    record = {**spec, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "load_before": os.getloadavg()[0]}
    reason = memory_check(spec)
    if reason:
        return {**record, "status": "not run", "reason": reason}
    name = "_".join(str(x) for x in (spec["model"], f"{spec['nodes']}x{spec['ranks']}", f"A{spec['accum']}",
                                      spec["config"], spec["comm"] or "stock", spec["rate"]))
    log_path = log_dir / f"{name}.log"
    try:
        with tempfile.TemporaryDirectory(prefix="paro-e2e-") as dump, open(log_path, "w") as log, \
                EmulatedCluster(spec["nodes"], spec["ranks"], spec["rate"]) as cluster:
            outcome = cluster.run(cluster_target(spec, dump, module), timeout=args.timeout,
                                  echo=lambda line: (log.write(line + "\n"), log.flush()))
    except (ClusterError, ValueError, OSError) as e:
        return {**record, "status": "failed", "reason": f"cluster: {e}", "log": str(log_path)}
    outputs = [n.output for n in outcome.nodes]
    record.update(parse_run(outputs), rate_bits=cluster.topology.rate_bits, elapsed_s=outcome.elapsed_s,
                  load_after=os.getloadavg()[0], log=str(log_path),
                  link_total=[[n.bytes.tx, n.bytes.rx, n.bytes.loopback] for n in outcome.nodes])
    logged = len(record["steps"])
    complete = logged >= spec["steps_requested"] and all(
        len(p) >= spec["steps_requested"] for p in record["probes"])
    if not outcome.ok:
        reason = failure_reason(outputs, [n.returncode for n in outcome.nodes], outcome.timed_out, outcome.elapsed_s)
        if complete:  # every step measured; the launch failed on the way out
            record.update(status="ok", note=f"all {logged} steps logged, then {reason}")
        else:
            record.update(status="failed", reason=f"{reason} (after {logged} of {spec['steps_requested']} steps)")
    elif not complete:
        record.update(status="failed", reason=f"only {logged} of {spec['steps_requested']} steps logged")
    else:
        record["status"] = "ok"
    return record


def add_series_args(p: argparse.ArgumentParser, out: Path, steps: int) -> None:
    """The options every side-by-side benchmark built on :func:`launch_series` takes."""
    p.add_argument("--steps", type=int, default=steps, help="training steps per run; the first 2 are warm-up")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per launch")
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--render", action="store_true", help="only re-render the doc from its saved runs")


def add_scenario_args(p: argparse.ArgumentParser, *, accum: int, configs: list[str], configs_help: str,
                      rate: str) -> None:
    """The scenario options of the side-by-side benchmarks that run one model on several topologies."""
    p.add_argument("--model", default="debug", choices=list(MODELS))
    p.add_argument("--topologies", type=_csv(topology_arg), default=[(2, 4), (4, 2)],
                   help="NODESxRANKS, comma-separated")
    p.add_argument("--accum", type=int, default=accum, help="micro-batches per step A")
    p.add_argument("--configs", type=_csv(_config), default=configs, help=configs_help)
    p.add_argument("--rate", default=rate, help="inter-node link rate (tc units)")


def parse_series(parser: argparse.ArgumentParser, argv: list[str],
                 publish: Callable[[Path, dict], None]) -> tuple[argparse.Namespace, Path, dict] | None:
    """A side-by-side benchmark's arguments, the raw results file beside its doc and what that
    holds; None once ``--render`` has rewritten the doc from it (nothing to launch)."""
    args = parser.parse_args(argv)
    raw_path, saved = saved_series(args.out)
    if args.render:
        publish(args.out, saved)
        return None
    return args, raw_path, saved


def saved_series(out: Path) -> tuple[Path, dict]:
    """The raw results file beside the doc ``out``, and what it holds (nothing yet: no runs)."""
    raw_path = out.with_suffix(".json")
    return raw_path, json.loads(raw_path.read_text()) if raw_path.exists() else {"commands": [], "runs": []}


def launch_series(specs: list[tuple[str, dict]], args: argparse.Namespace, tag: str,
                  key: Callable[[dict], tuple], saved: dict, command: str, raw_path: Path,
                  publish: Callable[[dict], None]) -> None:
    """Launch each ``(description, spec)`` in turn (the side-by-side benchmarks built on this one).

    After each run the raw results are saved to ``raw_path`` (``saved``'s runs, less those this
    series measured again by ``key``, plus this series') and handed to ``publish``, so an
    interrupted series keeps what it measured.
    """
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix=f"paro-{tag}-") as logs:
        for i, (what, spec) in enumerate(specs, 1):
            print(f"[{tag}] run {i}/{len(specs)}: {what} ...", flush=True)
            log_dir = Path(logs) / f"r{i}"
            log_dir.mkdir()
            record = launch(spec, args, log_dir)
            record.pop("log", None)  # a temporary folder
            runs.append(record)
            times = step_times(record) if record["status"] == "ok" else []
            print(f"[{tag}] {record['status']}"
                  + (f": median step {statistics.median(times):.3f} s" if times else f": {record.get('reason')}"),
                  flush=True)
            fresh = {key(r) for r in runs}
            raw = {"commands": [*saved["commands"], command],
                   "runs": [r for r in saved["runs"] if key(r) not in fresh] + runs}
            raw_path.parent.mkdir(parents=True, exist_ok=True)
            raw_path.write_text(json.dumps(raw, separators=(",", ":")))
            publish(raw)


def _what(spec: dict) -> str:
    return (f"{spec['model']} {spec['nodes']}x{spec['ranks']} A={spec['accum']} "
            f"{config_label(spec['config'], spec['comm'])} @ {spec['rate']}")


def _brief(record: dict) -> str:
    what = _what(record)
    if record["status"] != "ok":
        return f"{what}: {record['status']}: {record.get('reason', '')}"
    times = step_times(record)
    return (f"{what}: step {statistics.median(times):.3f} s (median of {len(times)}), final loss "
            f"{record['steps'][-1]['loss']:.4f}, launch {record['elapsed_s']:.0f} s")


def _save(raw: dict, args: argparse.Namespace) -> None:
    args.raw.parent.mkdir(parents=True, exist_ok=True)
    args.raw.write_text(json.dumps(raw, separators=(",", ":")))


def drive(args: argparse.Namespace) -> int:
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C: the cluster is torn down, results so far are kept.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    old_raw = json.loads(args.raw.read_text()) if args.merge and args.raw.exists() else {}
    saved = old_raw.get("runs", [])
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="paro-e2e-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    raw = {"cpus": os.cpu_count(), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
           "command": " ".join(["python -m benchmarks.e2e", *sys.argv[1:]]),
           "subset": "--quick subset" if args.quick else "",
           "settings": {"config_file": CONFIG_FILE, "seq_len": SEQ_LEN, "local_batch": LOCAL_BATCH,
                        "floor_rate": FLOOR_RATE, "torch": _version("torch"), "torchtitan": _version("torchtitan")},
           "elapsed_s": 0.0, "runs": []}
    # Every invocation whose runs the file holds: what ran, when, how many launches, how long.
    invocation = {"command": raw["command"], "created": raw["created"], "launches": 0, "elapsed_s": 0.0}
    raw["invocations"] = old_raw.get("invocations", []) + [invocation]
    raw["repeats"] = old_raw.get("repeats", [])  # launches of a run the sweep already holds (the report's repeats)
    done: dict[tuple, dict] = {}
    resumable = _saved_ok(saved)

    def publish() -> None:
        fresh = set(done)
        raw["runs"] = [r for r in saved if run_key(r) not in fresh] + list(done.values())
        raw["elapsed_s"] = invocation["elapsed_s"] = time.monotonic() - start
        _save(raw, args)

    def to_launch(plan: list[dict]) -> list[dict]:
        return [s for s in plan if run_key(s) not in done and not (args.resume and run_key(s) in resumable)]

    def run_all(plan: list[dict], part: str) -> None:
        for i, spec in enumerate(plan, 1):
            key = run_key(spec)
            old = next((r for r in saved if run_key(r) == key), None)
            if key in done:
                done[key]["modes"] = sorted(set(done[key]["modes"]) | set(spec["modes"]))
                continue
            if args.resume and key in resumable:
                done[key] = {**old, "modes": sorted(set(old.get("modes", [])) | set(spec["modes"]))}
                continue
            known = [*saved, *done.values()]
            etas = [estimate_seconds(s, known) for s in to_launch(plan[i - 1:])]  # this run first
            print(f"[e2e] run {i}/{len(plan)}: {_what(spec)}, about {etas[0] / 60:.1f} min "
                  f"(about {sum(etas) / 60:.0f} min of the {part} left) ...", flush=True)
            done[key] = launch(spec, args, log_dir)
            if old:  # a re-measurement also serves whatever the run it replaces served
                done[key]["modes"] = sorted(set(done[key]["modes"]) | set(old.get("modes", [])))
            invocation["launches"] += 1
            print(f"[e2e] {_brief(done[key])}", flush=True)
            publish()

    print(f"[e2e] launch logs in {log_dir}", flush=True)
    try:
        if args.only != "scaling":
            run_all(_merge_modes(sweep_plan(args)), "sweep")
        if args.only != "sweep":
            publish()
            run_all(_merge_modes(scaling_plan(args, raw["runs"])), "scaling runs")
    except KeyboardInterrupt:
        print("[e2e] interrupted: keeping the runs finished so far", file=sys.stderr)
        publish()
        render(raw, args.doc)
        return 130
    publish()
    render(raw, args.doc)
    print(f"[e2e] wrote {args.doc} and {args.raw} in {raw['elapsed_s'] / 60:.1f} min")
    return 0 if all(r["status"] == "ok" for r in done.values()) else 1


def _saved_ok(saved: list[dict]) -> set[tuple]:
    """Keys of the saved runs that ``--resume`` takes from the file instead of launching."""
    return {run_key(r) for r in saved if r["status"] == "ok"}


def list_plan(args: argparse.Namespace) -> int:
    saved = json.loads(args.raw.read_text())["runs"] if args.raw.exists() else []
    plan = [] if args.only == "scaling" else _merge_modes(sweep_plan(args))
    if args.only != "sweep":
        plan = _merge_modes(plan + scaling_plan(args, saved))
    if args.resume:  # what a resumed sweep would launch, not what it would take from the file
        resumable = _saved_ok(saved)
        plan = [s for s in plan if run_key(s) not in resumable]
    total = 0.0
    for spec in plan:
        seconds = estimate_seconds(spec, saved)
        total += seconds
        print(f"{spec['model']:6} {spec['nodes']}x{spec['ranks']} A={spec['accum']} "
              f"{config_label(spec['config'], spec['comm']):24} {spec['rate']:8} {','.join(spec['modes']):14} "
              f"~{seconds / 60:.1f} min")
    print(f"{len(plan)} launches, roughly {total / 3600:.1f} h on this machine "
          f"(start-up {STARTUP_PER_RANK_S:.0f} s per rank; compute and link bytes from saved runs, else the formula's; "
          f"no overlap)")
    return 0


# --------------------------------------------------------------------------------------------
# Worker (one per rank, inside the cluster)


def run_worker(trainer_args: list[str]) -> None:
    """torchtitan's trainer, printing at every step line node time, link counters and the process's
    CPU time, all threads (local rank 0).

    The probe is a filter on torchtitan's (root) logger, so it runs when the trainer logs a
    step, after the step's loss has been reduced over all ranks.
    """
    import logging
    import re

    if os.environ.get("LOCAL_RANK", "0") == "0":
        from paro_fsdp.cluster import node_counters

        step_line = re.compile(r"^(?:\x1b\[[0-9;]*m)*step:\s*(\d+)\s+(?:\x1b\[[0-9;]*m)*loss:")

        class StepProbe(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                match = step_line.match(str(record.msg))
                if match:
                    c = node_counters()
                    print(f"[e2e] step={match[1]} t={time.perf_counter():.6f} tx={c.tx} rx={c.rx} lo={c.loopback} "
                          f"cpu={time.process_time():.6f}", flush=True)
                return True

        logging.getLogger().addFilter(StepProbe())
    sys.argv = ["torchtitan_patch.train", *trainer_args]
    from torchtitan_patch.train import main as train_main

    train_main()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        run_worker(argv[2:] if argv[1:2] == ["--"] else argv[1:])
        return 0
    args = _resolve(_parser().parse_args(argv))
    if args.render:
        render(json.loads(args.raw.read_text()), args.doc)
        print(f"wrote {args.doc}")
        return 0
    if args.list:
        return list_plan(args)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
