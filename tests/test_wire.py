"""Bytes on the wire: one training step per strategy on an emulated 2-node x 2-rank cluster.

Each node is a network namespace whose only way to the other node is its veth ``eth0``;
ranks of one node talk over the loopback. One ``torchrun`` job (one process group) trains
all 14 strategies in turn, one optimizer step of A = 2 micro-steps each (SGD), on a model of
1.58 M fp32 parameters (6.3 MB, every dimension divisible by n = 4, so nothing is padded).
Around each step every rank passes a barrier, local rank 0 of each node reads its node's
counters (``paro_fsdp.cluster.node_counters``: /sys/class/net inside the namespace), and a
second barrier lets the step begin; after the step (its sync_p included), a barrier and a
second reading. The bytes each node sent (tx) and received (rx) on ``eth0`` during the step
must be at least ``m`` times the inter-group bytes per rank of
``paro_fsdp.formulas.comm_bytes`` (the payload) and at most 3% more, after subtracting the
barriers' own traffic; loopback bytes must be within 3% of ``m`` times the intra-group
formula. Local rank 0's counted inter-group bytes (``comm_stats``) equal the formula exactly.

What else crosses the link, measured on a 2-core machine under heavy load:

- The barriers inside the window: the same pattern with nothing between the readings (three
  times per job) reads 1.7-3.0 KB per node. Subtracted (the largest reading).
- Headers: 66 bytes per packet (14 Ethernet + 20 IP + 32 TCP with timestamps). veth passes
  GSO super-packets whole (the ``tbf`` bucket is at least 128 KiB), so a step of 6.3-19 MB
  takes only 240-840 packets counting the ACKs for what the node receives (every collective
  here is symmetric): 16-55 KB.
- 3-18 KB more per step: gloo's TCP transport puts a 48-byte preamble before every message,
  ACKs carry SACK options, and TCP's tail-loss probes resend one segment (at most 1.5 KB)
  when an ACK is late: 0-13 probes per step here.
- Overhead beyond formula + barriers: 19-71 KB, +0.28% to +0.56% of the formula for every
  strategy and node (loopback: +0.17% to +0.43%). The 3% bound leaves 5x margin, and is
  still 8x smaller than the least that a misplaced collective would add (a quarter of the
  model, 1.58 MB, is 25% of the smallest step's 6.3 MB).
- A real retransmission (an RTO or fast retransmit, which may resend a whole window) makes
  a reading meaningless: once, before this was handled, a step read +2.4% with 135 KB
  beyond the headers. The worker reads the node's TCP counters (/proc/net/snmp and netstat
  inside the namespace) with the link's, and measures a strategy again (fresh model, at most
  3 attempts, reported) when any rank's node retransmitted other than by a probe.
- Outside the windows, not measured: rendezvous, process-group and connection set-up, and
  torchrun's keep-alives to the rendezvous store on node 0.

The same job runs again with the inter-group traffic quantized (int8 parameters and gradients,
``InterQuant``), on a model 4x as large (6.3 M parameters, so that the quantized step moves
about as many bytes as the exact one): the link must then carry the quantized formula's bytes
(payload and scales) within the same 3%, and the loopback the exact intra-group bytes.

The printed table (``-s``) has every number above per strategy and node.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from paro_fsdp import InterQuant, ParoStrategy
from paro_fsdp.cluster import EmulatedCluster, missing_requirements
from paro_fsdp.comm.stats import INTER, INTRA
from paro_fsdp.formulas import TRAINING_PHASES, Topology, comm_bytes

TESTS = Path(__file__).resolve().parent
CODES = [str(s) for s in ParoStrategy.all_valid()]
NODES, RANKS_PER_NODE, ACCUM = 2, 2, 2
DIM, DEPTH = 512, 4
QUANT = InterQuant(params="int8", grads="int8")
QUANT_DIM = 1024
TOLERANCE = 0.03
COUNTERS = ("tx", "rx", "lo")

_reason = missing_requirements()
needs_root = pytest.mark.skipif(_reason is not None, reason=f"emulated cluster unavailable: {_reason}")

# Runs on every rank under torchrun; argv[1] is the JSON configuration the ``wire`` fixture passes.
WORKER = r"""
import json, os, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["tests"])
from models import Net
from paro_fsdp import InterQuant, ParoOptimizer, comm_stats, paro_parallelize
from paro_fsdp.cluster import node_counters

dist.init_process_group("gloo")
rank = dist.get_rank()
reader = int(os.environ["LOCAL_RANK"]) == 0  # one reading per node: the counters are the node's
mesh = init_device_mesh("cpu", (cfg["nodes"], cfg["ranks_per_node"]), mesh_dim_names=("dp_replicate", "dp_shard"))
dims = dict(dim=cfg["dim"], depth=cfg["depth"], in_features=cfg["dim"], out_features=cfg["dim"])
gen = torch.Generator().manual_seed(rank)
data = [torch.randn(4, cfg["dim"], generator=gen) for _ in range(cfg["accum"])]
KEYS = ("tx", "rx", "lo", "tx_packets", "rx_packets", "retrans", "probes", "timeouts")


def link_packets():
    path = f"/sys/class/net/{os.environ['PARO_CLUSTER_IFNAME']}/statistics/"
    return [int(open(path + name).read()) for name in ("tx_packets", "rx_packets")]


def tcp():
    # The node's TCP retransmitted segments, tail-loss probes and retransmission timeouts (the
    # node's network namespace has its own /proc/net).
    values = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        rows = [line.split() for line in open(path)]
        for head, row in zip(rows[::2], rows[1::2]):
            values.update({head[0] + k: int(v) for k, v in zip(head[1:], row[1:])})
    return [values["Tcp:RetransSegs"], values["TcpExt:TCPLossProbes"], values["TcpExt:TCPTimeouts"]]


def read():
    c = node_counters()
    return [c.tx, c.rx, c.loopback, *link_packets(), *tcp()]


def measure(body):
    dist.barrier()
    before = read() if reader else None
    dist.barrier()  # nobody sends before the node's counters are read
    body()
    dist.barrier()  # everything the body sent has been received
    after = read() if reader else None
    dist.barrier()  # nobody sends before the counters are read again
    return None if before is None else dict(zip(KEYS, (a - b for a, b in zip(after, before))))


def report(key, value):
    if value is not None:
        print("WIRE " + json.dumps({"key": key, "value": value}) + "\n", end="", flush=True)


report("baseline0", measure(lambda: None))
for i, code in enumerate(cfg["codes"]):
    for attempt in range(1, 4):
        torch.manual_seed(0)
        model = Net(**dims)
        quant = InterQuant(**cfg["quant"]) if cfg["quant"] else None
        model = paro_parallelize(model, mesh, code, blocks=model.units(), quant=quant)
        opt = ParoOptimizer(model, torch.optim.SGD, lr=1e-3)
        comm_stats(model).reset()

        def step():
            for a, x in enumerate(data):
                model.set_requires_gradient_sync(a == len(data) - 1)
                (model(x).square().mean() / len(data)).backward()
            opt.step()
            opt.zero_grad()
            # The step ends when its parameter updates (sync_p) have landed: where the optimizer
            # leaves them in flight, wait_parameters() finishes them (a local state dict read
            # waits for them too, sending nothing).
            getattr(model, "wait_parameters", model.state_dict)()

        wire = measure(step)
        # A retransmission other than a tail-loss probe (one segment) may resend a window of
        # data: the reading is then not the step's traffic, so the step is measured again.
        resent = torch.tensor([0 if wire is None else max(wire["retrans"] - wire["probes"], 0) + wire["timeouts"]])
        dist.all_reduce(resent, op=dist.ReduceOp.MAX)
        if resent.item() == 0:
            break
    report(code, None if wire is None else {"wire": wire, "counted": comm_stats(model).as_dict(), "attempts": attempt})
    del model, opt
    if i == len(cfg["codes"]) // 2:
        report("baseline1", measure(lambda: None))
report("baseline2", measure(lambda: None))
if rank == 0:
    report("psi", sum(p.numel() for p in Net(**dims).parameters()))
dist.destroy_process_group()
"""


def _expected_node_bytes(code: str, psi: int, link: str, quant: InterQuant | None) -> float:
    """Bytes one node's ranks send on ``link`` in one step: m times the formula per rank."""
    per_rank = comm_bytes(code, Topology(NODES, RANKS_PER_NODE), psi, accum=ACCUM, quant=quant)
    return RANKS_PER_NODE * sum(per_rank[ph][link] for ph in TRAINING_PHASES)


@pytest.fixture(scope="module", params=[None, QUANT], ids=["exact", "int8"])
def wire(request, tmp_path_factory):
    if _reason is not None:
        pytest.skip(f"emulated cluster unavailable: {_reason}")
    quant = request.param
    script = tmp_path_factory.mktemp("wire") / "wire_worker.py"
    script.write_text(WORKER)
    cfg = {"tests": str(TESTS), "codes": CODES, "nodes": NODES, "ranks_per_node": RANKS_PER_NODE,
           "dim": QUANT_DIM if quant else DIM, "depth": DEPTH, "accum": ACCUM,
           "quant": None if quant is None else {"params": quant.params, "grads": quant.grads,
                                                "block_size": quant.block_size}}
    echoed: list[str] = []
    with EmulatedCluster(NODES, RANKS_PER_NODE, "1gbit") as cluster:
        result = cluster.run([str(script), json.dumps(cfg)], timeout=300, echo=echoed.append)
    assert result.ok, "\n".join(echoed[-60:])
    nodes: list[dict] = []
    for node in result.nodes:
        values = {}
        for line in node.output:
            if line.startswith("WIRE "):
                record = json.loads(line[5:])
                values[record["key"]] = record["value"]
        nodes.append(values)
    # The measurement's own traffic (its barriers), per node and counter: the largest of 3 readings.
    baseline = [{c: max(v[f"baseline{i}"][c] for i in range(3)) for c in COUNTERS} for v in nodes]
    psi = next(v["psi"] for v in nodes if "psi" in v)
    lines = [f"psi = {psi}; barrier-only readings (tx bytes) per node: "
             f"{[[v[f'baseline{i}']['tx'] for i in range(3)] for v in nodes]}"]
    for code in CODES:
        inter, intra = _expected_node_bytes(code, psi, INTER, quant), _expected_node_bytes(code, psi, INTRA, None)
        for node, values in enumerate(nodes):
            w = values[code]["wire"]
            extra = w["tx"] - baseline[node]["tx"] - inter
            lines.append(
                f"{code} node{node}: link formula {inter:9.0f} B, tx {w['tx']:9d} B (rx {w['rx']:9d}), "
                f"beyond formula + barriers {extra:6.0f} B = {extra / inter:.3%}, {w['tx_packets']} tx packets, "
                f"{extra - 66 * w['tx_packets']:6.0f} B beyond 66 B each | loopback {w['lo']:9d} B, "
                f"intra formula {intra:9.0f} B ({(w['lo'] - baseline[node]['lo'] - intra) / intra:+.3%})"
                f" | attempts {values[code]['attempts']}, retransmitted segments {w['retrans']}, "
                f"tail-loss probes {w['probes']}")
    print("\n".join(["", *lines]))
    return {"nodes": nodes, "baseline": baseline, "psi": psi, "quant": quant}


@needs_root
@pytest.mark.parametrize("code", CODES)
def test_link_bytes_match_formula(wire, code):
    inter = _expected_node_bytes(code, wire["psi"], INTER, wire["quant"])
    assert inter > 0  # with 2 groups every strategy sums gradients across them
    for node, values in enumerate(wire["nodes"]):
        w, base = values[code]["wire"], wire["baseline"][node]
        counted = sum(values[code]["counted"][ph][INTER] for ph in TRAINING_PHASES)
        if wire["quant"] is None:
            assert counted == inter / RANKS_PER_NODE, f"{code}: local rank 0 counted {counted} inter bytes"
        else:  # the formula leaves out each chunk's rounding to whole blocks and 4 bytes
            assert inter / RANKS_PER_NODE <= counted <= 1.005 * inter / RANKS_PER_NODE, (
                f"{code}: local rank 0 counted {counted} quantized inter bytes, formula {inter / RANKS_PER_NODE}")
        for counter in ("tx", "rx"):  # what left the node, and what reached it
            assert w[counter] >= inter, f"{code} node {node}: {counter} {w[counter]} < payload {inter:.0f}"
            assert w[counter] - base[counter] <= (1 + TOLERANCE) * inter, (
                f"{code} node {node}: {counter} {w[counter]} bytes ({base[counter]} of them the barriers') "
                f"on the link, formula {inter:.0f} (m x inter per rank); {values[code]['attempts']} attempt(s), "
                f"{w['retrans']} retransmitted segments, {w['probes']} tail-loss probes")


@needs_root
@pytest.mark.parametrize("code", CODES)
def test_loopback_bytes_match_formula(wire, code):
    """Intra-group traffic stays on each node's loopback, in the formula's amount."""
    intra = _expected_node_bytes(code, wire["psi"], INTRA, None)
    for node, values in enumerate(wire["nodes"]):
        lo = values[code]["wire"]["lo"] - wire["baseline"][node]["lo"]
        assert abs(lo - intra) <= TOLERANCE * intra, f"{code} node {node}: loopback {lo}, formula {intra:.0f}"


@needs_root
def test_barrier_baseline_is_small(wire):
    """The measurement's own traffic is small against the smallest step (6.3 MB): it hides nothing."""
    for node, values in enumerate(wire["nodes"]):
        for counter in COUNTERS:
            readings = [values[f"baseline{i}"][counter] for i in range(3)]
            assert max(readings) < 16384, f"node {node}: barrier-only {counter} readings {readings}"
