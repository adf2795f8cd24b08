"""The transition table against PARO.md's formulas (typed in independently in ``paro_oracle``)."""

from __future__ import annotations

import pytest

from paro_fsdp import transitions as tr
from paro_fsdp.formulas import Topology, comm_elements
from paro_fsdp.strategy import Granularity, ParoStrategy
from paro_oracle import comm_elements as oracle_elements

N, I, G = Granularity.N, Granularity.I, Granularity.G


@pytest.mark.parametrize("groups,group_size", [(2, 2), (2, 4), (4, 2), (3, 5), (16, 8), (1, 4), (4, 1)])
@pytest.mark.parametrize("accum", [1, 4])
def test_table_bytes_equal_published_formulas(groups: int, group_size: int, accum: int) -> None:
    topo = Topology(groups, group_size)
    for s in ParoStrategy.all_valid():
        got = comm_elements(s, topo, 1000.0, 250.0, accum)
        want = oracle_elements(s, topo, 1000.0, 250.0, accum)
        for phase, links in want.items():
            for link, value in links.items():
                assert got[phase][link] == pytest.approx(value, abs=1e-9), (s.code, phase, link)


def test_directions_are_checked() -> None:
    with pytest.raises(ValueError, match="finer"):
        tr.reduce(G, N)
    with pytest.raises(ValueError, match="coarser"):
        tr.gather(N, G)
    assert tr.reduce(I, I).steps == () and tr.gather(G, G).steps == () and tr.complete(G).steps == ()


def test_global_phases_are_the_hierarchical_ones() -> None:
    # HO-Ring pipelines exactly the phases that are one collective spanning both links.
    plans = {s.code: tr.phase_plan(s) for s in ParoStrategy.all_valid()}
    assert plans["GGG"]["param_gather"].is_global and plans["GGG"]["grad_reduce"].is_global
    assert plans["NNN"]["sync_g"].is_global and plans["NNG"]["sync_g"].is_global
    assert not plans["NNI"]["sync_g"].is_global  # intra reduce-scatter, then an inter all-reduce
    assert not plans["IIG"]["param_gather"].is_global and plans["NIG"]["sync_p"].is_global
    # With P=I, FSDP2 reduces over the group before the engine reduces across groups.
    assert not plans["IGG"]["grad_reduce"].is_global and not plans["ING"]["sync_g"].is_global
    assert plans["NGG"]["grad_reduce"].is_global and plans["NNG"]["sync_g"].is_global
