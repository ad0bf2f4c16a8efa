"""One job per run directory: ``OUTPUT/run.lock`` names the live job that trains there.

A second trainer on the same ``training.output_dir`` (a requeue racing a resubmission, a job
started while an orphan still runs) refuses to start and names the holder. A lock left by a dead
job is taken over; the holder's *liveness* is checked, never the file's age:
- same host (and the same boot): its PID is alive *and* that PID's start time is the recorded
  one (a reused PID belongs to another process);
- another host: dead only when Slurm says so (its job is no longer running, or it is an earlier
  run of this same requeued job); otherwise the trainer refuses, telling the user to check and
  pass ``--force-unlock`` (``MEGATRON_VLM_FORCE_UNLOCK=1``), which takes a lock whose holder
  cannot be checked, never one seen alive.

Atomicity without ``flock``/``fcntl``: the record is written to a private file and hard-linked to
``run.lock`` (``link`` fails with EEXIST if the lock exists). ``link`` (like ``open(O_EXCL)``) is
atomic on local filesystems, NFSv3/v4 and Lustre (a metadata-server operation), and unlike
``O_EXCL`` no reader can ever see a half-written lock. Byte-range and ``flock`` locks are not used:
Lustre clients are often mounted ``localflock`` (locks only node-local) or ``noflock`` (ENOSYS),
and on NFS a lock held by a dead client lingers until lease recovery, so they would neither exclude
jobs on other nodes reliably nor say *who* holds the directory. An NFS ``link`` whose reply is lost
may report an error although it succeeded: the private file's link count (2) settles it.

Taking over a dead holder's lock is atomic too: the taker hard-links the stale lock to
``.run.lock.breaking.<holder>``, a name fixed by the dead holder's identity, so only one contender
wins; it checks that what it linked is still that holder's record (same inode and content), then
removes the lock and competes for it as a new job. A taker that dies mid-way leaves the breaking
link, which others ignore after a minute (a takeover takes milliseconds).

In a multi-rank job, global rank 0 takes the lock and every rank learns the outcome (a collective):
all start, or all refuse with the same message.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCK_NAME = "run.lock"
FORCE_VAR = "MEGATRON_VLM_FORCE_UNLOCK"
STALE_BREAK_SECONDS = 60.0
SLURM_DONE = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
    "PENDING",  # requeued and waiting: none of its processes runs
    "REQUEUED",
    "REQUEUE_HOLD",
    "SPECIAL_EXIT",
}

logger = logging.getLogger("megatron_vlm")


class RunDirectoryLocked(RuntimeError):
    """Another live (or unverifiable) job holds the run directory."""


def _process_start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22); None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def this_process() -> dict[str, Any]:
    """The record a lock holds: who, where, which Slurm job, since when."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start_ticks": _process_start_ticks(os.getpid()),
        "boot_id": _boot_id(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv)[:1000],
    }


def describe(holder: dict[str, Any]) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"PID {holder.get('pid')} on {holder.get('host')}{job}, started {holder.get('started')}"


def _same_process(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("host", "pid", "pid_start_ticks"))


def _slurm_job_state(job: str) -> str | None:
    """The job's state as Slurm reports it, ``GONE`` if Slurm no longer knows it, None if it cannot be asked."""
    try:
        done = subprocess.run(
            ["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return "GONE" if "Invalid job id" in done.stderr else None
    return done.stdout.strip().split("\n")[0] or "GONE"


def holder_liveness(holder: dict[str, Any]) -> tuple[bool | None, str]:
    """(alive, why): True alive, False dead, None cannot be checked from here."""
    me = this_process()
    if holder.get("host") == me["host"] and (holder.get("boot_id") in (None, me["boot_id"])):
        pid = int(holder.get("pid", -1))
        ticks = _process_start_ticks(pid)
        if ticks is None:
            return False, f"PID {pid} is no longer running on {me['host']}"
        if holder.get("pid_start_ticks") is not None and ticks != holder["pid_start_ticks"]:
            return False, f"PID {pid} now belongs to another process (started at tick {ticks}, not the holder's)"
        return True, f"PID {pid} is running on {me['host']}"
    if holder.get("host") == me["host"]:
        return False, f"{me['host']} has rebooted since the lock was taken"
    job = holder.get("slurm_job_id")
    if job:
        if job == me["slurm_job_id"] and int(holder.get("slurm_restart_count", 0)) < me["slurm_restart_count"]:
            return False, f"it is an earlier run of this requeued Slurm job {job}"
        state = _slurm_job_state(job)
        if state is None:
            return None, f"Slurm cannot be asked about job {job} from here"
        if state.split()[0] in SLURM_DONE or state == "GONE":
            return False, f"Slurm job {job} is {state}"
        return True, f"Slurm job {job} is {state}"
    return None, f"it runs on another host ({holder.get('host')}), where its PID cannot be checked"


def _read(path: Path) -> tuple[dict[str, Any], int] | None:
    """(record, inode) of a lock file; None if it does not exist (any more)."""
    try:
        with open(path) as handle:
            inode = os.fstat(handle.fileno()).st_ino
            text = handle.read()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        record = {"host": "?", "pid": -1, "unreadable": text[:200]}  # never half-written (link); damaged
    return record, inode


def _link(source: Path, target: Path) -> bool:
    """Atomically create ``target`` as a hard link of ``source``; False if it exists."""
    try:
        os.link(source, target)
        return True
    except FileExistsError:
        return False
    except OSError:
        if os.stat(source).st_nlink == 2:  # NFS: the link was made but the reply was lost
            return True
        raise


def _break(lock: Path, record: dict[str, Any], inode: int) -> None:
    """Remove the dead holder's lock, unless another contender is doing it or it changed."""
    name = f".{LOCK_NAME}.breaking.{record.get('host')}.{record.get('pid')}.{record.get('pid_start_ticks')}.{inode}"
    marker = lock.parent / name
    try:
        os.link(lock, marker)
    except FileNotFoundError:
        return  # already removed by another contender
    except FileExistsError:
        try:
            if time.time() - os.lstat(marker).st_ctime > STALE_BREAK_SECONDS:
                os.unlink(marker)  # left by a contender that died mid-takeover
        except FileNotFoundError:
            pass
        time.sleep(0.2)
        return
    try:
        linked = _read(marker)
        if linked is None or linked[1] != inode or linked[0] != record:
            return  # the lock was replaced meanwhile: not the dead holder's any more
        current = os.stat(lock)
        if current.st_ino == inode:
            os.unlink(lock)
    except FileNotFoundError:
        pass
    finally:
        try:
            os.unlink(marker)
        except FileNotFoundError:
            pass


@dataclass
class RunLock:
    """The run directory's lock, held by this process (``held``), or a stand-in on other ranks."""

    path: Path
    record: dict[str, Any] = field(default_factory=dict)
    held: bool = False

    def release(self) -> None:
        """Remove the lock if this process still holds it (idempotent)."""
        if not self.held:
            return
        current = _read(self.path)
        if current is not None and _same_process(current[0], self.record):
            os.unlink(self.path)
        self.held = False


def acquire(directory: str | Path, force: bool | None = None, attempts: int = 20) -> RunLock:
    """Take ``directory/run.lock`` for this process or raise :class:`RunDirectoryLocked` naming the holder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    force = os.environ.get(FORCE_VAR, "") == "1" if force is None else force
    lock = directory / LOCK_NAME
    record = this_process()
    private = directory / f".{LOCK_NAME}.{record['host']}.{record['pid']}.tmp"
    with open(private, "w") as handle:
        json.dump(record, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        for _ in range(attempts):
            if _link(private, lock):
                held = RunLock(lock, record, held=True)
                atexit.register(held.release)  # a failed run frees the directory as it exits
                return held
            found = _read(lock)
            if found is None:
                continue  # released between our attempt and the read: try again
            holder, inode = found
            if _same_process(holder, record):
                return RunLock(lock, record, held=False)  # this process already holds it
            alive, why = holder_liveness(holder)
            if alive:
                raise RunDirectoryLocked(
                    f"run directory {directory} is locked: in use by {describe(holder)} ({why}). "
                    f"Stop that job or choose another training.output_dir; the lock is {lock}"
                )
            if alive is None and not force:
                raise RunDirectoryLocked(
                    f"run directory {directory} is locked by {describe(holder)} and its liveness cannot be "
                    f"checked: {why}. If that job is certainly over, start again with --force-unlock "
                    f"({FORCE_VAR}=1); the lock is {lock}"
                )
            logger.warning(
                "run directory %s: taking over the lock left by %s (%s)",
                directory,
                describe(holder),
                why if alive is False else f"forced: {why}",
            )
            _break(lock, holder, inode)
        raise RunDirectoryLocked(f"could not take {lock} after {attempts} attempts: other jobs keep racing for it")
    finally:
        private.unlink(missing_ok=True)


def acquire_collective(directory: str | Path) -> RunLock:
    """Collective: global rank 0 takes the lock; every rank returns, or raises the same error."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    result: list[Any] = [None]
    lock = RunLock(Path(directory) / LOCK_NAME)
    failure: BaseException | None = None
    if rank == 0:
        try:
            lock = acquire(directory)
        except Exception as error:  # noqa: BLE001 - every rank must hear of it, or the others would wait forever
            result[0], failure = f"{type(error).__name__}: {error}", error
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(result, src=0)
    if failure is not None:
        raise failure
    if result[0] is not None:
        if result[0].startswith("RunDirectoryLocked: "):
            raise RunDirectoryLocked(result[0].removeprefix("RunDirectoryLocked: "))
        raise RuntimeError(f"rank 0 could not take the run directory's lock: {result[0]}")
    return lock
