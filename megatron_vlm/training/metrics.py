"""Training metrics: TensorBoard scalars and readable periodic log lines."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

logger = logging.getLogger("megatron_vlm.train")

TENSORBOARD_METRICS = (
    "loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_second",
    "images_per_second",
    "tflops_per_second",
    "mfu",
    "memory_gib",
    "skipped_samples",
    "skipped_steps",
    # Of the decoder positions computed, the real tokens (the rest is padding of the micro-batches);
    # of the vision encoder positions computed, the real patches (packed images: padding never runs).
    "real_token_fraction",
    "real_patch_fraction",
)


class Metrics:
    """Writes on one rank (the one holding the loss: last pipeline stage, first TP/DP rank)."""

    def __init__(self, directory: str | Path | None) -> None:
        self.writer = None
        if directory is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(directory))

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        self.writer.flush()

    def write_validation(self, step: int, losses: dict[str, float]) -> None:
        """The validation loss per source: ``validation/<source>/loss``."""
        if self.writer is None:
            return
        for source, loss in losses.items():
            self.writer.add_scalar(f"validation/{source}/loss", loss, step)
        self.writer.flush()

    def write_benchmarks(self, entry: dict) -> None:
        """Benchmark scores (``training/benchmarks.py``): ``benchmark/<task>/<metric>`` and
        ``benchmark/average`` at the step, and the average against the images and text tokens seen
        (the paper's Figure 4 axes: TensorBoard's step axis holds those counts there)."""
        if self.writer is None:
            return
        from megatron_vlm.training.benchmarks import scalars

        for name, value in scalars(entry).items():
            self.writer.add_scalar(f"benchmark/{name}", value, entry["step"])
        self.writer.add_scalar("benchmark_by_images_seen/average", entry["average"], entry["images_seen"])
        self.writer.add_scalar("benchmark_by_text_tokens_seen/average", entry["average"], entry["text_tokens_seen"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def log_line(
    step: int, total: int, values: dict[str, float], seconds_per_step: float, other_seconds: float = 0.0
) -> str:
    """``other_seconds``: time still to come besides the training steps (evaluations), in the ETA."""
    eta = datetime.timedelta(seconds=int(seconds_per_step * (total - step) + other_seconds))
    return (
        f"step {step:>6}/{total} | loss {values['loss']:.4f} | lr {values['learning_rate']:.3e} | "
        f"grad norm {values['grad_norm']:.3f} | {values['tokens_per_second']:.0f} tok/s | "
        f"{values['images_per_second']:.1f} img/s | {values['tflops_per_second']:.3f} TFLOP/s | "
        f"MFU {100 * values['mfu']:.1f}% | mem {values['memory_gib']:.2f} GiB | "
        f"skipped samples {values['skipped_samples']:.0f}, steps {values['skipped_steps']:.0f} | ETA {eta}"
    )


def validation_line(step: int, total: int, losses: dict[str, tuple[float, int]], seconds: float) -> str:
    """``losses``: source -> (per-token loss, loss tokens)."""
    parts = ", ".join(f"{source} {loss:.4f} ({tokens} tokens)" for source, (loss, tokens) in losses.items())
    return f"step {step:>6}/{total} | validation loss {parts} | {seconds:.1f} s"
