"""torchtitan's features under PaRO, cell by cell, against stock torchtitan on the same layout.

Mixed precision {fp32, bf16} x activation checkpointing {none, selective, full} x compile
{off, on}, for IIG (P coarser than O: under bf16 a bf16 copy at P and the fp32 master at O),
GGG (P == O: the fp32 copy at P is the master) and stock torchtitan HSDP, all on 2 groups x 2
ranks, on the debug model cut to 2 layers (every feature still applies per block). One torchrun
of this file runs the 36 cells one after another on one process group, each with one trainer:
steps 1 and 2 with a checkpoint after each, then the step-1 checkpoint loaded into the same
trainer and step 2 trained again (so a load that missed the masters, the moments or the data
position would change it). Each PaRO cell's losses must equal the stock
cell's with the same features (rel. 1e-5 in fp32, 1e-3 in bf16), and every cell's step 2 after
the load must equal its step 2 before it.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

import pytest

from titan_runs import args, curve, launch, rank_main, run

PRECISIONS = {"float32": 1e-5, "bfloat16": 1e-3}  # loss tolerance against stock, relative
AC_MODES = ("none", "selective", "full")
COMPILE = (False, True)
STRATEGIES = ("IIG", "GGG")
CELLS = list(itertools.product(PRECISIONS, AC_MODES, COMPILE))
FLAVOR = "debugmodel_2_layers"


def _name(strategy: str | None, precision: str, ac: str, compiled: bool) -> str:
    return f"{strategy or 'stock'}-{precision}-ac_{ac}-compile_{'on' if compiled else 'off'}"


# ----------------------------------------------------------------------------- rank side


def _cell(dump: Path, strategy: str | None, precision: str, ac: str, compiled: bool) -> dict[str, Any]:
    """Steps 1-2 saving after each, then the step-1 checkpoint loaded and step 2 trained again."""
    extra = ["--model.flavor", FLAVOR, "--training.mixed_precision_param", precision,
             "--checkpoint.enable", "--checkpoint.interval", "1", "--checkpoint.no-last-save-model-only"]
    if compiled:
        extra += ["--compile.enable", "--compile.components", "model,loss"]
    out = run(args(dump, 2, (2, 2), strategy, *extra, ac=ac), replay_from=1, snapshot_end=False)
    return {"losses": curve(out["losses"]), "replayed_from": out["replayed_from"],
            "replayed": curve(out["replayed"]), "compiled": out["compiled"]}


def _scenarios(root: Path) -> dict[str, Any]:
    import dataclasses

    from torchtitan.models.llama3 import llama3_args

    llama3_args[FLAVOR] = dataclasses.replace(llama3_args["debugmodel"], n_layers=2)
    return {_name(s, *cell): _cell(root / _name(s, *cell), s, *cell)
            for cell in CELLS for s in (None, *STRATEGIES)}


# ----------------------------------------------------------------------------- test side


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return launch(__file__, 4, tmp_path_factory.mktemp("features"))


@pytest.mark.parametrize("precision,ac,compiled", CELLS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_paro_trains_like_stock_torchtitan_and_resumes(cells: dict[str, Any], strategy: str, precision: str,
                                                       ac: str, compiled: bool) -> None:
    paro, stock = cells[_name(strategy, precision, ac, compiled)], cells[_name(None, precision, ac, compiled)]
    assert paro["compiled"] == stock["compiled"] == compiled
    assert paro["losses"] == pytest.approx(stock["losses"], rel=PRECISIONS[precision], abs=0), (paro, stock)
    assert paro["losses"][1] < paro["losses"][0] - 0.1, paro
    assert paro["replayed_from"] == 1 and paro["replayed"] == pytest.approx(paro["losses"][1:], rel=1e-6, abs=0), paro


@pytest.mark.parametrize("precision,ac,compiled", CELLS)
def test_stock_torchtitan_resumes(cells: dict[str, Any], precision: str, ac: str, compiled: bool) -> None:
    stock = cells[_name(None, precision, ac, compiled)]
    assert stock["replayed_from"] == 1 and stock["replayed"] == pytest.approx(stock["losses"][1:], rel=1e-6, abs=0)


if __name__ == "__main__":
    rank_main(_scenarios, Path(sys.argv[1]), Path(sys.argv[2]))
