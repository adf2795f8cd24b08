"""The emulated cluster: runs torchrun per node, measures link bytes, always tears down.

Needs root (network namespaces); without it the cluster tests are skipped with the reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from paro_fsdp.cluster import (
    ClusterError,
    ClusterPermissionError,
    EmulatedCluster,
    cleanup_namespaces,
    missing_requirements,
    parse_rate,
)
from paro_fsdp.cluster import launch, network
from paro_fsdp.cluster.network import _node_addresses, list_namespaces

REPO = Path(__file__).resolve().parents[1]
_reason = missing_requirements()
needs_root = pytest.mark.skipif(_reason is not None, reason=f"emulated cluster unavailable: {_reason}")

PER_RANK_FLOATS = 1 << 20  # 4 MiB per rank

ALL_GATHER = textwrap.dedent(f"""
    import os, torch, torch.distributed as dist
    from paro_fsdp.cluster import node_counters
    from paro_fsdp.comm.torch_compat import all_gather_single
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    def say(line):  # one write per line, so the ranks of a node do not interleave
        print(line + "\\n", end="", flush=True)
    say(f"rank={{rank}} node={{os.environ['PARO_CLUSTER_NODE']}}")
    x = torch.full(({PER_RANK_FLOATS},), float(rank))
    out = torch.empty(world * x.numel())
    dist.barrier()
    before = node_counters()
    dist.barrier()  # nobody sends before every rank has read its counters
    all_gather_single(out, x)
    dist.barrier()
    sent = (node_counters() - before).tx
    assert torch.equal(out.view(world, -1)[:, 0], torch.arange(world, dtype=torch.float))
    say(f"gathered rank={{rank}} tx={{sent}}")
    dist.destroy_process_group()
""")


def _own_namespaces() -> list[str]:
    return [n for n in list_namespaces() if n.startswith(f"paro-{os.getpid()}-")]


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


@pytest.fixture
def leaves_nothing():
    """The test's clusters must leave no namespace and no interface behind."""
    links = _root_links()
    yield
    assert _own_namespaces() == []
    assert _root_links() == links


def _script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_parse_rate():
    assert parse_rate("250mbit") == 250_000_000
    assert parse_rate("1gbit") == 10**9
    assert parse_rate("1.5Gbit") == 1_500_000_000
    assert parse_rate("100mbps") == 800_000_000
    for bad in ("fast", "10", "0mbit", "5 parsecs"):
        with pytest.raises(ValueError, match="link rate"):
            parse_rate(bad)


def test_node_addresses_sort_as_strings_in_node_order():
    # torchrun's c10d rendezvous orders nodes by address string: node i must get ranks i*M...
    for subnet, nodes in (("10.77.0.0/24", 150), ("10.77.0.0/16", 20)):
        addresses = [str(a.ip) for a in _node_addresses(subnet, nodes)]
        assert sorted(addresses) == addresses and len(set(addresses)) == nodes
    with pytest.raises(ValueError, match="too few addresses"):
        _node_addresses("10.77.0.0/30", 3)


def test_without_privileges_it_says_why(monkeypatch):
    monkeypatch.setattr(network.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(network, "_effective_capabilities", lambda: 0)
    with pytest.raises(ClusterPermissionError, match="needs root"):
        with EmulatedCluster(2, 1, "1gbit"):
            pass


def test_missing_tools_are_named(monkeypatch):
    monkeypatch.setattr(network.shutil, "which", lambda tool: None if tool == "tc" else f"/usr/sbin/{tool}")
    assert missing_requirements().startswith("tc not found on PATH")


@needs_root
def test_run_outside_the_context_is_an_error():
    with pytest.raises(ClusterError, match="inside `with EmulatedCluster"):
        EmulatedCluster(2, 1, "1gbit").run(["script.py"])


@needs_root
def test_all_gather_on_two_nodes(tmp_path, leaves_nothing):
    script = _script(tmp_path, "all_gather.py", ALL_GATHER)
    echoed: list[str] = []
    with EmulatedCluster(2, 2, "1gbit") as cluster:
        assert len(_own_namespaces()) == 3  # switch + 2 nodes
        result = cluster.run([script], timeout=120, echo=echoed.append)
    assert result.ok, "\n".join(echoed)
    # Group-major ranks: node i runs ranks 2i and 2i+1.
    for node in result.nodes:
        ranks = {line for line in node.output if line.startswith("rank=")}
        assert ranks == {f"rank={2 * node.node + j} node={node.node}" for j in range(2)}
    assert any(line.startswith("[node0] rank=") for line in echoed)
    assert result.summary()[0].startswith("node0: exit 0, link eth0 tx ")
    assert any(line.startswith("[node1] rank=") for line in echoed)
    # Ring 0-1-2-3-0 crosses each node's link once per direction with 3 of the 4 blocks.
    expected = 3 * PER_RANK_FLOATS * 4
    for node in result.nodes:
        assert expected <= node.bytes.tx <= 1.05 * expected
        assert expected <= node.bytes.rx <= 1.05 * expected
        assert node.bytes.loopback >= expected  # the intra-node ring edge
        in_script = [int(line.split("tx=")[1]) for line in node.output if line.startswith("gathered")]
        assert len(in_script) == 2 and all(expected <= tx <= 1.05 * expected for tx in in_script)


@needs_root
def test_failing_node_stops_the_others(tmp_path, leaves_nothing):
    script = _script(tmp_path, "fail.py", """
        import os, sys, time
        if os.environ["PARO_CLUSTER_NODE"] == "0":
            sys.exit(3)
        time.sleep(600)
    """)
    with EmulatedCluster(2, 1, "1gbit") as cluster:
        result = cluster.run([script], timeout=120, echo=lambda line: None)
    assert not result.ok and not result.timed_out
    assert result.nodes[0].returncode != 0
    assert result.nodes[1].returncode != 0  # stopped, not left sleeping
    assert result.elapsed_s < 60


@needs_root
def test_timeout_stops_everything(tmp_path, leaves_nothing):
    script = _script(tmp_path, "hang.py", """
        import time
        print("started", flush=True)
        time.sleep(600)
    """)
    with EmulatedCluster(2, 1, "1gbit") as cluster:
        result = cluster.run([script], timeout=5, echo=lambda line: None)
        pids = [pid for ns in cluster.topology.nodes for pid in subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()]
    assert result.timed_out and not result.ok
    assert pids == []


@needs_root
def test_command_line_prefixes_reports_and_cleans_up_on_sigterm(tmp_path, leaves_nothing):
    script = _script(tmp_path, "hang.py", """
        import os, time
        print("ready", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-m", "paro_fsdp.cluster", "--nodes", "2", "--ranks-per-node", "1",
         "--inter-bw", "500mbit", "--", script],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    ready = set()
    assert proc.stdout is not None
    deadline = time.monotonic() + 90
    for line in proc.stdout:
        if line.rstrip().endswith("] ready"):
            ready.add(line.split("]")[0] + "]")
        if len(ready) == 2 or time.monotonic() > deadline:
            break
    assert ready == {"[node0]", "[node1]"}
    namespaces = [n for n in list_namespaces() if n.startswith(f"paro-{proc.pid}-")]
    assert len(namespaces) == 3
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, rest
    assert "stopped by SIGTERM" in rest
    assert not set(namespaces) & set(list_namespaces())


@needs_root
def test_cleanup_removes_only_leftovers_of_dead_owners(leaves_nothing):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = f"paro-{dead.pid}-0-sw", f"paro-{os.getpid()}-99-sw"
    for namespace in (stale, live):
        subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        assert stale in cleanup_namespaces(None)
        assert live in list_namespaces() and stale not in list_namespaces()
        assert cleanup_namespaces(os.getpid()) == [live]
    finally:
        for namespace in (stale, live):
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)


def test_node_environment(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "192.0.2.1")
    monkeypatch.setattr(launch, "_gpu_count", lambda: 4)
    cluster = EmulatedCluster(2, 2, "250mbit")
    env = cluster.environment(1)
    assert env["GLOO_SOCKET_IFNAME"] == env["PARO_CLUSTER_IFNAME"] == "eth0"
    assert env["PARO_CLUSTER_NODE"] == "1" and env["PARO_CLUSTER_LINK_BITS"] == "250000000"
    assert "MASTER_ADDR" not in env  # torchrun takes it from the rendezvous on node 0
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"  # node 1's own GPUs
    assert str(REPO) in env["PYTHONPATH"].split(os.pathsep)
    monkeypatch.setattr(launch, "_gpu_count", lambda: 2)  # fewer GPUs than ranks: leave them alone
    assert "CUDA_VISIBLE_DEVICES" not in cluster.environment(1)
    command = cluster.command(1, ["-m", "some.module", "--flag"])
    assert command[:4] == ["ip", "netns", "exec", cluster.topology.nodes[1]]
    assert command[command.index("--local-addr") + 1] == cluster.addresses[1]
    assert command[-3:] == ["-m", "some.module", "--flag"]
    assert command[command.index("--max-restarts") + 1] == "0"
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env


def test_restarts_get_a_fresh_store_per_round():
    cluster = EmulatedCluster(2, 2, "250mbit", max_restarts=2)
    assert cluster.command(0, ["x.py"])[cluster.command(0, ["x.py"]).index("--max-restarts") + 1] == "2"
    assert cluster.environment(0)["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    with pytest.raises(ValueError, match="max_restarts"):
        EmulatedCluster(2, 2, "250mbit", max_restarts=-1)
