"""One optimizer step over micro-batches with Megatron-Core's DDP, optimizer and pipeline schedules."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_vlm.data.batch import MicroBatch
from megatron_vlm.distributed import collective_device


def wrap_ddp(
    chunks: Sequence[torch.nn.Module], distributed_optimizer: bool = False, overlap_grad_reduce: bool = False
) -> list[DistributedDataParallel]:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    config = wrapped[0].config
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:
        config.no_sync_func = [chunk.no_sync for chunk in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
        config.grad_sync_func = (
            [chunk.start_grad_sync for chunk in wrapped] if len(wrapped) > 1 else wrapped[0].start_grad_sync
        )
    return wrapped


def build_optimizer(model: Sequence[DistributedDataParallel], optimizer_config: OptimizerConfig) -> MegatronOptimizer:
    return get_megatron_optimizer(optimizer_config, list(model))


def _loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokens = loss_mask.sum()
    loss = (per_token_loss.float() * loss_mask).sum() / tokens.clamp(min=1)
    return loss, {"lm loss": torch.stack([loss.detach(), tokens.detach()])}


def forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, partial]:
    batch = next(data_iterator)
    output = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch.get("pixel_values"),
        pixel_attention_mask=batch.get("pixel_attention_mask"),
        labels=batch["labels"],
    )
    return output, partial(_loss, batch["loss_mask"])


def forward_backward(
    model: Sequence[torch.nn.Module],
    micro_batches: Sequence[MicroBatch],
    forward_only: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Run the pipeline schedule over the micro-batches; loss dicts come back on the last stage."""
    input_ids = micro_batches[0]["input_ids"]
    iterators = [iter(micro_batches) for _ in model] if len(model) > 1 else iter(micro_batches)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=list(model),
        num_microbatches=len(micro_batches),
        seq_length=input_ids.shape[1],
        micro_batch_size=input_ids.shape[0],
        forward_only=forward_only,
    )


def gradients_are_finite(model: Sequence[torch.nn.Module]) -> bool:
    """Collective: whether every reduced gradient on every rank is finite."""
    checks = [torch.ones((), dtype=torch.bool, device=collective_device())]
    for chunk in model:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is not None:
                checks.append(torch.isfinite(grad).all())  # stays on the device: one sync below
    finite = torch.stack(checks).all().float().reshape(1)
    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite[0])


def train_step(
    model: Sequence[DistributedDataParallel],
    optimizer: MegatronOptimizer,
    micro_batches: Sequence[MicroBatch],
) -> dict[str, float]:
    """Zero grads, forward/backward every micro-batch, step. Loss is averaged over micro-batches
    and broadcast from the last pipeline stage, so every rank returns the same numbers."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = forward_backward(model, micro_batches)
    if gradients_are_finite(model):
        updated, grad_norm, _ = optimizer.step()
    else:  # a NaN/Inf anywhere: skip this update on every rank
        updated, grad_norm = False, float("nan")
    loss = torch.zeros(1, device=collective_device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        loss[0] = torch.stack([item["lm loss"][0] for item in losses]).mean()
        torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        loss /= parallel_state.get_data_parallel_world_size()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast(loss, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return {
        "loss": float(loss[0]),
        "grad_norm": float(grad_norm if grad_norm is not None else 0.0),
        "updated": bool(updated),
    }
