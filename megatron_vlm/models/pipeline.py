"""Inference through Megatron-Core's pipeline schedules: forward-only runs at any TP/PP/VPP layout
(the trainer's evaluation), and full logits of a batch (the verify tool, the conversion and parity
checks)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_vlm.data.batch import MicroBatch
from megatron_vlm.models.idefics2 import gather_logits


def unwrapped(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model chunk inside wrappers such as Megatron's DDP."""
    while not hasattr(chunk, "pipeline_shape") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def pipeline_shape(
    chunk: torch.nn.Module, micro_batch_size: int, seq_length: int, packed_length: int | None = None
) -> tuple[int, int]:
    """(seq_length, micro_batch_size) the pipeline schedules are given for micro-batches of this size:
    the model chunk's (possibly wrapped, e.g. in DDP) packed layout, one row of packed tokens."""
    return unwrapped(chunk).pipeline_shape(micro_batch_size, seq_length, packed_length)


def run_forward_only(
    model: Sequence[torch.nn.Module],
    step: Callable[[Any, torch.nn.Module], tuple[torch.Tensor, Any]],
    data_iterator: Any,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> list[Any]:
    """``num_microbatches`` forward passes through the pipeline schedule with dropout off and no
    grad; each chunk's training mode is restored afterwards, whatever happens. Returns the
    schedule's per-micro-batch reports (last pipeline stage; [] elsewhere)."""
    training = [chunk.training for chunk in model]
    sent_length, sent_rows = pipeline_shape(model[0], micro_batch_size, seq_length)
    for chunk in model:
        chunk.eval()
    try:
        with torch.no_grad():
            return get_forward_backward_func()(
                forward_step_func=step,
                data_iterator=data_iterator,
                model=list(model),
                num_microbatches=num_microbatches,
                seq_length=sent_length,
                micro_batch_size=sent_rows,
                forward_only=True,
            )
    finally:
        for chunk, was_training in zip(model, training, strict=True):
            chunk.train(was_training)


def forward_logits(model: Sequence[torch.nn.Module], micro_batch: MicroBatch, vocab_size: int) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, V] of one batch (the model's forward inputs,
    ``batch.forward_inputs``) through the pipeline schedule (no grad). Returns them on last-stage
    ranks and None elsewhere."""

    def step(data_iterator: Any, chunk: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        output = chunk(**next(data_iterator))

        def collect(output_tensor: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return output_tensor.sum() * 0.0, {"logits": gather_logits(output_tensor, vocab_size)}

        return output, collect

    # The interleaved schedule needs at least PP micro-batches: the batch runs twice.
    repeats = max(2, parallel_state.get_pipeline_model_parallel_world_size())
    input_ids = micro_batch["input_ids"]
    iterators = [iter([micro_batch] * repeats) for _ in model] if len(model) > 1 else iter([micro_batch] * repeats)
    collected = run_forward_only(
        model, step, iterators, repeats, seq_length=input_ids.shape[1], micro_batch_size=input_ids.shape[0]
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return collected[0]["logits"]
