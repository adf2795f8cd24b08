"""torchtitan's features under PaRO, cell by cell, against stock torchtitan on the same layout.

Mixed precision {fp32, bf16} x activation checkpointing {none, selective, full} x compile
{off, on}: twelve cells, each run by stock torchtitan HSDP and by one PaRO strategy, IIG (P
coarser than O: under bf16 a bf16 copy at P and the fp32 master at O) or GGG (P == O: the fp32
copy at P is the master), alternating so that each strategy meets every value of every feature
and every pair of feature values meets at least one strategy, both strategies run bf16 under
each checkpointing mode and with compile on and off (:data:`CELLS`). All on 2 groups x 2 ranks,
on the debug model cut to 2 layers (every feature still applies per block). One torchrun of this
file runs the 24 runs one after another on one process group, each with one trainer: steps 1
and 2 with a checkpoint after each, then the step-1 checkpoint loaded into the same trainer and
step 2 trained again (so a load that missed the masters, the moments or the data position would
change it). Each PaRO run's losses must equal the stock run's with the same features (rel. 1e-5
in fp32, 1e-3 in bf16), and every run's step 2 after the load must equal its step 2 before it.
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
# (strategy, precision, ac, compiled): the strategy alternates with the sum of the feature
# values' indices, which covers each (strategy, feature value) pair.
CELLS = [(STRATEGIES[(i + j + k) % 2], precision, ac, compiled)
         for (i, precision), (j, ac), (k, compiled)
         in itertools.product(enumerate(PRECISIONS), enumerate(AC_MODES), enumerate(COMPILE))]
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
    return {_name(s, *features): _cell(root / _name(s, *features), s, *features)
            for strategy, *features in CELLS for s in (None, strategy)}


# ----------------------------------------------------------------------------- test side


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return launch(__file__, 4, tmp_path_factory.mktemp("features"))


def test_the_cells_cover_every_strategy_with_every_feature_value() -> None:
    for values in (PRECISIONS, AC_MODES, COMPILE):
        for value in values:
            assert {c[0] for c in CELLS if value in c[1:]} == set(STRATEGIES), value
    for strategy in STRATEGIES:
        assert {c[2] for c in CELLS if c[0] == strategy and c[1] == "bfloat16"} == set(AC_MODES), strategy


@pytest.mark.parametrize("strategy,precision,ac,compiled", CELLS)
def test_paro_trains_like_stock_torchtitan_and_resumes(cells: dict[str, Any], strategy: str, precision: str,
                                                       ac: str, compiled: bool) -> None:
    paro, stock = cells[_name(strategy, precision, ac, compiled)], cells[_name(None, precision, ac, compiled)]
    assert paro["compiled"] == stock["compiled"] == compiled
    assert paro["losses"] == pytest.approx(stock["losses"], rel=PRECISIONS[precision], abs=0), (paro, stock)
    assert paro["losses"][1] < paro["losses"][0] - 0.1, paro
    assert paro["replayed_from"] == 1 and paro["replayed"] == pytest.approx(paro["losses"][1:], rel=1e-6, abs=0), paro


@pytest.mark.parametrize("precision,ac,compiled", [c[1:] for c in CELLS])
def test_stock_torchtitan_resumes(cells: dict[str, Any], precision: str, ac: str, compiled: bool) -> None:
    stock = cells[_name(None, precision, ac, compiled)]
    assert stock["replayed_from"] == 1 and stock["replayed"] == pytest.approx(stock["losses"][1:], rel=1e-6, abs=0)


if __name__ == "__main__":
    rank_main(_scenarios, Path(sys.argv[1]), Path(sys.argv[2]))
