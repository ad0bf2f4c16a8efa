"""Slurm preemption: SIGTERM / SIGUSR1 (sent before the time limit) ask for a checkpoint and a clean
exit at the end of the current step, so the requeued job resumes from it."""

from __future__ import annotations

import signal
import types

import torch
import torch.distributed as dist

from megatron_vlm.distributed import collective_device


class PreemptionHandler:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self._requested = False
        for number in signals:
            signal.signal(number, self._handle)

    def _handle(self, number: int, frame: types.FrameType | None) -> None:
        self._requested = True

    def requested(self) -> bool:
        """True on every rank as soon as any rank was signalled (collective)."""
        if not dist.is_initialized():
            return self._requested
        flag = torch.tensor([1.0 if self._requested else 0.0], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag[0])
