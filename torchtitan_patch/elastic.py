"""Process groups for fault tolerance: start-up that survives torchrun restarts, timeouts on every group.

Restarts (``torchrun --max-restarts``).

Under torchrun's c10d rendezvous (``--standalone`` included) the workers' default process
group is bootstrapped from the elastic agent's own TCPStore (``TORCHELASTIC_USE_AGENT_STORE=True``).
torch 2.13 connects the workers to that store with no per-attempt key prefix (its
``_create_c10d_store`` assumes a new store server for every retry), but the agent creates the
server once, at its first rendezvous, and keeps it for every restart. So after a worker dies
and torchrun restarts the group, the new workers find the previous attempt's keys still in
the store: gloo's per-rank listening addresses (``default_pg/0//cpu/rank_<r>``), NCCL's unique
id, store barriers. A new rank reads a dead worker's address before its new peer has written
its own, and start-up fails in ``init_process_group`` with ``Gloo connectFullMesh failed ...
Connection refused``: the restart is spent and the job exits. Stock torchtitan fails
the same way; it is not specific to any data-parallel strategy.

:func:`install` wraps torchtitan's ``init_distributed`` so that, when the agent's store is
shared, the default process group is created on a store scoped to this attempt:
``PrefixStore("torchelastic/<run id>/attempt_<TORCHELASTIC_RESTART_COUNT>/world_<WORLD_SIZE>", agent store)``.
Every process group torchtitan and PaRO create later derives its keys from the default
group's store, so they are scoped too. Every worker of one attempt gets the same restart
count from its agent, but only within one node: across nodes, when one node's workers fail,
another node restarts its own either because they failed too (its restart count goes up) or
because a node waits to rejoin (it does not), so the workers of one rendezvous round can
disagree on the count. The same holds for elastic membership changes. Multi-node jobs with
``--max-restarts`` must run torchrun with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which gives
every rendezvous round a fresh store (hosted by rank 0, no prefix needed);
:func:`attempt_store` warns when they do not (``paro_fsdp.cluster`` sets it).

Timeouts. After the first step torchtitan shortens the collectives' timeout to
``comm.train_timeout_seconds`` so that a rank that hangs (alive but silent) fails the job in
that time and torchrun can restart it; it does so for the groups of its own device meshes.
PaRO's groups (the flattened data-parallel mesh, HO-Ring's group) are created later, by new
``DeviceMesh`` / ``new_group`` calls with c10d's default timeout (30 minutes for gloo, 10 for
NCCL), so a peer stuck in one of them waited that long. :func:`install` also wraps
``set_pg_timeouts`` so that the timeout is applied to every process group this rank belongs to.

Error files. A rank that fails writes its exception to the error file torchrun gave it
(torch's ``@record``, which torchtitan's trainer uses) by truncating the file and writing it.
When a peer dies, the survivors fail on their broken connections at the same moment torchrun
terminates them; a survivor stopped between the truncation and the write leaves an empty
file, the agent fails to parse it and crashes instead of restarting the job (seen once in 20
faulted runs). :func:`install` makes the worker write the file whole or not at all (a
temporary file renamed into place); without one torchrun reports the signal instead.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch.distributed as dist


def attempt_prefix(env: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """The key prefix for this attempt's process groups, or None outside a shared agent store."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    run_id = env.get("TORCHELASTIC_RUN_ID", "none")
    attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    world = env.get("WORLD_SIZE", "1")
    return f"torchelastic/{run_id}/attempt_{attempt}/world_{world}"


def attempt_store(timeout: timedelta) -> dist.Store | None:
    """A client of the agent's store scoped to this attempt; None when not under a shared agent store."""
    prefix = attempt_prefix()
    if prefix is None:
        return None
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 \
            and os.environ.get("RANK") == "0":
        warnings.warn(
            "torchrun --max-restarts on several nodes shares the agent's store across restarts, and the nodes' "
            "workers can disagree on the restart count that scopes it: a restart may then hang at start-up. "
            "Launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node.", stacklevel=2)
    store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(prefix, store)


@contextlib.contextmanager
def _attempt_scoped_init() -> Iterator[None]:
    """While active, ``torch.distributed.init_process_group`` with env:// uses :func:`attempt_store`."""
    init_process_group = dist.init_process_group

    signature = inspect.signature(init_process_group)

    @functools.wraps(init_process_group)
    def scoped(*args: Any, **kwargs: Any) -> Any:
        given = signature.bind_partial(*args, **kwargs).arguments
        if given.get("store") is not None or given.get("init_method") not in (None, "env://"):
            return init_process_group(*args, **kwargs)
        store = attempt_store(given.get("timeout") or timedelta(minutes=10))
        if store is None:
            return init_process_group(*args, **kwargs)
        given.pop("init_method", None)
        given["store"] = store
        if given.get("rank", -1) == -1:
            given["rank"] = int(os.environ["RANK"])
        if given.get("world_size", -1) == -1:
            given["world_size"] = int(os.environ["WORLD_SIZE"])
        return init_process_group(**given)

    dist.init_process_group = scoped
    try:
        yield
    finally:
        dist.init_process_group = init_process_group


def restart_safe(init_distributed: Callable[..., int]) -> Callable[..., int]:
    """Wrap torchtitan's ``init_distributed`` so its default process group is scoped to this attempt."""
    if getattr(init_distributed, "_restart_safe", False):
        return init_distributed

    @functools.wraps(init_distributed)
    def wrapped(*args: Any, **kwargs: Any) -> int:
        with _attempt_scoped_init():
            return init_distributed(*args, **kwargs)

    wrapped._restart_safe = True  # type: ignore[attr-defined]
    return wrapped


def set_timeout_everywhere(timeout: timedelta) -> int:
    """Apply ``timeout`` to every process group this rank belongs to; returns how many took it."""
    from torch.distributed.distributed_c10d import _set_pg_timeout, _world

    done = 0
    for group in list(_world.pg_map):
        if not group._device_types:  # no backend of its own (HO-Ring's group: its flat group is in the map)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "only supported for either nccl or gloo": other backends keep theirs
            try:
                _set_pg_timeout(timeout, group)
                done += 1
            except (ValueError, AssertionError, RuntimeError):
                pass
    return done


def on_every_group(set_pg_timeouts: Callable[..., None]) -> Callable[..., None]:
    """Wrap torchtitan's ``set_pg_timeouts`` (its meshes' groups) to cover every process group."""
    if getattr(set_pg_timeouts, "_every_group", False):
        return set_pg_timeouts

    @functools.wraps(set_pg_timeouts)
    def wrapped(timeout: timedelta, *args: Any, **kwargs: Any) -> None:
        set_pg_timeouts(timeout, *args, **kwargs)
        set_timeout_everywhere(timeout)

    wrapped._every_group = True  # type: ignore[attr-defined]
    return wrapped


def write_error_file_atomically(file_path: str, error_msg: str) -> None:
    """``ErrorHandler._write_error_file``, but the file appears complete or not at all."""
    tmp = f"{file_path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(error_msg)
        os.replace(tmp, file_path)
    except Exception as e:
        warnings.warn(f"Unable to write error to file. {type(e).__name__}: {e}", stacklevel=2)


def install() -> None:
    """Restart-safe start-up, timeouts on every group, whole error files (idempotent)."""
    import torchtitan.distributed.utils as dist_utils
    from torch.distributed.elastic.multiprocessing.errors.error_handler import ErrorHandler

    dist_utils.init_distributed = restart_safe(dist_utils.init_distributed)
    dist_utils.set_pg_timeouts = on_every_group(dist_utils.set_pg_timeouts)
    ErrorHandler._write_error_file = lambda self, file_path, error_msg: write_error_file_atomically(  # type: ignore[method-assign]
        file_path, error_msg)
