"""``python -m megatron_vlm.train --config FILE [section.key=value ...] [--force-unlock]``: Idefics2 pretraining.

``--force-unlock`` takes over the run directory's lock when its holder's liveness cannot be
checked (another host, not a Slurm job); a holder seen alive is never overridden."""

import faulthandler
import os
import signal
import sys
import time

from megatron_vlm.training import lifecycle

if __name__ == "__mp_main__":
    # A multiprocessing spawn child of the trainer (dist_checkpointing's Manager server): it
    # imports this module as __mp_main__ and must die with the trainer (training/lifecycle.py).
    lifecycle.arm_spawned_helper()

FORCE_UNLOCK = "--force-unlock"


def announce_start() -> None:
    """Say that the process started, before the imports that take seconds to minutes (torch,
    Megatron-Core, CUDA libraries), and make a hang diagnosable: a crash in native code prints the
    Python stack, and SIGUSR2 prints every thread's stack without stopping the run
    (``bench/gpu_check.sh`` sends it to a step that runs out of time, then kills it)."""
    faulthandler.enable()
    if hasattr(signal, "SIGUSR2"):
        faulthandler.register(signal.SIGUSR2, all_threads=True)
    rank = next(
        (os.environ[n] for n in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK") if n in os.environ), "-"
    )
    print(
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} megatron_vlm.train: pid {os.getpid()}, rank {rank}, "
        f"Python {sys.version.split()[0]}; importing torch and megatron.core (kill -USR2 {os.getpid()} dumps the stacks)",
        flush=True,
    )


if __name__ == "__main__":  # the guard matters: dist_checkpointing may spawn worker processes
    # Die with the launcher (torchrun / srun / mpirun) and take forked helpers along: no orphans.
    lifecycle.arm_trainer()
    if FORCE_UNLOCK in sys.argv[1:]:
        # Take a run-directory lock whose holder cannot be checked (training/run_lock.py).
        sys.argv.remove(FORCE_UNLOCK)
        os.environ["MEGATRON_VLM_FORCE_UNLOCK"] = "1"
    announce_start()
    started = time.perf_counter()
    from megatron_vlm.training.loop import main

    print(f"imported in {time.perf_counter() - started:.1f} s", flush=True)
    sys.exit(main())
