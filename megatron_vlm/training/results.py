"""A run's structured result (``<output_dir>/results.json``), what scaling sweeps collect:
measured throughput, MFU and peak memory per rank, next to the layout and the memory model's
prediction for the largest micro-batch the run saw."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state

from megatron_vlm import backend, distributed
from megatron_vlm.backbones.common import use_transformer_engine
from megatron_vlm.config import RunConfig, to_dict
from megatron_vlm.perf.memory import TrainingMemoryMeter
from megatron_vlm.perf.memory_model import TrainingSetup, Workload, predict_memory


class RunResults:
    """Throughput over the logged windows after the first (start-up and warm-up excluded),
    and the shapes of the largest micro-batch seen."""

    def __init__(
        self, run: RunConfig, meter: TrainingMemoryMeter, peak_tflops: float, world_size: int, micro_batches: int
    ) -> None:
        """``micro_batches``: per step and data-parallel rank (``preflight.check_batch_layout``)."""
        self.run, self.meter, self.peak_tflops = run, meter, peak_tflops
        self.world_size, self.micro_batches = world_size, micro_batches
        self.data_parallel = world_size // (run.parallel.tensor_parallel * run.parallel.pipeline_parallel)
        self.totals = {"tokens": 0.0, "images": 0.0, "flops": 0.0, "seconds": 0.0, "steps": 0}
        self.windows = 0
        self.training_peak = 0  # memory peak as of the last logged step: checkpoint writes after it excluded
        self.micro_batch_size = self.seq_length = self.images = self.patches = 0
        # (step, training loss) at every logged step: the curves a comparison of variants plots.
        self.loss_history: list[tuple[int, float]] = []

    def observe(self, batches: list[dict[str, Any]]) -> None:
        patch = self.run.model.vision.patch_size
        for batch in batches:
            rows, seq = batch["input_ids"].shape
            self.micro_batch_size, self.seq_length = max(self.micro_batch_size, rows), max(self.seq_length, seq)
            pixels = batch.get("pixel_values")
            if pixels is not None and pixels.shape[0]:
                self.images = max(self.images, pixels.shape[0])
                self.patches = max(self.patches, (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch))

    def add_window(
        self, tokens: float, images: float, flops: float, seconds: float, steps: int, step: int, loss: float
    ) -> None:
        """One logged window: its totals (over the data-parallel ranks), and the loss at its last step."""
        self.loss_history.append((step, loss))
        self.windows += 1
        self.training_peak = max(self.training_peak, self.meter.peak_bytes())
        if self.windows == 2:  # the first window held start-up: keep it only if nothing follows
            self.totals = {"tokens": 0.0, "images": 0.0, "flops": 0.0, "seconds": 0.0, "steps": 0}
        for name, value in (("tokens", tokens), ("images", images), ("flops", flops), ("seconds", seconds)):
            self.totals[name] += value
        self.totals["steps"] += steps

    def predicted_stage_peaks(self) -> list[float]:
        run = self.run
        setup = TrainingSetup(
            parallel=run.parallel,
            data_parallel=self.data_parallel,
            num_microbatches=self.micro_batches,
            params_dtype=run.precision.params_dtype,
            distributed_optimizer=run.training.distributed_optimizer,
            trainable=run.trainable,
            kernels="te" if use_transformer_engine(run.precision) else "local",
        )
        work = Workload(self.micro_batch_size, self.seq_length, self.images, self.patches)
        return [stage.peak for stage in predict_memory(run.model, setup, work)]

    def write(
        self,
        path: Path,
        iteration: int,
        last: dict[str, float],
        validation: dict[str, float] | None = None,
        benchmarks: list[dict[str, Any]] | None = None,
        seen: dict[str, int] | None = None,
    ) -> dict[str, Any] | None:
        """Collective (gathers every rank's memory); rank 0 writes the file. ``validation``: the last
        evaluation's loss per source; ``benchmarks``: every benchmark evaluation of this run (step,
        images and text tokens seen, scores); ``seen``: images and text tokens trained on."""
        device = distributed.collective_device()
        mine = torch.tensor(
            [
                self.training_peak or self.meter.peak_bytes(),
                self.meter.process_peak_bytes(),
                parallel_state.get_pipeline_model_parallel_rank(),
            ],
            dtype=torch.float64,
            device=device,
        )
        gathered = [torch.zeros_like(mine) for _ in range(self.world_size)]
        torch.distributed.all_gather(gathered, mine)
        if distributed.global_rank() != 0:
            return None
        run, totals = self.run, self.totals
        seconds = max(totals["seconds"], 1e-9)
        parallel = run.parallel
        achieved = totals["flops"] / seconds / 1e12
        result = {
            "run": str(path.parent),
            "device": torch.cuda.get_device_name() if backend.has_cuda() else "cpu",
            "nodes": int(os.environ.get("SLURM_JOB_NUM_NODES", "1")),
            "world_size": self.world_size,
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "layout": {
                "tensor_parallel": parallel.tensor_parallel,
                "pipeline_parallel": parallel.pipeline_parallel,
                "virtual_pipeline": parallel.virtual_pipeline,
                "data_parallel": self.data_parallel,
                "micro_batch_size": run.data.micro_batch_size,
                "global_batch_size": run.training.global_batch_size,
                "num_microbatches": self.micro_batches,
                "recompute": parallel.recompute,
                "distributed_optimizer": run.training.distributed_optimizer,
                "params_dtype": run.precision.params_dtype,
                "fp8": run.precision.fp8,
            },
            "steps": iteration,
            "measured_steps": totals["steps"],
            "measured_seconds": totals["seconds"],
            "seconds_per_step": seconds / max(totals["steps"], 1),
            "tokens_per_second": totals["tokens"] / seconds,
            "tokens_per_second_per_rank": totals["tokens"] / seconds / self.world_size,
            "images_per_second": totals["images"] / seconds,
            "tflops_per_second": achieved,
            "peak_tflops_per_rank": self.peak_tflops,
            "mfu": achieved / (self.peak_tflops * self.world_size),
            "loss": last.get("loss"),
            "loss_history": self.loss_history,
            "validation_loss": dict(validation or {}),
            "benchmarks": list(benchmarks or []),
            "images_seen": (seen or {}).get("images"),
            "text_tokens_seen": (seen or {}).get("text_tokens"),
            "memory": {
                "measured": ("cuda allocator peak" if backend.has_cuda() else "resident memory above the start (VmHWM)")
                + ", up to the last logged step",
                "measured_peak_bytes_per_rank": [int(t[0]) for t in gathered],
                "process_peak_bytes_per_rank": [int(t[1]) for t in gathered],
                "stage_of_rank": [int(t[2]) for t in gathered],
                "predicted_peak_bytes_per_stage": self.predicted_stage_peaks(),
                "predicted_for": {
                    "micro_batch_size": self.micro_batch_size,
                    "seq_length": self.seq_length,
                    "images": self.images,
                    "patches_per_image": self.patches,
                },
            },
            "config": to_dict(run),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(result, indent=2, default=str))
        partial.replace(path)  # atomic: a sweep never reads half a result
        return result
