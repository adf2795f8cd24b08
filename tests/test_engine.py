"""The PaRO engine on 2x2 and 2x4 gloo meshes: numerics, bytes and memory for all 14 strategies.

Each mesh shape starts one process group and runs every strategy inside it.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh

from dist_utils import run_distributed
from models import Net, batch, loss_fn
from paro_fsdp import ParoOptimizer, ParoStrategy, comm_stats, memory_stats, paro_parallelize
from paro_fsdp.formulas import Topology, memory_bytes
from paro_oracle import TRAINING_PHASES, comm_bytes

CODES = [str(s) for s in ParoStrategy.all_valid()]
STEPS, ACCUM = 3, 2


def _reference(n: int) -> dict[str, torch.Tensor]:
    """Single-process AdamW on the union of all ranks' micro-batches (DDP's mean over n)."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for s in range(STEPS):
        loss = sum(loss_fn(model, batch(s, a, r)) for a in range(ACCUM) for r in range(n)) / (ACCUM * n)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach() for k, v in model.state_dict().items()}


def _mesh(g: int, m: int):
    return init_device_mesh("cpu", (g, m), mesh_dim_names=("dp_replicate", "dp_shard"))


def _numerics(g: int, m: int) -> dict[str, float]:
    mesh, rank = _mesh(g, m), dist.get_rank()
    ref = _reference(g * m)
    diffs = {}
    for code in CODES:
        torch.manual_seed(0)
        model = Net()
        model = paro_parallelize(model, mesh, code, blocks=model.units())
        opt = ParoOptimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
        for s in range(STEPS):
            for a in range(ACCUM):
                model.set_requires_gradient_sync(a == ACCUM - 1)
                (loss_fn(model, batch(s, a, rank)) / ACCUM).backward()
            opt.step()
            opt.zero_grad()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        diffs[code] = max((full[k] - ref[k]).abs().max().item() for k in ref)
    return diffs


DIM = 16  # every unit's row divides by n = 8, so no padding enters the byte counts


def _known_model() -> Net:
    return Net(dim=DIM, depth=2, in_features=DIM, out_features=DIM)


def _bytes_and_memory(g: int, m: int) -> dict[str, dict]:
    mesh, rank = _mesh(g, m), dist.get_rank()
    out = {}
    for code in CODES:
        for accum in (1, 3):
            torch.manual_seed(0)
            model = _known_model()
            model = paro_parallelize(model, mesh, code, blocks=model.units())
            opt = ParoOptimizer(model, torch.optim.AdamW, lr=1e-3)
            comm_stats(model).reset()
            grads_mid = None
            for a in range(accum):
                model.set_requires_gradient_sync(a == accum - 1)
                x = torch.randn(4, DIM)
                model(x).square().mean().backward()
                if a == 0 and accum > 1:
                    grads_mid = memory_stats(model)["grads"]
            opt.step()
            model.wait_parameters()  # the step's sync_p completes its last phase here
            measured = comm_stats(model).as_dict()
            mem = memory_stats(model)
            out[f"{code}/A{accum}"] = {"bytes": measured, "grads_mid": grads_mid, "params": mem["params"],
                                       "optim": mem["optim"], "psi": sum(p.numel() for p in _known_model().parameters())}
            opt.zero_grad()
    return out


@pytest.fixture(scope="module", params=[(2, 2), (2, 4)], ids=["2x2", "2x4"])
def mesh_shape(request):
    return request.param


@pytest.fixture(scope="module")
def numerics(mesh_shape):
    g, m = mesh_shape
    return run_distributed(_numerics, g * m, g, m)


@pytest.fixture(scope="module")
def costs(mesh_shape):
    g, m = mesh_shape
    return run_distributed(_bytes_and_memory, g * m, g, m)


@pytest.mark.parametrize("code", CODES)
def test_matches_single_process_adamw(numerics, code):
    for rank, diffs in enumerate(numerics):
        assert diffs[code] < 1e-5, f"rank {rank}: {code} differs from the reference by {diffs[code]}"


@pytest.mark.parametrize("accum", [1, 3])
@pytest.mark.parametrize("code", CODES)
def test_bytes_match_formulas(costs, mesh_shape, code, accum):
    topo = Topology(*mesh_shape)
    for rank, per_rank in enumerate(costs):
        run = per_rank[f"{code}/A{accum}"]
        expected = comm_bytes(code, topo, run["psi"], accum=accum)
        for ph in TRAINING_PHASES:
            for link in ("intra", "inter"):
                assert run["bytes"][ph][link] == pytest.approx(expected[ph][link], abs=0.5), (
                    f"rank {rank} {code} A={accum} {ph}/{link}: measured {run['bytes'][ph][link]}, "
                    f"formula {expected[ph][link]}"
                )
        assert run["bytes"]["other"] == {"intra": 0, "inter": 0}


@pytest.mark.parametrize("code", CODES)
def test_memory_matches_formulas(costs, mesh_shape, code):
    topo = Topology(*mesh_shape)
    for rank, per_rank in enumerate(costs):
        run = per_rank[f"{code}/A3"]
        expected = memory_bytes(code, topo, run["psi"], param_bytes=4, grad_bytes=4, optim_bytes=8)
        assert run["params"] == expected["params"], f"rank {rank} {code} params"
        assert run["grads_mid"] == expected["grads"], f"rank {rank} {code} grads between micro-steps"
        assert run["optim"] == expected["optim"], f"rank {rank} {code} optimizer state"
