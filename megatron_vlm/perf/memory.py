"""Memory readings shared by the converters' reports, the trainer's metrics and the memory-model
checks: the process's peak resident memory, and the peak of a training run above its start."""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM where /proc has it (getrusage's maxrss
    also counts the parent's memory at fork), else getrusage."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _file_backed_bytes() -> int:
    """Resident pages that are not process memory: mapped files (library code faulted in on
    first use) and shared memory."""
    return sum((_status_kib(field) or 0) * 1024 for field in ("RssFile", "RssShmem"))


class TrainingMemoryMeter:
    """Peak memory of the training state, comparable with ``perf.memory_model``: on GPUs the
    allocator's peak; on CPU the anonymous (heap) memory at the resident peak, above its level
    when ``start`` ran (interpreter, libraries and communicators are there before the model is
    built). Library pages first touched during training (tens of MiB, depending on the page
    cache) are resident too but are not training state, so they are left out."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.baseline = 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            self.baseline = current_rss_bytes() - _file_backed_bytes()

    def peak_bytes(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.baseline
        # File-backed pages only grow during training, so those mapped now bound those mapped
        # at the peak: this is at least the anonymous memory of the peak moment.
        return peak_rss_bytes() - _file_backed_bytes() - self.baseline

    def process_peak_bytes(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else peak_rss_bytes()
