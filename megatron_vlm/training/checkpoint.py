"""Training checkpoints: everything needed to continue a run exactly, at the same or another
(TP, PP, DP) layout, written atomically.

    OUTPUT/checkpoints/
      latest                  name of the newest complete checkpoint (written last, atomically)
      iter_0000200/
        model/, megatron_vlm.json   a model checkpoint (models.checkpoint_io): any layout loads it;
                                    the JSON also holds the iteration, the LR schedule, the layout
                                    that wrote it and the optimizer's step count
        optimizer/                  Adam's state and fp32 main parameters in model space
                                    (optimizer_state.py): any layout loads it
        data.json                   the global data stream's position, every lane (data/loader.py):
                                    any data-parallel size continues it
        rank00000.pt ...            per-rank RNG generators (tensors and plain values, loaded with
                                    weights_only=True); used when resuming at the same layout
        manifest.json               every other file's size and CRC-32, written last (integrity.py)

A checkpoint is written into ``.iter_XXXXXXX.incomplete`` (in the background: async_save.py) and
renamed when every rank is done; a kill during the write leaves the previous checkpoint and
``latest`` untouched. A failed write (a
full disk) raises :class:`CheckpointSaveFailed` on every rank naming the cause (ENOSPC), the
directory and the bytes free, and removes the partial write.

At resume (:func:`latest_checkpoint`, collective) the newest checkpoint is checked against its
manifest and for unsafe pickles; a damaged one is named in a warning and the previous complete one
is used. Checkpoints written before manifests existed load with a warning (their pickles are still
checked).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_vlm.config import ModelConfig, TrainableConfig
from megatron_vlm.data import loader
from megatron_vlm.distributed import all_gather_object, barrier, broadcast_object, global_rank
from megatron_vlm.models.checkpoint_io import (
    LATEST,
    METADATA_FILE,
    MODEL_DIR,
    check_dist_checkpoint_readable,
    load_model,
    model_metadata,
    model_sharded_state_dict,
    read_metadata,
    write_metadata,
)
from megatron_vlm.training import integrity, optimizer_state
from megatron_vlm.training.async_save import AsyncCheckpointWriter, FileSave, SaveRequest, sharded_save

OPTIMIZER_DIR = "optimizer"
DATA_STATE = "data.json"  # the data stream's state, every lane (JSON)
# 2: the global data stream (lanes) in data.json and the optimizer state in model space (any layout)
TRAINING_FORMAT = 2
logger = logging.getLogger("megatron_vlm")


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # an ndarray in older checkpoints
    np.random.set_state((kind, keys.astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _pointed(root: Path) -> Path | None:
    pointer = root / LATEST
    return root / pointer.read_text().strip() if pointer.is_file() else None


def _candidates(root: Path) -> list[Path]:
    """Complete checkpoints, newest first: ``latest``'s target, then the others by iteration."""
    pointed = _pointed(root)
    others = sorted((p for p in root.glob("iter_*") if p.is_dir() and p != pointed), reverse=True)
    return ([pointed] if pointed is not None else []) + others


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


_OLD_RANK_FILE_GLOBALS = {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct"} | {
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
}


def _unsafe_pickles(path: Path) -> list[str]:
    """Library pickles and per-rank files that would name code (checked without executing them)."""
    problems = []
    try:
        integrity.check_library_pickles(path)
    except (integrity.UnsafePickle, integrity.CheckpointDamaged) as error:
        problems.append(str(error))
    for rank_file in sorted(path.glob("rank*.pt")):
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(rank_file)))
        except Exception as error:  # noqa: BLE001 - damaged: name it
            problems.append(f"{rank_file.name}: not a readable torch file ({error})")
            continue
        if unsafe - _OLD_RANK_FILE_GLOBALS:
            problems.append(f"{rank_file.name} names {', '.join(sorted(unsafe))}: refused (it would run code)")
    return problems


def verify_checkpoint(path: Path) -> tuple[list[str], bool]:
    """Collective. (problems, has_manifest): files against the manifest (each rank checks a share)
    and unsafe pickles (rank 0). No problems and no manifest: written before manifests."""
    rank, world = _world()
    problems: list[str] = []
    manifest = None
    try:
        if not path.is_dir():
            problems.append(f"{path.name} does not exist")
        else:
            try:
                manifest = integrity.read_manifest(path)
            except integrity.CheckpointDamaged as error:
                problems.append(str(error))
        if manifest is not None:
            names = sorted(manifest)
            problems += integrity.check_files(path, manifest, names[rank::world])
            if rank == 0:
                problems += integrity.unlisted_files(path, manifest)
        if rank == 0 and path.is_dir():
            problems += _unsafe_pickles(path)
    except OSError as error:  # an unreadable file: named, and every rank still reaches the gather below
        problems.append(f"unreadable: {error}")
    gathered = all_gather_object(problems)
    return sorted({problem for share in gathered for problem in share}), manifest is not None


def latest_checkpoint(root: str | Path) -> Path | None:
    """Collective. The newest complete checkpoint that passes :func:`verify_checkpoint`; damaged
    ones are named in a warning and skipped. None if there is none; an error if all are damaged."""
    root = Path(root)
    candidates = broadcast_object(_candidates(root) if _world()[0] == 0 else None)
    refused = []
    for path in candidates:
        problems, has_manifest = verify_checkpoint(path)
        if problems:
            refused.append(f"{path}: " + "; ".join(problems))
            if _world()[0] == 0:
                logger.warning(
                    "checkpoint %s is refused: %s; %s",
                    path,
                    "; ".join(problems),
                    "trying the previous one" if path != candidates[-1] else "no older checkpoint",
                )
            continue
        if not has_manifest and _world()[0] == 0:
            logger.warning(
                "checkpoint %s has no %s (written before manifests): its files' integrity cannot be checked",
                path,
                integrity.MANIFEST,
            )
        return path
    if refused:
        raise RuntimeError(
            "every checkpoint in "
            + str(root)
            + " is damaged or unsafe, refusing to start over it:\n  "
            + "\n  ".join(refused)
        )
    return None


def model_checkpoint(path: str | Path) -> Path:
    """For tools that read a model (generation, evaluation): a checkpoint directory as given, or a
    run's checkpoints/ directory's latest complete checkpoint (``latest_checkpoint``)."""
    path = Path(path)
    if (path / METADATA_FILE).is_file():
        return path
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise FileNotFoundError(
            f"{path} is neither a checkpoint ({METADATA_FILE}) nor a directory of complete checkpoints"
        )
    return latest


def check_library_pickles(path: str | Path) -> None:
    """For model checkpoints from elsewhere (``training.load_weights``): refuse a DCP metadata or
    ``common.pt`` pickle that names code, before Megatron-Core / torch unpickle it."""
    integrity.check_library_pickles(path)


def _write_manifest(directory: Path) -> None:
    """Collective, after every rank finished writing: each rank hashes a share, rank 0 writes."""
    rank, world = _world()
    names = broadcast_object(integrity.checkpoint_files(directory) if rank == 0 else None)
    entries = integrity.describe_files(directory, names[rank::world])
    gathered = all_gather_object(entries)
    entries = {k: v for share in gathered for k, v in share.items()}
    _agreed("writing the manifest", lambda: integrity.write_manifest(directory, entries) if rank == 0 else None)


def measure_write_bandwidth(directory: str | Path, size: int = 64 * 2**20) -> float | None:
    """Bytes per second of one process writing ``size`` bytes (at most a quarter of the free space)
    into ``directory`` and syncing them (the file is removed); None if it cannot write there. A
    start-up estimate for the save-time check, not a filesystem benchmark."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".write-test.{os.getpid()}"
    block = os.urandom(2**20)
    size = min(size, shutil.disk_usage(directory).free // 4 // len(block) * len(block))
    if size == 0:
        return None
    try:
        started = time.perf_counter()
        with open(path, "wb") as handle:
            for _ in range(size // len(block)):
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
        return size / max(time.perf_counter() - started, 1e-6)
    except OSError:
        return None
    finally:
        path.unlink(missing_ok=True)


class CheckpointSaveFailed(RuntimeError):
    """A checkpoint could not be written (raised on every rank alike); the previous one is intact."""


_DISK_FULL = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT", errno.EFBIG: "EFBIG"}
_DISK_FULL_WORDS = {"ENOSPC": "no space left on device", "EDQUOT": "disk quota exceeded", "EFBIG": "file too large"}


def _errors_in(error: BaseException) -> list[BaseException]:
    """``error``, its causes and contexts, and the per-rank failures a torch DCP CheckpointException carries."""
    found, todo = [], [error]
    while todo:
        current = todo.pop()
        if current is None or any(current is seen for seen in found):
            continue
        found.append(current)
        todo += [current.__cause__, current.__context__]
        for failure in (getattr(current, "failures", None) or {}).values():  # {rank: (exception, trace)}
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    return [e for e in found if isinstance(e, BaseException)]


def _disk_full_name(error_text: str, errors: Sequence[BaseException], free: int) -> str | None:
    """ENOSPC / EDQUOT / EFBIG when the failure says so (an OSError's errno or its text), or ENOSPC when
    the filesystem is full (under 1 MiB free) and the failure carries no errno (torch.save's C++ writer
    says only "file write failed"; a DCP rank that is not the coordinator learns no cause at all)."""
    for error in errors:
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return _DISK_FULL[error.errno]
    for code, name in _DISK_FULL.items():
        if os.strerror(code) in error_text or f"[Errno {code}]" in error_text:
            return name
    return "ENOSPC" if free < 2**20 else None


def _agreed(step: str, action: Callable[[], Any]) -> Any:
    """Run a rank-local part of the save; every rank learns whether any rank failed (a collective in
    place of the barrier that followed), so that all raise alike instead of waiting for a dead peer."""
    failure = None
    try:
        result = action()
    except Exception as error:  # noqa: BLE001 - gathered and raised on every rank below
        failure, result = error, None
    outcomes = all_gather_object(None if failure is None else f"rank {_world()[0]}: {failure!r}")
    failed = [outcome for outcome in outcomes if outcome is not None]
    if failed:
        raise CheckpointSaveFailed(f"{step} failed: " + "; ".join(failed)) from failure
    return result


def _save_failed(error: BaseException, root: Path, final: Path, temporary: Path) -> CheckpointSaveFailed:
    """Every rank: remove the partial write (rank 0), and say what happened, how much space is left and
    which checkpoint a restart resumes from."""
    usage = shutil.disk_usage(root)
    errors = _errors_in(error)
    text = "\n".join(f"{e} {e.args!r}" for e in errors)
    cause = _disk_full_name(text, errors, usage.free)
    if _world()[0] == 0:
        shutil.rmtree(temporary, ignore_errors=True)  # give the space back
    try:  # every rank names the same cause (DCP tells only its coordinator what failed)
        cause = next((c for c in all_gather_object(cause) if c is not None), None)
    except Exception:  # noqa: BLE001, S110 - a peer that died: this rank's own finding stands
        pass
    after = shutil.disk_usage(root)
    previous = _pointed(root)
    kept = (
        f"{previous} is still the latest complete checkpoint and a restart resumes from it"
        if previous is not None and previous.is_dir()
        else "there is no earlier checkpoint"
    )
    what = (
        f"{_DISK_FULL_WORDS[cause]} ({cause}) in {root}"
        if cause is not None
        else f"{type(error).__name__}: {str(error).splitlines()[0][:500] if str(error) else ''}"
    )
    return CheckpointSaveFailed(
        f"checkpoint {final.name} could not be written: {what}; {usage.free} bytes were free of {usage.total} "
        f"when it failed, {after.free} after removing the partial write {temporary.name}; {kept}. "
        + ("Free space there or point training.output_dir elsewhere." if cause is not None else "")
    )


def save_training_checkpoint(
    root: str | Path,
    iteration: int,
    chunks: Sequence[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    loader_state: dict[str, Any],
    model_config: ModelConfig,
    trainable: TrainableConfig,
    keep_last: int,
    writer: AsyncCheckpointWriter | None = None,
    on_saved: Callable[[Path], None] | None = None,
) -> Path:
    """Collective. Model (as a model checkpoint), optimizer, scheduler, RNG and data stream state.

    The state is taken now (host copies); the files are written in the background by ``writer``
    and the checkpoint is published (manifest, rename, ``latest``, pruning, then ``on_saved``) by a
    later ``writer.maybe_finalize()`` / ``wait()``; without a writer, before this returns. A save
    still pending is published first. A failed write (a full disk above all) raises
    :class:`CheckpointSaveFailed` on every rank, naming the cause, the directory and the bytes free;
    the partial write is removed, and the previous checkpoint and ``latest`` are untouched (nothing
    of them is written before the final rename)."""
    root = Path(root)
    final = root / f"iter_{iteration:07d}"
    temporary = root / f".iter_{iteration:07d}.incomplete"
    synchronous = writer is None
    writer = writer or AsyncCheckpointWriter()
    writer.wait()  # before the clean-up below, which would remove a pending save's directory
    if global_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".iter_*.incomplete"):  # left by writes that were cut off
            shutil.rmtree(stale, ignore_errors=True)
        (temporary / MODEL_DIR).mkdir(parents=True)
        (temporary / OPTIMIZER_DIR).mkdir()
    barrier()
    try:
        requests = _prepare(temporary, iteration, chunks, optimizer, scheduler, loader_state, model_config, trainable)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # noqa: BLE001 - torch DCP's CheckpointException is a BaseException
        raise _save_failed(error, root, final, temporary) from error

    def publish() -> None:
        if global_rank() == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
        _agreed("publishing it as latest", lambda: _publish(root, final) if global_rank() == 0 else None)

    def prune() -> None:
        if global_rank() == 0:
            for old in sorted(root.glob("iter_*"))[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        barrier()

    finalize = [lambda: _write_manifest(temporary), publish, prune]  # the manifest needs every file
    if on_saved is not None:
        finalize.append(lambda: on_saved(final))
    writer.schedule(requests, finalize, on_failure=lambda error: _save_failed(error, root, final, temporary))
    if synchronous:
        writer.close()
    return final


def _publish(root: Path, final: Path) -> None:
    pointer = root / (LATEST + ".tmp")
    try:
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
    except OSError:
        pointer.unlink(missing_ok=True)
        os.replace(final, final.with_name(f".{final.name}.incomplete"))  # not newer than `latest` says
        raise


def _layout() -> dict[str, int]:
    return {
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline": parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
        "data_parallel": parallel_state.get_data_parallel_world_size(),
        "world_size": _world()[1],
    }


def _prepare(
    temporary: Path,
    iteration: int,
    chunks: Sequence[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    loader_state: dict[str, Any],
    model_config: ModelConfig,
    trainable: TrainableConfig,
) -> list[SaveRequest]:
    """Collective, at the step boundary: the plans and host copies of everything written into
    ``temporary`` (the small JSON files now). Failures of the collective parts reach every rank
    through torch DCP; the rank-local writes go through :func:`_agreed`."""
    model_entries = model_sharded_state_dict(chunks)
    optimizer_entries, optimizer_description = optimizer_state.sharded_state(optimizer, chunks, model_entries)
    data_state = loader.merge_states(all_gather_object(loader_state))  # every lane of the global stream
    extra = {
        "iteration": iteration,
        "scheduler": scheduler.state_dict(),
        "training_format": TRAINING_FORMAT,
        "layout": _layout(),
        "optimizer": optimizer_description,
    }
    metadata = model_metadata(chunks, model_config, trainable, extra)

    def small_files() -> None:
        if global_rank() == 0:
            write_metadata(temporary, metadata)
            (temporary / DATA_STATE).write_text(json.dumps(data_state))

    _agreed("writing the metadata and the data state", small_files)
    return [  # the same order on every rank: their finalization is collective
        sharded_save(model_entries, temporary / MODEL_DIR),
        sharded_save(optimizer_entries, temporary / OPTIMIZER_DIR),
        FileSave({"rng": rng_state(), "iteration": iteration}, temporary / f"rank{global_rank():05d}.pt"),
    ]


def reseed(seed: int, iteration: int) -> None:
    """Every generator from (seed, iteration): a resume at another layout, whose ranks have no saved
    generator state of their own. Only dropout draws from them (the data stream is counter-based)."""
    value = seed * 1_000_003 + iteration
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)
    tensor_parallel.model_parallel_cuda_manual_seed(value)


def load_training_checkpoint(
    path: Path,
    chunks: Sequence[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    model_config: ModelConfig,
    trainable: TrainableConfig,
    seed: int,
) -> tuple[int, dict[str, Any]]:
    """Collective. Restores model, optimizer and scheduler at this run's layout, whatever the saving
    run's (TP, PP, DP); the generators exactly at the same layout, else reseeded from (seed,
    iteration). Returns the iteration and the whole data stream's state (every lane: the loader
    takes its own). ``path`` comes from :func:`latest_checkpoint`, which verified its files and pickles."""
    metadata = read_metadata(path)
    if metadata.get("training_format") != TRAINING_FORMAT:
        raise ValueError(
            f"{path} was written by an older megatron-vlm (training checkpoint format "
            f"{metadata.get('training_format', 1)}, this one reads {TRAINING_FORMAT}: its data stream was split "
            "per data-parallel rank and cannot be continued exactly). Start from its weights instead: "
            f"training.load_weights={path} with a new training.output_dir"
        )
    load_model(chunks, path, model_config, trainable)
    check_dist_checkpoint_readable(path / OPTIMIZER_DIR, metadata.get("megatron_core_version"))
    optimizer_state.load(
        optimizer, chunks, model_sharded_state_dict(chunks), path / OPTIMIZER_DIR, metadata["optimizer"]
    )
    scheduler.load_state_dict(metadata["scheduler"])
    iteration = metadata["iteration"]
    rank_file = path / f"rank{global_rank():05d}.pt"
    if metadata["layout"] == _layout() and rank_file.is_file():
        set_rng_state(integrity.load_rank_file(rank_file)["rng"])
    else:
        if global_rank() == 0:
            logger.info(
                "resuming %s at another layout (%s, saved at %s): the data stream and the optimizer continue "
                "exactly; the random generators (dropout only) are reseeded",
                path.name,
                _layout(),
                metadata["layout"],
            )
        reseed(seed, iteration)
    data_state = json.loads((path / DATA_STATE).read_text())
    return iteration, data_state
