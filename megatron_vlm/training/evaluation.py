"""Validation during pretraining: the loss per source on fixed held-out micro-batches
(``data/validation.py``), forward only through the pipeline schedule, under any TP/PP/DP layout.

Each data-parallel rank evaluates its share of the micro-batches (``ValidationSet.plans_for``);
the last pipeline stage sums every micro-batch's token loss and loss tokens per source, in
float64, over data parallelism, and broadcasts the sums along the pipeline, so every rank returns
the same per-token mean per source. The plans, and so the sums, do not depend on the layout: the
losses agree between layouts up to floating-point summation order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from megatron_vlm.data.batch import MODEL_INPUTS, MicroBatch
from megatron_vlm.data.loader import MultimodalLoader
from megatron_vlm.data.validation import ValidationSet
from megatron_vlm.distributed import collective_device
from megatron_vlm.training.step import evaluate


@dataclass(frozen=True)
class SourceLoss:
    loss: float  # per-token mean over the source's validation tokens
    tokens: int  # its loss tokens (the same at every evaluation)


class Evaluator:
    """The fixed validation micro-batches of a run and how to evaluate the model on them."""

    def __init__(self, loader: MultimodalLoader, samples: int, device: str | torch.device) -> None:
        self.validation = ValidationSet(loader, samples)
        self.device = device
        self.seconds = 0.0  # how long the last evaluation took (the ETA counts it)

    @property
    def sources(self) -> list[str]:
        return self.validation.sources

    def describe(self) -> str:
        return self.validation.describe()

    def micro_batches(self, model_chunks: int) -> int:
        """Micro-batches this rank runs per evaluation (``model_chunks`` > 1: interleaved schedule,
        which runs whole groups of PP micro-batches)."""
        return len(self._plans(model_chunks))

    def _plans(self, model_chunks: int) -> list:
        multiple = parallel_state.get_pipeline_model_parallel_world_size() if model_chunks > 1 else 1
        return self.validation.plans_for(
            parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(), multiple
        )

    def run(self, model: Sequence[torch.nn.Module]) -> dict[str, SourceLoss]:
        """Collective: the validation loss per source, the same on every rank."""
        started = time.perf_counter()
        plans = self._plans(len(model))
        sources = self.sources
        seq_length = self.validation.loader.config.max_seq_len

        def make(index: int) -> MicroBatch:
            batch = self.validation.micro_batch(plans[index])
            return {name: batch[name].to(self.device, non_blocking=True) for name in MODEL_INPUTS}

        results = evaluate(model, make, len(plans), self.validation.micro_batch_size, seq_length)
        # Summed in Python floats (float64) and made a tensor once, on the collectives' device: adding
        # host tensors into a CUDA one is what failed on the first GPU run (docs/gpu.md, 2026-11-28).
        sums = [[0.0, 0.0] for _ in sources]
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            for plan, (loss, tokens) in zip(plans, results, strict=True):
                if plan.source is not None:
                    sums[sources.index(plan.source)][0] += loss
                    sums[sources.index(plan.source)][1] += tokens
        totals = torch.tensor(sums, dtype=torch.float64, device=collective_device())
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        torch.distributed.broadcast(
            totals,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        self.seconds = time.perf_counter() - started
        return {
            name: SourceLoss(float(totals[i, 0] / totals[i, 1].clamp(min=1)), int(totals[i, 1]))
            for i, name in enumerate(sources)
        }


def evaluations_left(step: int, total: int, interval: int) -> int:
    """Evaluations still to come after ``step``: every ``interval`` steps and one at the end."""
    if interval <= 0 or step >= total:
        return 0
    return total // interval - step // interval + (1 if total % interval else 0)
