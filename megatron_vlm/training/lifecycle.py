"""Trainer processes die with whoever started them: no orphans after a launcher or a trainer is killed.

torchrun starts its workers in their own sessions (``start_new_session``), so a SIGKILLed torchrun
(a lost node, the OOM killer) leaves them running, and a restarted job then shares its run
directory with them. Slurm's process tracking and MPI's daemons see only their own direct
children. Multiprocessing helpers of a trainer (Megatron's dist_checkpointing starts a *spawned*
``multiprocessing.Manager`` server and *forked* file writers) are re-parented to init when the
trainer is SIGKILLed and live on.

Two mechanisms, both armed here (the module imports nothing heavy: ``megatron_vlm.train`` arms it
before importing torch):
- the Linux parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGKILL)``): the kernel kills this
  process the moment its parent exits. There is a race: the parent may die before the call, so
  the parent recorded at start-up is compared with ``getppid()`` right after it. The signal fires
  when the *thread* that created the child exits, not the process: children must be started from
  a thread that lives as long as the process (the main thread, as now).
- a watchdog thread (every second: has the parent changed?) as a second line, and the only one
  off Linux.

SIGKILL, not SIGTERM: when the launcher is gone, the job is being torn down and the peers are dying
too, so a last checkpoint would hang in its collectives; the run resumes from the last complete
checkpoint (a cut-off write is a ``.incomplete`` directory, cleared by the next save).

Which processes arm it:
- a trainer started by a launcher (torchrun, srun, mpirun/mpiexec), seen from its environment;
  a plain ``python -m megatron_vlm.train`` does not (``nohup ... &`` must survive its shell), unless
  ``MEGATRON_VLM_DIE_WITH_PARENT=1``; ``=0`` turns it off everywhere;
- every multiprocessing *spawn* child of the trainer: it imports ``megatron_vlm.train`` as
  ``__mp_main__``, whose module level calls :func:`arm_spawned_helper`;
- every *fork* child of the trainer, through ``os.register_at_fork`` (the signal setting is
  cleared by fork).

Under ``sbatch`` the trainers' parent is slurmstepd, not srun nor the batch script (which runs on
one node only), so neither mechanism sees the batch script die. Two more lines there:
- ``slurm/pretrain_idefics2.sh`` runs srun with the parent-death signal SIGTERM: srun answers it by
  SIGKILLing its tasks on every node ("forcing job termination"), at once, while the job still
  counts as running. (With SIGKILL srun died silently and the trainers lived on until Slurm's
  teardown, whose SIGTERM they took for a preemption and checkpointed first.)
- that teardown's SIGTERM comes from slurmstepd, like a preemption's or ``scancel --signal=TERM``'s;
  what tells them apart is in the controller: the job is no longer running and its batch script
  has already ended with a non-zero exit code or a signal (:func:`slurm_batch_script_ended`; a
  preemption or a cancellation signals a job whose script still runs). The trainers' SIGTERM
  handler (training/preemption.py) asks, and exits at once instead of checkpointing: no one waits
  for this job, its peers are being killed, and a save would be cut off at KillWait. This covers
  srun itself being SIGKILLed (the script then ends) and a lost race of the first line.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SWITCH = "MEGATRON_VLM_DIE_WITH_PARENT"
# Variables only a launcher sets for its workers: torchrun (elastic agent), srun, OpenMPI, PMIx, MPICH/Hydra.
LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "SLURM_STEP_ID", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")

_armed_parent: int | None = None
_fork_hook_registered = False


def launched_by() -> str | None:
    """The launcher variable that says a launcher started this process, or None."""
    return next((name for name in LAUNCHER_VARS if os.environ.get(name)), None)


def _set_parent_death_signal(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig) on Linux; False where it does not exist."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return True


def die(reason: str) -> None:
    """Print ``reason`` and SIGKILL this process (its helpers die with it, see the module docstring)."""
    print(f"megatron_vlm: pid {os.getpid()}: {reason}; exiting", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def slurm_batch_script_ended(timeout: float = 10.0) -> str | None:
    """In a task of a Slurm batch job's step: why the job is over because its batch script ended
    abnormally (killed, OOM-killed, failed: the launcher is gone), as a sentence; None when not in a
    batch job, when the script is still running (a preemption, ``scancel``, a requeue, the time limit)
    or when Slurm cannot be asked within ``timeout`` seconds (then nothing changes)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or not os.environ.get("SLURM_STEP_ID"):
        return None
    try:
        done = subprocess.run(
            ["scontrol", "--oneliner", "show", "job", job], capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = {key: re.search(rf"(?:^|\s){key}=(\S+)", done.stdout) for key in ("JobState", "BatchFlag", "ExitCode")}
    if done.returncode != 0 or not all(fields.values()):
        return None
    state, batch, exit_code = (match.group(1) for match in fields.values())
    # ExitCode is the batch script's (code:signal), set when it ends (0:0 again after a requeue,
    # Slurm 22.05); a script that exits 0 with steps still running is not told apart (the trainers
    # then checkpoint, as before).
    if batch != "1" or state == "RUNNING" or exit_code == "0:0":
        return None
    code, _, number = exit_code.partition(":")
    how = f"was killed by signal {number}" if number not in ("", "0") else f"exited with {code}"
    return f"Slurm job {job} is {state}: its batch script {how} (the launcher is gone), not checkpointing"


def _watch(parent: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            die(f"parent {parent} is gone (now re-parented to {os.getppid()})")


def die_with_parent(parent: int | None = None, watchdog: bool = True, interval: float = 1.0) -> int:
    """Make this process die (SIGKILL) when ``parent`` (default: the current parent) exits.

    Returns the parent watched. Exits at once if the parent is already gone (the race between
    starting and arming)."""
    global _armed_parent
    parent = os.getppid() if parent is None else parent
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # it died before the signal was armed: the kernel will not send it
        die(f"parent {parent} exited before the parent-death signal was set")
    if watchdog and _armed_parent != parent:
        threading.Thread(target=_watch, args=(parent, interval), name="parent-watchdog", daemon=True).start()
    _armed_parent = parent
    return parent


def _after_fork_in_child() -> None:
    # The fork child's parent is the process that forked it; the thread is gone, so no watchdog
    # (starting threads after fork is unsafe); the kernel's signal is enough on Linux.
    parent = _forking_parent
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:
        die(f"parent {parent} exited before the parent-death signal was set")


_forking_parent = os.getpid()


def _before_fork() -> None:
    global _forking_parent
    _forking_parent = os.getpid()


def arm_trainer() -> str | None:
    """For ``megatron_vlm.train``'s main process: die with the launcher (when one started it, see
    the module docstring) and make every forked helper die with this process. Returns why it was
    armed (the launcher variable or the switch), or None."""
    global _fork_hook_registered
    switch = os.environ.get(SWITCH, "")
    if switch == "0":
        return None
    reason = launched_by() or (SWITCH if switch == "1" else None)
    if reason is not None:
        die_with_parent()
    if not _fork_hook_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _fork_hook_registered = True
    return reason


def arm_spawned_helper() -> None:
    """For a multiprocessing spawn child of the trainer (``__name__ == "__mp_main__"``): die with it."""
    if os.environ.get(SWITCH, "") != "0":
        die_with_parent()
