"""Training metrics: TensorBoard scalars (and the same to Weights & Biases) and readable periodic log lines."""

from __future__ import annotations

import datetime
import logging
import os
import uuid
from pathlib import Path

from megatron_vlm.config import WandbConfig, to_dict

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

# What the benchmark averages are also plotted against (TensorBoard's step axis, W&B's step metrics).
SEEN_COUNTERS = ("images_seen", "text_tokens_seen")


class WandbRun:
    """One W&B run per training run (``logging.wandb``), continued across restarts: its id is kept in
    OUTPUT/wandb_run_id, and a restart resumes it (``resume="allow"``). Benchmark averages against
    images and text tokens seen (TensorBoard puts those counts on its step axis) get W&B step metrics
    of their own, ``images_seen`` and ``text_tokens_seen``."""

    ID_FILE = "wandb_run_id"

    def __init__(self, config: WandbConfig, run_config: object, output: Path) -> None:
        import wandb

        id_file = output / self.ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # W&B ids: letters and digits
            temporary = id_file.with_name(f".{id_file.name}.tmp")
            temporary.write_text(run_id + "\n")
            os.replace(temporary, id_file)
        self.run = wandb.init(
            project=config.project,
            entity=config.entity,
            name=config.name or output.name,
            mode=config.mode,
            dir=str(output),
            id=run_id,
            # Offline, each session writes its own directory under the same id (wandb sync joins them).
            resume="allow" if config.mode == "online" else None,
            tags=list(config.tags),
            config=to_dict(run_config),
        )
        for counter in SEEN_COUNTERS:
            self.run.define_metric(counter)
            self.run.define_metric(f"benchmark_by_{counter}/*", step_metric=counter)
        logger.info("W&B run %s (%s, project %s) in %s", run_id, config.mode, config.project, output / "wandb")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self) -> None:
        self.run.finish()


class Metrics:
    """Writes on one rank (the one holding the loss: last pipeline stage, first TP/DP rank): the
    same scalars to TensorBoard and, when ``logging.wandb`` names a project, to W&B."""

    def __init__(
        self, directory: str | Path | None, wandb: WandbConfig | None = None, run_config: object = None
    ) -> None:
        self.writer = None
        self.wandb: WandbRun | None = None
        if directory is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(directory))
            if wandb is not None and wandb.project:
                self.wandb = WandbRun(wandb, run_config, Path(directory).parent)

    def _tensorboard(self, step: int, values: dict[str, float]) -> None:
        """TensorBoard scalars at ``step``."""
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def _scalars(self, step: int, values: dict[str, float], wandb_only: dict[str, float] | None = None) -> None:
        """``values`` at ``step`` to TensorBoard and W&B; ``wandb_only``: W&B's step metrics beside them."""
        self._tensorboard(step, values)
        if self.wandb is not None:
            self.wandb.log({**values, **(wandb_only or {})}, step)

    def write(self, step: int, values: dict[str, float]) -> None:
        self._scalars(step, {f"train/{name}": value for name, value in values.items()})

    def write_validation(self, step: int, losses: dict[str, float]) -> None:
        """The validation loss per source: ``validation/<source>/loss``."""
        self._scalars(step, {f"validation/{source}/loss": loss for source, loss in losses.items()})

    def write_benchmarks(self, entry: dict) -> None:
        """Benchmark scores (``training/benchmarks.py``): ``benchmark/<task>/<metric>`` and
        ``benchmark/average`` at the step, and the average against the images and text tokens seen
        (the paper's Figure 4 axes: TensorBoard's step axis holds those counts there; W&B's step
        metrics ``images_seen`` and ``text_tokens_seen``)."""
        from megatron_vlm.training.benchmarks import scalars as benchmark_scalars

        scores = {f"benchmark/{name}": value for name, value in benchmark_scalars(entry).items()}
        against = {f"benchmark_by_{counter}/average": entry["average"] for counter in SEEN_COUNTERS}
        for counter in SEEN_COUNTERS:
            self._tensorboard(entry[counter], {f"benchmark_by_{counter}/average": entry["average"]})
        self._scalars(entry["step"], scores, wandb_only={**against, **{c: entry[c] for c in SEEN_COUNTERS}})

    def write_rank_times(self, step: int, times: list[dict[str, float]]) -> None:
        """Every rank's phase times of a timed step (``training/stragglers.py``): ``ranks/<rank>/<phase>_s``."""
        self._scalars(
            step,
            {
                f"ranks/{rank:05d}/{phase}_s": seconds
                for rank, row in enumerate(times)
                for phase, seconds in row.items()
            },
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


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
