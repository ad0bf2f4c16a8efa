"""Slurm preemption: SIGTERM / SIGUSR1 (sent before the time limit) ask for a checkpoint and a clean
exit at the end of the current step, so the requeued job resumes from it.

Except when the SIGTERM is Slurm's teardown of a job whose batch script has ended abnormally (it
was SIGKILLed or OOM-killed, or srun was): the launcher is gone, nothing requeues or waits for this
job, the peers are being killed and a save would be cut off KillWait seconds later; the trainer
exits at once (training/lifecycle.py says how the two are told apart)."""

from __future__ import annotations

import signal
import threading
import types

import torch
import torch.distributed as dist

from megatron_vlm.distributed import collective_device
from megatron_vlm.training import lifecycle


class PreemptionHandler:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self._requested = False
        self._teardown_check: threading.Thread | None = None
        for number in signals:
            signal.signal(number, self._handle)

    def _handle(self, number: int, frame: types.FrameType | None) -> None:
        self._requested = True
        if number == signal.SIGTERM and (self._teardown_check is None or not self._teardown_check.is_alive()):
            # Asking Slurm takes a round trip to the controller (one query per rank and SIGTERM):
            # not in the handler, which runs on the main thread in the middle of a step. Asked again
            # at each SIGTERM: a preemption's may come first and the teardown's later.
            self._teardown_check = threading.Thread(target=_exit_if_launcher_gone, name="slurm-teardown", daemon=True)
            self._teardown_check.start()

    def requested(self) -> bool:
        """True on every rank as soon as any rank was signalled (collective)."""
        # Read before the check is looked up: a SIGTERM handled in between counts at the next step,
        # never without its check having answered.
        requested = self._requested
        if self._teardown_check is not None:
            # Let it answer before a checkpoint is started that it would cut off.
            self._teardown_check.join(timeout=15.0)
        if not dist.is_initialized():
            return requested
        flag = torch.tensor([1.0 if requested else 0.0], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag[0])


def _exit_if_launcher_gone() -> None:
    reason = lifecycle.slurm_batch_script_ended()
    if reason is not None:
        lifecycle.die(reason)
