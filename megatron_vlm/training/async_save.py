"""Asynchronous checkpoint saving: training continues while the previous step's state is written.

A save has three parts, on every rank:

1. **Prepare** (synchronous, at a step boundary). :func:`sharded_save` does Megatron-Core's
   collective planning of a ``dist_checkpointing`` save (``dist_checkpointing.save(...,
   async_sharded_save=True)``: validation, the global plan, ``common.pt``) and :class:`FileSave`
   takes a rank-local object. Both take a host copy of every tensor they will write right there
   (a D2H copy into pinned memory on GPUs, one ``synchronize``; a clone on CPU), because training
   updates the parameters and the optimizer state in place right after.
2. **Write** (background). :meth:`AsyncCheckpointWriter.schedule` hands the requests to a writer
   thread of this process, which writes the files from the host copies: no collective, no CUDA
   tensor (Megatron-Core 0.16's writer forks file-writing processes from it, 0.19's uses threads;
   either way they only see host memory).
3. **Finalize** (collective, at a later step boundary). :meth:`AsyncCheckpointWriter.maybe_finalize`
   asks every rank whether its writes ended (one ``all_reduce`` of two integers; nothing at all
   when no save is pending). When every rank is done it runs each request's own finalization
   (torch DCP's ``.metadata``, Megatron's ``metadata.json``) and then the caller's finalize
   callbacks, in order (the trainer's: write the manifest, rename, publish ``latest``, prune).

A failed background write (a full disk: ENOSPC) is reported at finalize on every rank alike, once
every rank's writer stopped: :class:`AsyncSaveFailed` naming each failing rank and its error (or
what the caller's ``on_failure`` makes of it), and no finalize callback runs, so nothing of the
failed save is published and the previous checkpoint stays the latest.

Why not Megatron-Core's own ``AsyncCallsQueue`` (0.16.1 and 0.19.2 alike): its flags live on
``torch.cuda.current_device()`` (CPU hosts need this project's CPU patches for that); it forks the
whole trainer (CUDA context included) per save, or spawns a worker that receives the tensors through
shared memory (on CPU no snapshot at all: training would change what is written); a write error
reaches the ranks that did not fail as a bare ``CheckpointException``. Its planning, its file
writers and its finalization are used as they are, on both supported versions.

Requests whose finalization is collective (:func:`sharded_save`) must be in the same order on every
rank. No synchronous ``dist_checkpointing.save`` while a save is pending: both pass their results
through one process-wide queue of Megatron-Core's.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_vlm.distributed import collective_device

# Megatron-Core's file writers log a failed write here (0.19 then raises an AssertionError that
# names only the exception's type): the writer thread keeps these lines for the error it reports.
_MEGATRON_WRITER_LOGGER = "megatron.core.dist_checkpointing.strategies.filesystem_async"


class AsyncSaveFailed(RuntimeError):
    """A background checkpoint write failed on some rank; raised on every rank at finalize."""


# --- host copies ---------------------------------------------------------------------------------


def host_copy(obj: Any) -> Any:
    """``obj`` with every tensor (and NumPy array) inside dicts, lists and tuples replaced by a copy
    in host memory that nothing else references; other values are kept as they are. CUDA tensors
    are copied into pinned memory without blocking, then the device is synchronized once."""
    copied_from_cuda = [False]
    result = _host_copy(obj, copied_from_cuda)
    if copied_from_cuda[0]:
        torch.cuda.synchronize()
    return result


def _host_copy(obj: Any, copied_from_cuda: list[bool]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach()
        if tensor.device.type == "cpu":
            return tensor.clone()
        copied_from_cuda[0] = True
        return tensor.to("cpu", non_blocking=True)  # pinned staging memory from torch's host cache
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, dict):
        result = copy.copy(obj)  # keeps the mapping's type (OrderedDict, defaultdict)
        for key, value in obj.items():
            result[key] = _host_copy(value, copied_from_cuda)
        return result
    if isinstance(obj, list):
        return [_host_copy(value, copied_from_cuda) for value in obj]
    if isinstance(obj, tuple):
        values = [_host_copy(value, copied_from_cuda) for value in obj]
        return type(obj)(*values) if hasattr(obj, "_fields") else type(obj)(values)
    return obj


# --- save requests -------------------------------------------------------------------------------


class SaveRequest:
    """One part of a checkpoint. :meth:`write` runs on the writer thread and may only write local
    files (no collective, no CUDA); :meth:`finalize` runs on the main thread of every rank, in the
    order of the request list, once every rank's writes succeeded, and may be collective."""

    def write(self) -> None:
        raise NotImplementedError

    def finalize(self) -> None:
        """Nothing by default."""


class FileSave(SaveRequest):
    """``torch.save(obj, path)`` in the background, of a host copy taken now; flushed to disk
    (``fsync``) so that a checkpoint published after it survives a machine crash."""

    def __init__(self, obj: Any, path: str | Path) -> None:
        self.path = Path(path)
        self.obj = host_copy(obj)

    def write(self) -> None:
        try:
            with open(self.path, "wb") as handle:
                torch.save(self.obj, handle)
                handle.flush()
                os.fsync(handle.fileno())
        except Exception as error:
            raise RuntimeError(f"writing {self.path} failed ({_free_bytes(self.path.parent)})") from error
        finally:
            self.obj = None  # the host copy is not needed any more


class _ResultTap:
    """Stands in for Megatron's process-wide write-results queue while the writer runs, so that the
    writer thread sees the result (a failure arrives there as an exception object, not raised)."""

    _NOTHING = object()

    def __init__(self) -> None:
        self.item: Any = self._NOTHING

    def put(self, item: Any, *args: Any, **kwargs: Any) -> None:
        self.item = item

    @property
    def received(self) -> bool:
        return self.item is not self._NOTHING


def _is_queue(value: Any) -> bool:
    return (
        not isinstance(value, torch.Tensor | list | tuple | dict | str | bytes | int | float)
        and callable(getattr(value, "put", None))
        and callable(getattr(value, "get_nowait", None))
    )


class _WriterErrors(logging.Handler):
    """Error lines Megatron's writers log on one thread (the writer thread) while it writes."""

    def __init__(self, thread: int) -> None:
        super().__init__(logging.ERROR)
        self.thread = thread
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.lines.append(record.getMessage())


class ShardedSave(SaveRequest):
    """A ``dist_checkpointing`` save whose planning is done (see :func:`sharded_save`)."""

    def __init__(self, request: Any, directory: Path) -> None:
        self.directory = directory
        self._write_fn = request.async_fn
        self._write_kwargs = dict(request.async_fn_kwargs or {})
        self._finalize_fns = list(request.finalize_fns)
        self._queue: Any = None
        self._tap = _ResultTap()
        args = list(request.async_fn_args)
        if self._write_fn is not None:
            queues = [index for index, arg in enumerate(args) if _is_queue(arg)]
            if len(queues) != 1:
                raise RuntimeError(
                    f"megatron-core's async save request for {directory} passes {len(queues)} result queues to its "
                    "writer (expected 1): this megatron-core version's async save is not supported"
                )
            self._queue = args[queues[0]]
            args[queues[0]] = self._tap
        # Megatron's own preload (request.preload_fn) would be a no-op on CPU: the write buckets
        # hold the live tensors. This copy is the snapshot on CPU and the D2H staging on GPUs.
        self._write_args = host_copy(args)

    def write(self) -> None:
        if self._write_fn is None:  # nothing of this save is written by this rank
            return
        errors = _WriterErrors(threading.get_ident())
        writer_logger = logging.getLogger(_MEGATRON_WRITER_LOGGER)
        writer_logger.addHandler(errors)
        try:
            self._write_fn(*self._write_args, **self._write_kwargs)
        except Exception as error:
            raise _with_logged(error, errors.lines, self.directory) from error
        finally:
            writer_logger.removeHandler(errors)
            self._write_args = None  # free the host copy
        if not self._tap.received:
            raise RuntimeError(f"writing {self.directory}: megatron-core's writer returned without a result")
        if isinstance(self._tap.item, BaseException):
            raise _with_logged(self._tap.item, errors.lines, self.directory) from self._tap.item
        _warm_up(self._queue, self._tap.item)

    def finalize(self) -> None:
        if self._queue is not None:
            # Into Megatron's process-wide queue only now, where DCP's finalization reads it back at
            # once: a failed save leaves nothing there for the next one to read as its own.
            self._queue.put(self._tap.item)
        for finalize in self._finalize_fns:  # DCP: gather the results, write .metadata; metadata.json
            finalize()


_warm_queues: set[int] = set()


def _warm_up(results: Any, item: Any) -> None:
    """The queue lives in a Manager process that imports torch to unpickle the first result it
    gets (seconds): pay that on the writer thread, once, not at finalize on the training thread."""
    if id(results) in _warm_queues:
        return
    results.put(item)
    results.get(timeout=300)
    _warm_queues.add(id(results))


def _free_bytes(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free} bytes free there"
    except OSError:
        return "free space unknown"


def _with_logged(error: BaseException, lines: list[str], directory: Path) -> RuntimeError:
    """Megatron-Core's writer processes (0.16) pass a failure back pickled, without the OSError that
    caused it (ENOSPC, for one), and 0.19's report only its type; its log lines and the free space
    say what happened."""
    logged = "; ".join(line for line in lines if str(error) not in line)
    return RuntimeError(
        f"writing {directory} failed ({_free_bytes(directory)}): {type(error).__name__}: {error}"
        + (f" (megatron-core: {logged})" if logged else "")
    )


def sharded_save(sharded_state_dict: dict[str, Any], directory: str | Path) -> ShardedSave:
    """Collective: plan a ``dist_checkpointing`` save of ``sharded_state_dict`` into ``directory``
    (which must exist) and take the host copy of what this rank writes. Rank 0 writes the common
    state (``common.pt`` before Megatron-Core 0.19) now; the sharded files are written by
    :meth:`AsyncCheckpointWriter.schedule`. The result loads with ``dist_checkpointing.load`` like
    a synchronous save's."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist: create it (rank 0, then a barrier) before the save")
    options: dict[str, Any] = {"async_sharded_save": True}
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        options["async_strategy"] = "mcore"  # 0.19's default, NVRx, is not a dependency of this project
    request = dist_checkpointing.save(sharded_state_dict, str(directory), **options)
    return ShardedSave(request, directory)


# --- the writer ----------------------------------------------------------------------------------


class _Job:
    def __init__(
        self,
        requests: list[SaveRequest],
        finalize_fns: list[Callable[[], Any]],
        on_failure: Callable[[BaseException], BaseException] | None,
    ) -> None:
        self.requests = requests
        self.finalize_fns = finalize_fns
        self.on_failure = on_failure
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.run, name="async-checkpoint-writer", daemon=True)

    def run(self) -> None:
        for request in self.requests:
            try:
                request.write()
            except BaseException as error:  # noqa: BLE001 - reported on every rank at finalize
                self.error = error
                return

    def failure(self, error: BaseException) -> BaseException:
        return self.on_failure(error) if self.on_failure is not None else error


def _describe(error: BaseException) -> str:
    """The error and what caused it (torch.save reports ENOSPC as a RuntimeError whose context is the
    OSError): the other ranks get this text only."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and not any(current is seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    parts: list[str] = []
    for e in chain:
        if not parts or str(e) not in parts[-1]:  # a wrapper that already quotes its cause says enough
            parts.append(f"{type(e).__name__}: {e}")
    return " <- ".join(parts)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class AsyncCheckpointWriter:
    """One checkpoint save at a time, written in the background. Every method but :attr:`pending`
    is collective when a save is pending: every rank calls it at the same point of training."""

    def __init__(self) -> None:
        self._job: _Job | None = None

    @property
    def pending(self) -> bool:
        """Whether a scheduled save is not finalized yet (the same on every rank)."""
        return self._job is not None

    def schedule(
        self,
        requests: Sequence[SaveRequest],
        finalize_fns: Sequence[Callable[[], Any]] = (),
        on_failure: Callable[[BaseException], BaseException] | None = None,
    ) -> None:
        """Start writing ``requests`` (prepared just before, at this step boundary) in the background.
        ``finalize_fns`` run later on every rank, in order, after every rank's writes ended well and
        the requests' own finalization; each must raise alike on every rank or not at all (a
        collective inside one that raises on one rank only leaves the others waiting). A failure,
        of the writes or of the finalization, raises ``on_failure(error)`` on every rank (default:
        the error itself, :class:`AsyncSaveFailed` for failed writes). A save still pending is
        finalized first (blocking)."""
        for request in requests:
            if not isinstance(request, SaveRequest):
                raise TypeError(
                    f"schedule() takes SaveRequest objects (sharded_save(...), FileSave(...)), got {request!r}"
                )
        for finalize in finalize_fns:
            if not callable(finalize):
                raise TypeError(f"finalize_fns must be callables, got {finalize!r}")
        self.wait()
        job = _Job(list(requests), list(finalize_fns), on_failure)
        job.thread.start()
        self._job = job

    def maybe_finalize(self, blocking: bool = False) -> bool:
        """Finalize the pending save if every rank's writes ended (``blocking``: wait for this rank's
        first). True when no save is pending any more, False while one still is. Raises on every
        rank when a write failed somewhere (then nothing is pending any more either)."""
        job = self._job
        if job is None:  # the same on every rank: schedule() and this method run on all of them
            return True
        if blocking:
            job.thread.join()
        running, failed = job.thread.is_alive(), job.error is not None
        if _world() > 1:
            state = torch.tensor([int(running), int(failed)], dtype=torch.int32, device=collective_device())
            dist.all_reduce(state, op=dist.ReduceOp.MAX)
            running, failed = bool(state[0].item()), bool(state[1].item())
        if running:  # somewhere: a failure is reported only once no rank writes into the directory any more
            return False
        self._job = None
        try:
            if failed:
                raise self._failed_writes(job) from job.error
            for request in job.requests:
                request.finalize()
            for finalize in job.finalize_fns:
                finalize()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # noqa: BLE001 - torch DCP's CheckpointException is a BaseException
            converted = job.failure(error)
            if converted is error:
                raise
            raise converted from error
        return True

    @staticmethod
    def _failed_writes(job: _Job) -> AsyncSaveFailed:
        """Every rank: which ranks' writes failed and why (each rank knows only its own error)."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        mine = None if job.error is None else f"rank {rank}: {_describe(job.error)}"
        if _world() > 1:
            gathered: list[Any] = [None] * _world()
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        failures = [failure for failure in gathered if failure is not None]
        return AsyncSaveFailed("background checkpoint write failed: " + "; ".join(failures))

    def wait(self) -> None:
        """Block until the pending save (if any) is written on every rank and finalized."""
        self.maybe_finalize(blocking=True)

    def close(self, finalize: bool = True) -> None:
        """At the end of training: :meth:`wait`. ``finalize=False`` (training failed, peers may be
        gone): only let this rank's writes end, no collective and no finalize callback; the
        unfinished checkpoint stays unpublished."""
        if finalize:
            self.wait()
            return
        job, self._job = self._job, None
        if job is not None:
            job.thread.join()
