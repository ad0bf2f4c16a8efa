"""``python -m megatron_vlm.train --config FILE [section.key=value ...]``: Idefics2 pretraining."""

import faulthandler
import os
import signal
import sys
import time


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
    announce_start()
    started = time.perf_counter()
    from megatron_vlm.training.loop import main

    print(f"imported in {time.perf_counter() - started:.1f} s", flush=True)
    sys.exit(main())
