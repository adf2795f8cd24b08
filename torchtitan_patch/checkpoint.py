"""Checkpoint integrity for torchtitan's DCP checkpoints: never resume from a damaged or foreign one silently.

torchtitan (0.2.2 and 0.3) already skips a step folder whose save was interrupted: DCP writes the
folder's ``.metadata`` last (atomically, after every rank's shard files are written) and
``CheckpointManager._find_load_step`` only counts folders that have one. What it does not
catch, and what :func:`install` adds around ``CheckpointManager.dcp_save`` / ``dcp_load``:

- Re-saving a step whose folder already holds a complete checkpoint (after resuming from an
  earlier step with ``checkpoint.load_step``): DCP overwrites the shard files first and
  replaces ``.metadata`` last, so a save interrupted in between would leave the old
  ``.metadata`` over a mix of old and new files. Rank 0 now removes the folder's old
  ``.metadata`` (and manifest) before the save starts, so an interrupted re-save is incomplete
  and skipped like any other.
- Damaged files. DCP reads a truncated shard with an error that names no file, and a
  corrupted one with none at all (the values load). After every synchronous save, each rank
  computes the CRC-32 of the shard files it wrote and rank 0 writes them, with their sizes and
  the save's id, to ``paro_manifest.json`` (``checkpoint.paro_checksums``, on by default). Before
  a load, every file the checkpoint's index refers to must exist and be long enough for it,
  and, when the manifest belongs to this save, have its recorded size and CRC (the files
  are spread over the ranks to verify). A failure raises :class:`CheckpointIntegrityError`
  on every rank, naming the file and the complete checkpoints to resume from instead.
  Checkpoints saved without a manifest (stock torchtitan, ``async_mode``, a save that died
  between ``.metadata`` and the manifest) get the size checks only.
- Parameters mid-update. A PaRO model's last parameter update (sync_p) may still be in flight
  when torchtitan saves; :func:`settle_parameters` finishes it before every save and load.
- A checkpoint that does not fit the run: another model or flavor (parameters missing, extra
  or of other shapes; DCP would load a shallower model's parameters into a deeper one and
  leave the rest as initialized), a model-only checkpoint resumed as a full one, or
  dataloader state saved under another data-parallel degree. These raise
  :class:`CheckpointMismatchError` before anything is read, saying what to do.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import re
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from paro_fsdp.comm.device import all_gather_object, barrier
from paro_fsdp.feedback_state import PREFIX as FEEDBACK_PREFIX

logger = logging.getLogger(__name__)

MANIFEST = "paro_manifest.json"
METADATA = ".metadata"
MANIFEST_FORMAT = "paro-checkpoint-manifest/1"
_SHARD = re.compile(r"^__(\d+)_\d+\.distcp$")
_STATEFUL_PREFIXES = ("optimizer", "lr_scheduler", "dataloader", "train_state")
_CHUNK = 8 << 20


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint's files are missing, truncated, corrupted or incomplete."""


class CheckpointMismatchError(ValueError):
    """A checkpoint that is intact but cannot be loaded into this run."""


# ----------------------------------------------------------------------------- files


def crc32(path: Path) -> int:
    """CRC-32 of a file, read in chunks."""
    value = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return value


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative, sorted), except the manifest and temporaries."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")
    )


def _writer_rank(name: str) -> int:
    """The rank that wrote ``name``: DCP's ``__<rank>_<n>.distcp``; rank 0 for everything else."""
    match = _SHARD.match(Path(name).name)
    return int(match.group(1)) if match else 0


def complete_steps(folder: Path) -> list[int]:
    """Steps under a checkpoint folder that torchtitan would load (``step-N`` with ``.metadata``)."""
    if not folder.is_dir():
        return []
    steps = []
    for child in folder.iterdir():
        match = re.fullmatch(r"step-(\d+)", child.name)
        if match and (child / METADATA).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def _instead(checkpoint: Path) -> str:
    """What to do about an unusable step folder: the other complete checkpoints to load."""
    match = re.fullmatch(r"step-(\d+)", checkpoint.name)
    others = [s for s in complete_steps(checkpoint.parent) if not match or s != int(match.group(1))]
    if not match:
        return "Point checkpoint.initial_load_path at an intact checkpoint."
    if others:
        return (f"Move {checkpoint} out of {checkpoint.parent} to resume from the latest complete checkpoint "
                f"before it, or pass --checkpoint.load_step N (complete checkpoints there: steps "
                f"{', '.join(map(str, others))}).")
    return f"There is no other complete checkpoint in {checkpoint.parent}; move it away to start from scratch."


# ----------------------------------------------------------------------------- process group


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(value: Any) -> list[Any]:
    if _world()[1] == 1:
        return [value]
    return all_gather_object(value)  # on the default group's device (NCCL: this GPU)


def _barrier() -> None:
    if _world()[1] > 1:
        barrier()


# ----------------------------------------------------------------------------- save


def invalidate(checkpoint: Path) -> None:
    """Before saving into ``checkpoint``: rank 0 removes an earlier save's index and manifest there."""
    if _world()[0] != 0:
        return
    for name in (MANIFEST, METADATA):
        path = checkpoint / name
        if path.exists():
            logger.info(f"Checkpoint {checkpoint} is saved again: removing the earlier save's {name} first")
            path.unlink()


def _save_id(metadata: Any) -> str | None:
    storage_meta = getattr(metadata, "storage_meta", None)
    save_id = getattr(storage_meta, "save_id", None)
    return str(save_id) if save_id else None


def write_manifest(checkpoint: Path) -> None:
    """After a completed save (collective): sizes and CRC-32s of the checkpoint's files, by rank 0.

    Each rank checksums the files it wrote (``__<rank>_*.distcp``; rank 0 also everything
    else), so no rank reads another's output and the work is spread as the save's was.
    """
    rank, _ = _world()
    files = _files(checkpoint) if checkpoint.is_dir() else []
    mine = {name: {"size": (checkpoint / name).stat().st_size, "crc32": f"{crc32(checkpoint / name):08x}"}
            for name in files if _writer_rank(name) == rank}
    everyone = _all_gather(mine)
    if rank == 0:
        entries: dict[str, Any] = {}
        for part in everyone:
            entries.update(part)
        save_id = None
        if (checkpoint / METADATA).is_file():
            save_id = _save_id(read_metadata(checkpoint))
        manifest = {"format": MANIFEST_FORMAT, "save_id": save_id, "algorithm": "crc32",
                    "files": dict(sorted(entries.items()))}
        tmp = checkpoint / f"{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, checkpoint / MANIFEST)
    _barrier()


# ----------------------------------------------------------------------------- load


def read_metadata(checkpoint: Path) -> Any:
    """The checkpoint's DCP index, or :class:`CheckpointIntegrityError` naming what is wrong."""
    path = checkpoint / METADATA
    if not checkpoint.is_dir():
        raise CheckpointIntegrityError(f"checkpoint {checkpoint} does not exist. {_instead(checkpoint)}")
    if not path.is_file():
        raise CheckpointIntegrityError(
            f"checkpoint {checkpoint} is incomplete: it has no {METADATA} (DCP writes it last, so its save "
            f"was interrupted or it is not a DCP checkpoint). {_instead(checkpoint)}"
        )
    try:
        with path.open("rb") as f:
            return pickle.load(f)
    except Exception as e:  # truncated or overwritten index: any unpickling error
        raise CheckpointIntegrityError(
            f"checkpoint {checkpoint} is damaged: its index {path} cannot be read ({type(e).__name__}: {e}). "
            f"{_instead(checkpoint)}"
        ) from e


def _needed_sizes(metadata: Any) -> dict[str, int]:
    """For every file the index refers to, the least size it must have (end of its last item)."""
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        path = getattr(info, "relative_path", None)
        if path is None:
            continue
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        needed[path] = max(needed.get(path, 0), end)
    return needed


def _read_manifest(checkpoint: Path, metadata: Any) -> dict[str, Any] | None:
    path = checkpoint / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
    except Exception as e:
        raise CheckpointIntegrityError(
            f"checkpoint {checkpoint} is damaged: its manifest {path} cannot be read ({e}). {_instead(checkpoint)}"
        ) from e
    if manifest.get("save_id") != _save_id(metadata):
        logger.warning(f"{path} belongs to another save of {checkpoint} than its {METADATA}; ignoring it "
                       f"(file sizes are checked against the index only)")
        return None
    return manifest


def verify(checkpoint: Path, checksums: bool = True) -> Any:
    """Check a checkpoint's files before loading it (collective when a process group exists).

    Returns its DCP metadata. Every rank checks that the index is readable and every file it
    refers to is present and long enough; with a manifest of this save, every file's size, and
    (``checksums``) its CRC-32, each file verified by one rank. Raises
    :class:`CheckpointIntegrityError` on every rank if anything is wrong.
    """
    metadata = read_metadata(checkpoint)
    problems: list[str] = []
    for name, size in sorted(_needed_sizes(metadata).items()):
        path = checkpoint / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size < size:
            problems.append(f"{path} is truncated: {path.stat().st_size} bytes, its index needs at least {size}")
    manifest = _read_manifest(checkpoint, metadata)
    if manifest is not None:
        for name, entry in manifest["files"].items():
            path = checkpoint / name
            if not path.is_file():
                problems.append(f"{path} is missing")
            elif path.stat().st_size != entry["size"]:
                problems.append(f"{path} has {path.stat().st_size} bytes, {entry['size']} when it was saved")
    if not problems and manifest is not None and checksums:
        rank, world = _world()
        names = sorted(manifest["files"])
        for name in names[rank::world]:
            found = f"{crc32(checkpoint / name):08x}"
            if found != manifest["files"][name]["crc32"]:
                problems.append(f"{checkpoint / name} is corrupted: CRC-32 {found}, "
                                f"{manifest['files'][name]['crc32']} when it was saved")
    problems = sorted({p for part in _all_gather(problems) for p in part})
    if problems:
        raise CheckpointIntegrityError(
            f"checkpoint {checkpoint} is damaged: {'; '.join(problems[:8])}"
            f"{f' (and {len(problems) - 8} more)' if len(problems) > 8 else ''}. {_instead(checkpoint)}"
        )
    if manifest is None:
        logger.info(f"Checkpoint {checkpoint} has no {MANIFEST} of this save: checked file sizes only")
    return metadata


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _dp_degree(dataloader: Any) -> int | None:
    for candidate in (dataloader, getattr(dataloader, "inner", None)):
        degree = getattr(candidate, "dp_world_size", None)
        if isinstance(degree, int):
            return degree
    return None


def _examples(names: Iterable[str], limit: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_fits(checkpoint: Path, metadata: Any, state_dict: dict[str, Any]) -> None:
    """Raise :class:`CheckpointMismatchError` (on every rank) if ``state_dict`` cannot load from this checkpoint.

    Collective when a process group exists: each rank holds only its own model parts (PP), so
    the parameters the checkpoint has beyond the model are those beyond every rank's parts.
    """
    saved = metadata.state_dict_metadata
    components = {k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)}
    prefixes = tuple(f"{c}." for c in (*components, *_STATEFUL_PREFIXES))
    model = {k: _shape(v) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    saved_model = {k: tuple(getattr(m, "size", ())) for k, m in saved.items()
                   if not k.startswith(prefixes) and hasattr(m, "size")}
    local = {
        "has_model": bool(model),
        # What the checkpoint has beyond this rank's parts: beyond the model, where every rank agrees.
        "beyond": sorted(k for k in saved_model if k not in model),
        "missing": sorted(k for k in model if k not in saved_model),
        "shapes": sorted(f"{k}: checkpoint {list(saved_model[k])}, model {list(model[k])}"
                         for k in model if k in saved_model and saved_model[k] != model[k]),
    }
    everyone = _all_gather(local)
    missing = sorted({n for part in everyone for n in part["missing"]})
    shapes = sorted({n for part in everyone for n in part["shapes"]})
    with_model = [set(part["beyond"]) for part in everyone if part["has_model"]]
    extra = sorted(set.intersection(*with_model)) if with_model else []
    if missing or extra or shapes:
        found = []
        if missing:
            total = len(saved_model) - len(extra) + len(missing)
            found.append(f"{len(missing)} of the model's {total} parameters are not in it ({_examples(missing)})")
        if extra:
            found.append(f"it has {len(extra)} parameters the model lacks ({_examples(extra)})")
        if shapes:
            found.append(f"{len(shapes)} have other shapes ({'; '.join(shapes[:3])})")
        raise CheckpointMismatchError(
            f"checkpoint {checkpoint} was saved from another model: {'; '.join(found)}. Run the model.name "
            f"and model.flavor it was saved with, or start this model in an empty checkpoint.folder "
            f"(without checkpoint.initial_load_path pointing at it)."
        )
    missing_components = [c for c in sorted(components) if not any(k.startswith(f"{c}.") or k == c for k in saved)]
    if missing_components:
        model_only = not any(k.startswith(tuple(f"{c}." for c in _STATEFUL_PREFIXES)) for k in saved)
        why = (" It holds the model only (saved with checkpoint.last_save_model_only = true, or a seed checkpoint)."
               if model_only else "")
        raise CheckpointMismatchError(
            f"checkpoint {checkpoint} has no {', '.join(missing_components)} state.{why} To start from its "
            f"weights, load it with --checkpoint.initial_load_path {checkpoint} --checkpoint.initial_load_model_only "
            f"in a run whose checkpoint.folder is empty, or skip what it lacks with "
            f"--checkpoint.exclude_from_loading {','.join(missing_components)}."
        )
    if "dataloader" in components:
        saved_degree = len({k for k in saved if re.fullmatch(r"dataloader\.dp_rank_\d+", k)})
        degree = _dp_degree(state_dict["dataloader"])
        if saved_degree and degree is not None and saved_degree != degree:
            raise CheckpointMismatchError(
                f"checkpoint {checkpoint} holds dataloader state for data-parallel degree {saved_degree}, this run "
                f"has {degree}; dataloader state does not reshard across DP degrees. Model and optimizer state do: "
                f"to resume them and restart the data, pass --checkpoint.exclude_from_loading dataloader"
            )


def saved_residuals(metadata: Any) -> dict[str, tuple[int, ...]]:
    """The error-feedback residuals a checkpoint's optimizer state holds: key (under the
    optimizer) and size."""
    head = f"optimizer.{FEEDBACK_PREFIX}."
    return {k.removeprefix("optimizer."): tuple(m.size) for k, m in metadata.state_dict_metadata.items()
            if k.startswith(head)}


# ----------------------------------------------------------------------------- torchtitan hooks


def settle_parameters(manager: Any) -> None:
    """Finish the parameter updates PaRO models still have in flight after ``optimizer.step()``.

    PaRO leaves each step's sync_p in flight until something reads the parameters, and waits
    for it in the model's ``state_dict`` / ``load_state_dict`` pre-hooks. torchtitan's
    ``ModelWrapper`` calls ``state_dict`` once, when the checkpointer is built, and hands DCP
    that cached dict (views of the parameters) at every save, so the hooks never run there and
    a save would read parameters mid-update. Called before every save and load.
    """
    wrapper = getattr(manager, "states", {}).get("model")
    for part in getattr(wrapper, "model", None) or []:
        wait = getattr(part, "wait_parameters", None)
        if callable(wait):
            wait()


def refresh_model_states(manager: Any) -> None:
    """Bring torchtitan's cached model state dict up to date before a save.

    Where a PaRO model keeps its fp32 masters apart from a bf16 copy at P, its state dict holds
    the masters gathered to P: new tensors, not views of the parameters, so the dict
    ``ModelWrapper`` cached when the checkpointer was built goes stale with every step. DCP saves
    the cached tensors, so they are overwritten in place with the current values (a collective:
    every rank saves).
    """
    wrapper = getattr(manager, "states", {}).get("model")
    cached = getattr(wrapper, "cache_state_dict", None)
    if cached is None or not any(getattr(p, "keeps_master_apart", False) for p in _paro_units(wrapper)):
        return
    for key, value in wrapper._get_state_dict().items():
        old = cached.get(key)
        if old is not None and old is not value and _local(old).data_ptr() != _local(value).data_ptr():
            old.copy_(value)


def _paro_units(wrapper: Any) -> list[Any]:
    from paro_fsdp.parallelize import paro_state
    from torchtitan_patch.models import PARO_MODELS

    return [u for part in getattr(wrapper, "model", None) or [] if part in PARO_MODELS for u in paro_state(part).units]


def _local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t


def _checksums_enabled(manager: Any) -> bool:
    return bool(getattr(manager, "_paro_checksums", True))


def _with_integrity_save(dcp_save: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(dcp_save)
    def wrapped(self: Any, state_dict: dict[str, Any], checkpoint_id: str, async_mode: Any,
                *args: Any, **kwargs: Any) -> Any:
        from torchtitan.components.checkpoint import AsyncMode

        settle_parameters(self)
        refresh_model_states(self)
        fault_tolerant = getattr(self, "ft_manager", None) is not None
        checkpoint = Path(checkpoint_id)
        if not fault_tolerant:
            invalidate(checkpoint)
        result = dcp_save(self, state_dict, checkpoint_id, async_mode, *args, **kwargs)
        if not fault_tolerant and async_mode == AsyncMode.DISABLED and _checksums_enabled(self):
            write_manifest(checkpoint)
        return result

    wrapped._paro_integrity = True  # type: ignore[attr-defined]
    return wrapped


def _with_integrity_load(dcp_load: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(dcp_load)
    def wrapped(self: Any, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool,
                *args: Any, **kwargs: Any) -> Any:
        settle_parameters(self)
        if from_hf:
            return dcp_load(self, state_dict, checkpoint_id, from_hf, *args, **kwargs)
        checkpoint = Path(checkpoint_id)
        metadata = verify(checkpoint, checksums=_checksums_enabled(self))
        check_fits(checkpoint, metadata, state_dict)
        optimizers = state_dict.get("optimizer")
        if not hasattr(optimizers, "feedback_saved"):
            return dcp_load(self, state_dict, checkpoint_id, from_hf, *args, **kwargs)
        optimizers.feedback_saved = saved_residuals(metadata)
        try:
            return dcp_load(self, state_dict, checkpoint_id, from_hf, *args, **kwargs)
        finally:
            optimizers.feedback_saved = None

    wrapped._paro_integrity = True  # type: ignore[attr-defined]
    return wrapped


def _with_settings(init: Callable[..., None], config_of: Callable[[tuple, dict], Any]) -> Callable[..., None]:
    @functools.wraps(init)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> None:
        self._paro_checksums = bool(getattr(config_of(args, kwargs), "paro_checksums", True))
        init(self, *args, **kwargs)

    wrapped._paro_integrity = True  # type: ignore[attr-defined]
    return wrapped


def install(config_of: Callable[[tuple, dict], Any]) -> None:
    """Wrap torchtitan's ``CheckpointManager`` save and load with the checks above (once).

    Args:
        config_of: where the release's ``CheckpointManager.__init__`` takes the checkpoint
            config (with ``paro_checksums``), given its positional and keyword arguments.
    """
    from torchtitan.components.checkpoint import CheckpointManager

    if getattr(CheckpointManager.dcp_load, "_paro_integrity", False):
        return
    CheckpointManager.__init__ = _with_settings(CheckpointManager.__init__, config_of)  # type: ignore[method-assign]
    CheckpointManager.dcp_save = _with_integrity_save(CheckpointManager.dcp_save)  # type: ignore[method-assign]
    CheckpointManager.dcp_load = _with_integrity_load(CheckpointManager.dcp_load)  # type: ignore[method-assign]
