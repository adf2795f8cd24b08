"""Link faults: a failed collective is named; a dead link fails every rank in bounded time; a short outage is survived.

The cluster tests need root and ``ip netns`` (skipped otherwise, with the reason). They share
one torchrun job (``tests/link_faults.py``): an uninterrupted pass, a pass with a 2 s outage of
node 1's link, and a pass whose link never comes back.
"""

from __future__ import annotations

import pickle
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from paro_fsdp.cluster import missing_requirements
from paro_fsdp.comm.errors import CollectiveError, Issued, failure_reason

import link_faults as lf

_reason = missing_requirements()
needs_root = pytest.mark.skipif(_reason is not None, reason=f"emulated cluster unavailable: {_reason}")

NODES, RANKS_PER_NODE = 2, 2
WORLD = NODES * RANKS_PER_NODE


def test_collective_error_names_what_was_issued():
    issued = Issued("all_to_all", "inter", (1, 3), "sync_g", purpose="reduce_scatter")
    cause = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation\nmore")
    error = CollectiveError(issued, cause, rank=3)
    text = str(error)
    for part in ("rank 3", "all_to_all (for reduce_scatter)", "inter link", "[1, 3]", "phase sync_g",
                 "timed out", "Timed out waiting 10000ms"):
        assert part in text
    assert "more" not in text  # first line of the cause only; the whole cause is chained
    assert (error.collective, error.purpose, error.link, error.ranks, error.phase, error.reason) == \
        ("all_to_all", "reduce_scatter", "inter", (1, 3), "sync_g", "timeout")
    assert isinstance(error, RuntimeError) and isinstance(error, dist.DistError)
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == text and copy.phase == "sync_g" and copy.ranks == (1, 3)


def test_failure_reasons():
    assert failure_reason(RuntimeError("Timed out waiting 5000ms for send operation to complete")) == "timeout"
    assert failure_reason(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.77.0.101]:123")) \
        == "connection"
    assert failure_reason(RuntimeError("Connection reset by peer")) == "connection"
    assert failure_reason(ValueError("something else")) == "error"


def _peer_leaves() -> dict:
    """Rank 1 leaves; rank 0's inter-group all-reduce, issued in sync_g and waited outside it, fails named."""
    from torch.distributed.device_mesh import init_device_mesh

    from paro_fsdp.comm.errors import group_timeout, set_collective_timeout
    from paro_fsdp.comm.groups import MeshGroups
    from paro_fsdp.comm.stats import INTER, phase
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(timedelta(seconds=20), dist.group.WORLD)  # as init_process_group(timeout=20 s)
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp_replicate", "dp_shard"))
    inter, intra = mesh.get_group("dp_replicate"), mesh.get_group("dp_shard")  # inter: the world's group
    before = group_timeout(intra)
    groups = MeshGroups(mesh)
    adopted = group_timeout(intra)
    t = torch.ones(1024)
    groups.all_reduce(t, INTER)  # the link works
    assert torch.equal(t, torch.full((1024,), 2.0))
    set_collective_timeout(15)
    shortened = group_timeout(inter)
    dist.barrier()
    if dist.get_rank() == 1:
        return {}
    with phase("sync_g"):
        pending = groups.start_all_reduce(torch.ones(1 << 16), INTER)
    try:
        for _ in range(3):  # the peer is gone: these cannot all complete
            pending.wait()
            with phase("sync_g"):
                pending = groups.start_all_reduce(torch.ones(1 << 16), INTER)
    except CollectiveError as e:
        return {"before": before, "adopted": adopted, "shortened": shortened, "error": e,
                "cause": type(e.__cause__).__name__}
    return {"before": before, "adopted": adopted, "error": None}


def test_failed_collective_names_phase_link_and_ranks():
    from dist_utils import run_distributed

    result = run_distributed(_peer_leaves, 2, timeout=300)[0]
    # A DeviceMesh's groups start at c10d's 30 min; PaRO's groups take the default group's timeout.
    assert result["before"] == timedelta(minutes=30) and result["adopted"] == timedelta(seconds=20)
    assert result["shortened"] == timedelta(seconds=15)
    error = result["error"]
    assert isinstance(error, CollectiveError), result
    assert (error.collective, error.link, error.ranks, error.phase, error.rank) == ("all_reduce", "inter", (0, 1), "sync_g", 0)
    assert error.reason in ("connection", "timeout") and error.timeout_s == 15
    assert error.elapsed_s < 15 + lf.DETECT_BOUND_S


@pytest.fixture(scope="module")
def scenario():
    lines: list[str] = []
    result = lf.run_scenario("IIG", NODES, RANKS_PER_NODE, echo=lines.append)
    return lf.analyze(result, WORLD), "\n".join(lines[-120:])


@needs_root
def test_short_outage_is_survived_with_the_same_losses(scenario):
    report, tail = scenario
    short = report["short"]
    assert short["outage_s"] is not None and short["outage_s"] >= lf.SHORT_OUTAGE_S - 0.1, tail
    assert short["failed_ranks"] == [], tail
    assert short["completed"] and short["losses_equal"], (short, tail)
    assert short["steps_after_outage"] > 0, "the outage must strike while the pass is still training"
    assert short["stall_s"] >= lf.SHORT_OUTAGE_S * 0.5, "a collective must have waited for the link"
    assert short["recover_s"] is not None and short["recover_s"] < lf.SURVIVE_TIMEOUT_S


@needs_root
def test_dead_link_fails_every_rank_with_a_named_collective(scenario):
    report, tail = scenario
    cut = report["cut"]
    assert not report["timed_out"], tail
    assert cut["at_wall"] is not None, tail
    assert cut["named_ranks"] == list(range(WORLD)), (cut, tail)
    inter_groups = [[r, r + RANKS_PER_NODE] for r in range(RANKS_PER_NODE)]
    intra_groups = [list(range(n * RANKS_PER_NODE, (n + 1) * RANKS_PER_NODE)) for n in range(NODES)]
    for rank, e in cut["errors"].items():
        assert e["collective"] in lf.COLLECTIVES and e["phase"] in lf.PHASES, e
        assert rank in e["ranks"] and e["ranks"] in (inter_groups if e["link"] == "inter" else intra_groups), e
        assert e["reason"] in ("timeout", "connection") and e["timeout_s"] == lf.FAIL_TIMEOUT_S, e
        assert e["collective"] in e["message"] and f"phase {e['phase']}" in e["message"], e
        assert e["after_cut_s"] <= lf.FAIL_TIMEOUT_S + lf.DETECT_BOUND_S, e
    assert any(e["link"] == "inter" for e in cut["errors"].values()), "the cut link must be named"
    # Nothing fails before the timeout (a rank may have been waiting a little before the cut).
    assert cut["detect_s"] >= lf.FAIL_TIMEOUT_S - 2, cut
    # Every rank's interpreter exited, with the error; node 0's torchrun saw its workers exit
    # and failed by itself (node 1's agent is cut off from the rendezvous store: the cluster stops it).
    assert cut["exited_ranks"] == list(range(WORLD)), (cut, tail)
    assert cut["exit_s"] <= lf.FAIL_TIMEOUT_S + lf.DETECT_BOUND_S, cut
    assert cut["host_node_exit_s"] is not None and cut["host_node_exit_s"] <= lf.FAIL_TIMEOUT_S + lf.EXIT_BOUND_S, \
        (cut, tail)
    assert all(code not in (None, 0) for code in report["returncodes"]), report


def test_link_down_option():
    from paro_fsdp.cluster.__main__ import _link_fault
    from paro_fsdp.cluster import LinkFault

    assert _link_fault(["1", "5", "2.5"], None) == LinkFault(node=1, duration_s=2.5, delay_s=5.0)
    assert _link_fault(["0", "0", "inf"], "step=3 ") == LinkFault(node=0, duration_s=None, delay_s=0.0, after="step=3 ")
    for bad in (["x", "1", "2"], ["1", "-1", "2"], ["1", "0", "0"]):
        with pytest.raises(ValueError, match="--link-down|NODE DELAY DURATION|DELAY >= 0"):
            _link_fault(bad, None)
