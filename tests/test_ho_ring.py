"""HO-Ring collectives, their FSDP2 adapters and their process group, on gloo meshes.

One process group per mesh shape runs every case; results are compared with the flat gloo
collective over the flattened mesh (the world group here, group-major like the mesh). Data are
small integers, so sums and averages over 4 or 8 ranks are exact in fp32 and bf16 and results
can be compared bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from paro_fsdp.comm.torch_compat import all_gather_single, reduce_scatter_single

SIZES = (1, 13, 100)  # elements per rank: one, not divisible by n (uneven chunks), several chunks
CHUNKS = (1, 3, 16)  # 16 > some sizes: chunks are capped by the data
DTYPES = (torch.float32, torch.bfloat16)
SUM, AVG = dist.ReduceOp.SUM, dist.ReduceOp.AVG


def _ints(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (numel,), generator=gen).to(dtype)


def _flat_all_gather(x: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(dist.get_world_size() * x.numel())
    all_gather_single(out, x)
    return out


def _flat_reduce_scatter(x: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    n = dist.get_world_size()
    out = torch.empty(x.numel() // n)
    reduce_scatter_single(out, x.float())  # gloo has no AVG: sum, then divide
    return (out / n if op == AVG else out).to(x.dtype)


def _flat_all_reduce(x: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    out = x.float()
    dist.all_reduce(out)
    return (out / dist.get_world_size() if op == AVG else out).to(x.dtype)


def _expect_bytes(stats, intra: int, inter: int, what: str) -> None:
    from paro_fsdp.comm.stats import INTER, INTRA

    got = (stats.get(link=INTRA), stats.get(link=INTER))
    assert got == (intra, inter), f"{what}: sent (intra, inter) = {got}, expected {(intra, inter)}"


def _copied(collective, *args) -> int:  # noqa: ANN001
    from benchmarks.local_copies import CopyCounter

    with CopyCounter() as counter:
        collective(*args)
    return counter.bytes


def _check_collectives(mesh, g: int, m: int) -> None:
    """Every size, dtype, op and chunk count, HO-Ring and two-phase, against the flat
    collective, with byte counts."""
    from paro_fsdp.comm import HierarchicalCollectives, HORingCollectives, MeshGroups

    n, rank = g * m, dist.get_rank()
    groups = MeshGroups(mesh)
    stats = groups.stats
    candidates = [HORingCollectives(groups, chunks=chunks, min_chunk_bytes=0) for chunks in CHUNKS]
    for ho in candidates + [HierarchicalCollectives(groups)]:
        for dtype in DTYPES:
            es = torch.tensor([], dtype=dtype).element_size()
            for s in SIZES:
                case = f"{ho.name} chunks={getattr(ho, 'chunks', None)} dtype={dtype} size={s}"
                x = _ints(s, dtype, seed=rank * 1000 + s)
                out = x.new_empty(n * s)
                stats.reset()
                ho.all_gather(out, x)
                assert torch.equal(out, _flat_all_gather(x)), f"all_gather {case}"
                _expect_bytes(stats, (m - 1) * n * s * es // m, (g - 1) * s * es, f"all_gather {case}")

                full = _ints(n * s, dtype, seed=rank * 1000 + s + 1)
                for op in (SUM, AVG):
                    out = x.new_empty(s)
                    stats.reset()
                    ho.reduce_scatter(out, full, op)
                    assert torch.equal(out, _flat_reduce_scatter(full, op)), f"reduce_scatter {op} {case}"
                    _expect_bytes(stats, (m - 1) * n * s * es // m, (g - 1) * s * es, f"reduce_scatter {case}")

                    t = full[: s * m + 1].clone()  # any size: padded inside (HO-Ring to n, two-phase to m)
                    pad = n if isinstance(ho, HORingCollectives) else m
                    padded = -(-t.numel() // pad) * pad
                    stats.reset()
                    ho.all_reduce(t, op)
                    assert torch.equal(t, _flat_all_reduce(full[: s * m + 1], op)), f"all_reduce {op} {case}"
                    _expect_bytes(stats, 2 * (m - 1) * padded * es // m, 2 * (g - 1) * (padded // m) * es // g,
                                  f"all_reduce {case}")

    # No full-size permutation copy where each group's blocks are contiguous (the two-phase
    # collectives, HO-Ring in one chunk); HO-Ring's S-chunks have strided rows and permute.
    s = 100
    x, full = _ints(s, torch.float32, seed=rank), _ints(n * s, torch.float32, seed=rank + 1)
    for ho, expected in ((HierarchicalCollectives(groups), 0), (candidates[0], 0), (candidates[1], 4 * n * s)):
        what = f"{ho.name} chunks={getattr(ho, 'chunks', None)}"
        assert _copied(ho.all_gather, x.new_empty(n * s), x) == expected, f"all_gather {what}"
        assert _copied(ho.reduce_scatter, x.new_empty(s), full) == expected, f"reduce_scatter {what}"

    # Real-valued fp32 data: same result up to summation order.
    ho = HORingCollectives(groups, chunks=3, min_chunk_bytes=0)
    x = torch.randn(n * 37, generator=torch.Generator().manual_seed(rank))
    out = torch.empty(37)
    ho.reduce_scatter(out, x, AVG)
    torch.testing.assert_close(out, _flat_reduce_scatter(x, AVG), rtol=1e-6, atol=1e-6)
    t = x.clone()
    ho.all_reduce(t)
    torch.testing.assert_close(t, _flat_all_reduce(x, SUM), rtol=1e-6, atol=1e-6)


def _check_async_and_api(mesh, g: int, m: int) -> None:
    """Concurrent async operations waited out of order; module functions; phases; errors."""
    import paro_fsdp.comm as comm
    from paro_fsdp.comm.stats import INTER

    n, rank = g * m, dist.get_rank()
    ho = comm.HORingCollectives(comm.MeshGroups(mesh), chunks=3, min_chunk_bytes=0)
    a, b, c, d = (_ints(k, torch.float32, seed=rank * 7 + k) for k in (11, 5 * n, 29, 4))
    out_a, out_b, t_c, out_d = a.new_empty(n * 11), b.new_empty(5), c.clone(), d.new_empty(n * 4)
    works = [
        ho.all_gather(out_a, a, async_op=True),
        ho.reduce_scatter(out_b, b, AVG, async_op=True),
        ho.all_reduce(t_c, SUM, async_op=True),
        comm.all_gather(out_d, d, mesh, async_op=True),
    ]
    assert all(isinstance(w, dist.Work) for w in works)
    assert not any(w.is_completed() for w in works[:3])
    for i in (2, 0, 3, 1):
        works[i].wait()
    assert works[1].get_future().wait() == [out_b]
    assert torch.equal(out_a, _flat_all_gather(a))
    assert torch.equal(out_b, _flat_reduce_scatter(b, AVG))
    assert torch.equal(t_c, _flat_all_reduce(c, SUM))
    assert torch.equal(out_d, _flat_all_gather(d))

    # Module-level functions share one HO-Ring object per mesh; bytes go to the caller's phase.
    shared = comm.collectives_for(mesh)
    assert comm.collectives_for(mesh) is shared
    shared.groups.stats.reset()
    with comm.phase("sync_g"):
        out = torch.empty(n * 6)
        comm.all_gather(out, torch.full((6,), float(rank)), mesh)
        t = torch.ones(2 * n)
        comm.all_reduce(t, mesh, AVG)
        r = torch.empty(2)
        comm.reduce_scatter(r, torch.ones(2 * n), mesh)
    assert torch.equal(out, torch.arange(n, dtype=torch.float32).repeat_interleave(6))
    assert torch.equal(t, torch.ones(2 * n)) and torch.equal(r, torch.full((2,), float(n)))
    inter = (g - 1) * 6 * 4 + 2 * (g - 1) * 2 * n * 4 // n + (g - 1) * 2 * 4
    assert shared.groups.stats.get("sync_g", INTER) == inter == shared.groups.stats.get(link=INTER)

    with pytest.raises(ValueError, match="SUM and ReduceOp.AVG"):
        ho.all_reduce(torch.ones(4), dist.ReduceOp.MAX)
    with pytest.raises(ValueError, match="floating-point"):
        ho.all_reduce(torch.ones(4, dtype=torch.int64), AVG)
    with pytest.raises(ValueError, match="world x input"):
        ho.all_gather(torch.empty(3), torch.ones(2))
    with pytest.raises(ValueError, match="chunks"):
        comm.HORingCollectives(ho.groups, chunks=0)


def _check_process_group(mesh, g: int, m: int) -> None:
    """The HO-Ring ProcessGroup under torch.distributed calls and DTensor redistribution."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from paro_fsdp.comm import ho_ring_process_group
    from paro_fsdp.comm.stats import INTER

    n, rank = g * m, dist.get_rank()
    pg = ho_ring_process_group(mesh)
    assert ho_ring_process_group(mesh) is pg and isinstance(pg, dist.ProcessGroup)
    assert (dist.get_rank(pg), pg.size(), dist.get_backend(pg)) == (rank, n, "paro_ho_ring")
    stats = pg.collectives.groups.stats
    stats.reset()

    x = _ints(5, torch.float32, seed=rank)
    out = x.new_empty(5 * n)
    all_gather_single(out, x, group=pg)
    assert torch.equal(out, _flat_all_gather(x))
    assert stats.get(link=INTER) == (g - 1) * 5 * 4
    full = _ints(3 * n, torch.float32, seed=rank + 50)
    r = torch.empty(3)
    reduce_scatter_single(r, full, op=AVG, group=pg)
    assert torch.equal(r, _flat_reduce_scatter(full, AVG))
    t = full.clone()
    dist.all_reduce(t, group=pg)
    assert torch.equal(t, _flat_all_reduce(full, SUM))
    before = stats.get()
    t = torch.full((3,), float(rank))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=pg)  # not HO-Ring: the wrapped group does it
    assert torch.equal(t, torch.full((3,), float(n - 1))) and stats.get() == before
    b = torch.full((2,), float(rank))
    dist.broadcast(b, src=n - 1, group=pg)
    dist.barrier(group=pg)
    assert torch.equal(b, torch.full((2,), float(n - 1)))

    dm = DeviceMesh.from_group(pg, mesh.device_type)
    whole = torch.arange(n * 6, dtype=torch.float32).view(2 * n, 3)
    stats.reset()
    replicated = distribute_tensor(whole, dm, [Shard(0)]).redistribute(dm, [Replicate()])
    assert torch.equal(replicated.to_local(), whole)
    assert stats.get(link=INTER) == (g - 1) * 6 * 4  # the all-gather of 6 elements per rank
    mine = torch.full((2 * n, 3), float(rank + 1))
    total = float(n * (n + 1) // 2)
    shard = DTensor.from_local(mine, dm, [Partial()]).redistribute(dm, [Shard(0)]).to_local()
    assert torch.equal(shard, torch.full((2, 3), total))
    for reduce_op, expected in (("sum", total), ("avg", total / n)):
        rep = DTensor.from_local(mine[:5], dm, [Partial(reduce_op)]).redistribute(dm, [Replicate()])
        assert torch.equal(rep.to_local(), torch.full((5, 3), expected)), reduce_op


def _train(shard_mesh, configure) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    from models import Net, batch, loss_fn
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Net(dim=8)
    for unit in model.units():
        fully_shard(unit, mesh=shard_mesh)
    fully_shard(model, mesh=shard_mesh)
    configure(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        loss_fn(model, batch(step, 0, dist.get_rank())).backward()
        opt.step()
        opt.zero_grad()
    return model, [p.full_tensor() for p in model.parameters()]


def _check_fsdp(mesh, g: int, m: int) -> None:
    """Plain fully_shard trained with HO-Ring (adapters, or the process group) = flat FSDP."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule

    from paro_fsdp.comm import MeshGroups, ho_ring_process_group, use_ho_ring
    from paro_fsdp.comm.stats import INTER, INTRA

    flat = MeshGroups(mesh).flat_mesh

    def force_sum(model) -> None:  # gloo has no AVG reduce-scatter
        for sub in model.modules():
            if isinstance(sub, FSDPModule):
                sub.set_force_sum_reduction_for_comms(True)

    _, reference = _train(flat, force_sum)
    stats = {}

    def ho_ring(model) -> None:
        stats["adapters"] = use_ho_ring(model, mesh).groups.stats
        stats["adapters"].reset()

    for name, shard_mesh, configure in (
        ("adapters", flat, ho_ring),
        ("process group", DeviceMesh.from_group(ho_ring_process_group(mesh), mesh.device_type), lambda _: None),
    ):
        model, params = _train(shard_mesh, configure)
        for p, ref in zip(params, reference, strict=True):
            torch.testing.assert_close(p, ref, rtol=1e-6, atol=1e-6, msg=lambda s: f"{name}: {s}")
        # An explicit async unshard: FSDP waits on the returned handle only if it is a dist.Work.
        model.head.unshard(async_op=True).wait()
        assert torch.equal(model.head.weight, params[-2]), f"{name}: async unshard"
        model.head.reshard()
    intra, inter = stats["adapters"].get(link=INTRA), stats["adapters"].get(link=INTER)
    # Every global collective of S bytes sends (m-1)/m*S intra and (g-1)/n*S inter: the two
    # totals stand as (m-1)*g : (g-1), whatever the collectives FSDP ran.
    assert inter > 0 and inter * (m - 1) * g == intra * (g - 1), (intra, inter)


def _worker(g: int, m: int, integration: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (g, m), mesh_dim_names=("dp_replicate", "dp_shard"))
    _check_collectives(mesh, g, m)
    _check_async_and_api(mesh, g, m)
    if integration:
        _check_process_group(mesh, g, m)
        _check_fsdp(mesh, g, m)


# FSDP and the process group only call the collectives: one shape with g != m covers them.
@pytest.mark.parametrize(("g", "m", "integration"), [(2, 2, False), (2, 4, False), (4, 2, True)],
                         ids=["2x2", "2x4", "4x2"])
def test_ho_ring(g: int, m: int, integration: bool) -> None:
    run_distributed(_worker, g * m, g, m, integration, timeout=300)
