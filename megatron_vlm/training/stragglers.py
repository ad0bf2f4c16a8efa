"""Stragglers named: the rank that is merely slow, which the heartbeat (``distributed.heartbeat``:
ranks that stop answering) does not see.

Every ``training.straggler_interval`` steps one step is timed on every rank, phase by phase:

* ``data``: waiting for the step's micro-batches (the prefetch thread, per-rank loading);
* ``compute``: forward and backward, less the data-parallel gradient reduction;
* ``grad_sync``: the gradient reduction (``finalize_model_grads``), where a rank that finished early
  waits for the slowest;
* ``optimizer``: the finite-gradient check and the optimizer step.

On a GPU the timed step synchronizes the device at each phase boundary (host timers then measure the
device's work); the other steps are not touched. The four times of every rank travel in one
all-gather of a few floats. A rank's own work is ``data + compute``: the waits inside collectives are
another rank's slowness, so every rank's step lasts as long as the slowest one's, and only the work
before the reduction tells them apart. Ranks doing the same work are compared: those at the same
pipeline stage and tensor-parallel rank (data-parallel peers; with data parallelism 1 nobody is
compared). A rank whose work exceeds the median of its peers' by more than ``straggler_margin`` on
``straggler_samples`` timed steps in a row is named in the log with its host and device (the
persistence keeps a rank that drew a heavier micro-batch once, with more or larger images, from
being named). Every timed step's per-rank times go to TensorBoard (``ranks/<rank>/<phase>_s``).

NVIDIA's Resiliency Extension (``nvidia-resiliency-ext``) has a straggler detector of its own
(CUDA-kernel timing per section, scores relative to the other ranks) for GPU clusters that run it;
this one needs nothing beyond torch and runs on CPU too.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from dataclasses import dataclass, field

import torch

from megatron_vlm.distributed import all_gather_object, collective_device

PHASES = ("data", "compute", "grad_sync", "optimizer")
# A test hook: "RANK:SECONDS" makes that global rank sleep in its compute phase every step (the
# slowed rank of tests/test_training.py). Unset in real runs.
DELAY_ENVIRONMENT = "MEGATRON_VLM_TEST_COMPUTE_DELAY"


def clock(synchronize: bool) -> float:
    """Host time; on a GPU first waiting for the device when ``synchronize`` (a timed step)."""
    if synchronize and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def injected_delay(rank: int) -> float:
    """Seconds of the test hook's delay for ``rank`` (0 when unset or another rank's)."""
    value = os.environ.get(DELAY_ENVIRONMENT, "")
    if not value:
        return 0.0
    slowed, seconds = value.split(":")
    return float(seconds) if int(slowed) == rank else 0.0


@dataclass
class StragglerReport:
    step: int
    times: list[dict[str, float]]  # per global rank: phase -> seconds
    named: list[str] = field(default_factory=list)  # log lines of the ranks named at this step


class StragglerMonitor:
    """Collective (every rank builds one and calls ``observe`` on the same steps)."""

    def __init__(self, interval: int, margin: float, samples: int, position: tuple[int, int], device: str) -> None:
        self.interval, self.margin, self.samples = interval, margin, samples
        # Who is where, gathered once (not at all when never timed): host, device, and the (pipeline,
        # tensor) position whose data-parallel peers do the same work.
        me = {"host": socket.gethostname(), "device": device, "position": position}
        self.ranks = all_gather_object(me) if interval > 0 else [me]
        self.peers = [
            [r for r, other in enumerate(self.ranks) if r != rank and other["position"] == where["position"]]
            for rank, where in enumerate(self.ranks)
        ]
        self.slow_in_a_row = [0] * len(self.ranks)

    def due(self, step: int) -> bool:
        return self.interval > 0 and step % self.interval == 0

    def observe(self, step: int, times: dict[str, float]) -> StragglerReport:
        local = torch.tensor([times[phase] for phase in PHASES], dtype=torch.float64, device=collective_device())
        gathered = [torch.zeros_like(local) for _ in self.ranks]
        torch.distributed.all_gather(gathered, local)
        table = [dict(zip(PHASES, row.tolist(), strict=True)) for row in gathered]
        work = [row["data"] + row["compute"] for row in table]
        report = StragglerReport(step, table)
        for rank, (where, peers) in enumerate(zip(self.ranks, self.peers, strict=True)):
            if not peers:
                continue
            typical = statistics.median(work[r] for r in peers)
            slow = work[rank] > typical * (1 + self.margin)
            self.slow_in_a_row[rank] = self.slow_in_a_row[rank] + 1 if slow else 0
            if self.slow_in_a_row[rank] >= self.samples:
                report.named.append(
                    f"straggler: rank {rank} ({where['host']}, {where['device']}) took {work[rank]:.3f} s of data + "
                    f"compute against a median {typical:.3f} s of its {len(peers)} data-parallel peer(s) "
                    f"(+{100 * (work[rank] / max(typical, 1e-9) - 1):.0f}%, {self.slow_in_a_row[rank]} timed steps "
                    f"in a row; margin {100 * self.margin:.0f}%)"
                )
        return report
