"""One optimizer step over micro-batches with Megatron-Core's DDP, optimizer and pipeline schedules,
and forward-only evaluation through the same schedules.

The loss is a per-token mean over the whole global batch: every loss token of every micro-batch on
every data-parallel rank weighs the same, whatever the micro-batch it sits in. This is Megatron-Core's
``calculate_per_token_loss`` path (the same on 0.16 and 0.19): the loss function returns the
micro-batch's summed token loss and its token count, the schedule back-propagates the sum unscaled,
DDP sums (rather than averages) gradients over data-parallel ranks, and ``finalize_model_grads``
divides them by the global batch's token count (broadcast from the last pipeline stage, summed over
data parallelism). The reported loss is the same ratio: summed losses over summed tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_vlm.data.batch import MicroBatch
from megatron_vlm.distributed import collective_device
from megatron_vlm.models.pipeline import pipeline_shape, run_forward_only, unwrapped
from megatron_vlm.training.stragglers import clock


class TimedGradientReduction:
    """``finalize_model_grads``, timed (``training/stragglers.py``): the data-parallel gradient
    reduction, where a rank that finished its backward early waits for the slowest. ``synchronize``
    (a timed step, on a GPU): the device's own work is waited for first, so it is not counted here."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.synchronize = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = clock(self.synchronize)
        result = finalize_model_grads(*args, **kwargs)
        self.seconds = clock(self.synchronize) - start
        return result


def wrap_ddp(
    chunks: Sequence[torch.nn.Module],
    distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
) -> list[DistributedDataParallel]:
    """``overlap_param_gather`` (distributed optimizer only): each updated parameter shard is
    all-gathered during the next forward (DDP's pre-hooks, one bucket ahead) instead of right after
    the optimizer step; read the weights outside a step within ``parameters_gathered``."""
    if overlap_param_gather and not distributed_optimizer:
        raise ValueError("training.overlap_param_gather needs training.distributed_optimizer=true")
    # Per-token loss over the global batch (module docstring). DDP reads the flag when it is built
    # (gradient scaling factor 1 instead of 1/DP), the schedules when they run: set it on every
    # chunk's TransformerConfig before wrapping.
    for chunk in chunks:
        chunk.config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=distributed_optimizer,
        overlap_param_gather=overlap_param_gather,
    )
    wrapped = [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    config = wrapped[0].config
    config.finalize_model_grads_func = TimedGradientReduction()
    if overlap_grad_reduce:
        config.no_sync_func = [chunk.no_sync for chunk in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
        config.grad_sync_func = (
            [chunk.start_grad_sync for chunk in wrapped] if len(wrapped) > 1 else wrapped[0].start_grad_sync
        )
    return wrapped


@contextlib.contextmanager
def parameters_gathered(model: Sequence[DistributedDataParallel]) -> Iterator[None]:
    """The model's parameters as the last optimizer step left them, on every rank, for reading them
    outside a training step (checkpoints, evaluation). With overlapped parameter gathering a rank's
    copy of the shards other ranks own is updated only by the next forward's pre-hooks: they are
    all-gathered now, and the hooks stay off until the block ends (Megatron-LM's pattern)."""
    hooked = [chunk for chunk in model if getattr(chunk, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()


def build_optimizer(model: Sequence[DistributedDataParallel], optimizer_config: OptimizerConfig) -> MegatronOptimizer:
    return get_megatron_optimizer(optimizer_config, list(model))


def _loss(
    loss_mask: torch.Tensor, per_token_loss: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron's (loss, num_tokens, report) form: the summed token loss of the micro-batch, its
    loss-token count (int: the schedule adds it into an int counter) and both for reporting."""
    tokens = loss_mask.sum()
    total = (per_token_loss.float() * loss_mask).sum()
    return total, tokens.detach().to(torch.int), {"lm loss": torch.stack([total.detach(), tokens.detach().float()])}


def forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, partial]:
    batch = next(data_iterator)
    output = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        document_ids=batch["document_ids"],
        pixel_values=batch.get("pixel_values"),
        pixel_attention_mask=batch.get("pixel_attention_mask"),
        labels=batch["labels"],
        packed_length=batch.get("packed_length"),
        noise_seed=batch.get("noise_seed"),
    )
    return output, partial(_loss, batch["loss_mask"])


def step_packed_length(model: Sequence[torch.nn.Module], micro_batches: Sequence[MicroBatch]) -> int | None:
    """Under pipeline parallelism, the one packed length of every micro-batch of a step: its
    longest micro-batch's real tokens. Every stage computes it from the document ids they all hold,
    so the stages send tensors of a shape each knows, with no shape exchange (None without
    pipeline parallelism: each micro-batch packs to its own length)."""
    if not unwrapped(model[0]).pipelined:
        return None
    return max(int((batch["document_ids"] >= 0).sum()) for batch in micro_batches)


def forward_backward(
    model: Sequence[torch.nn.Module],
    micro_batches: Sequence[MicroBatch],
    forward_only: bool = False,
    length: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Run the pipeline schedule over the micro-batches, every one packed to ``length`` under
    pipeline parallelism (``step_packed_length``); loss dicts come back on the last stage."""
    rows, seq = micro_batches[0]["input_ids"].shape
    if length is not None:  # every stage packs every micro-batch of the step to this length
        micro_batches = [{**batch, "packed_length": length} for batch in micro_batches]
    iterators = [iter(micro_batches) for _ in model] if len(model) > 1 else iter(micro_batches)
    seq_length, micro_batch_size = pipeline_shape(model[0], rows, seq, length)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=list(model),
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


class _OnDemand:
    """Micro-batches made when the schedule asks for them, so an evaluation holds one (per model
    chunk in flight) at a time, not all of them. Each model chunk reads every micro-batch once, in
    order (the interleaved schedule: chunk 0 first); one is dropped when the last chunk has read it."""

    def __init__(self, make: Callable[[int], MicroBatch], count: int, readers: int) -> None:
        self.make, self.count, self.readers = make, count, readers
        self.cache: dict[int, list[Any]] = {}

    def _get(self, index: int) -> MicroBatch:
        if index not in self.cache:
            self.cache[index] = [self.make(index), self.readers]
        entry = self.cache[index]
        entry[1] -= 1
        if entry[1] == 0:
            del self.cache[index]
        return entry[0]

    def iterator(self) -> Iterator[MicroBatch]:
        return (self._get(index) for index in range(self.count))


def evaluate(
    model: Sequence[torch.nn.Module],
    make: Callable[[int], MicroBatch],
    count: int,
    micro_batch_size: int,
    seq_length: int,
) -> list[tuple[float, float]]:
    """Forward-only through the pipeline schedule (no grad, dropout off) over ``count``
    micro-batches made by ``make(index)`` (``micro_batch_size`` rows of ``seq_length`` tokens, on
    the model's device). Returns each micro-batch's (summed token loss, loss tokens), in order, on
    last-stage ranks; [] elsewhere."""
    if count == 0:
        return []
    feed = _OnDemand(make, count, len(model))
    iterators = [feed.iterator() for _ in model] if len(model) > 1 else feed.iterator()
    reports = run_forward_only(model, forward_step, iterators, count, seq_length, micro_batch_size)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return []
    return [(float(report["lm loss"][0]), float(report["lm loss"][1])) for report in reports]


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
    timed: bool = False,
) -> dict[str, float]:
    """Zero grads, forward/backward every micro-batch, step. The loss is the global batch's
    per-token mean (summed over micro-batches and data-parallel ranks, divided by their loss
    tokens), broadcast from the last pipeline stage, so every rank returns the same numbers;
    ``positions``: the decoder positions this rank's micro-batches were packed to (filler included);
    ``grad_sync_s`` and ``optimizer_s``: this rank's time in the gradient reduction and in the
    optimizer (device-synchronized when ``timed``: ``training/stragglers.py``)."""
    reduction = getattr(model[0].config, "finalize_model_grads_func", None)
    if isinstance(reduction, TimedGradientReduction):
        reduction.seconds, reduction.synchronize = 0.0, timed
    if not all(getattr(chunk.config, "calculate_per_token_loss", False) for chunk in model):
        raise ValueError("train_step needs the per-token loss path: wrap the model chunks with wrap_ddp")
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    length = step_packed_length(model, micro_batches)
    losses = forward_backward(model, micro_batches, length=length)
    chunk = unwrapped(model[0])
    positions = sum(chunk.layout(batch["document_ids"], length).total for batch in micro_batches)
    optimizer_started = clock(timed)
    if gradients_are_finite(model):
        updated, grad_norm, _ = optimizer.step()
    else:  # a NaN/Inf anywhere: skip this update on every rank
        updated, grad_norm = False, float("nan")
    optimizer_seconds = clock(timed) - optimizer_started
    loss = torch.zeros(1, device=collective_device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        # float64: token counts stay exact and summing micro-batches and ranks adds no float32 rounding.
        totals = torch.stack([item["lm loss"] for item in losses]).double().sum(dim=0).to(collective_device())
        torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        loss[0] = totals[0] / totals[1].clamp(min=1)
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast(loss, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return {
        "loss": float(loss[0]),
        "grad_norm": float(grad_norm if grad_norm is not None else 0.0),
        "updated": bool(updated),
        "positions": positions,
        "grad_sync_s": reduction.seconds if isinstance(reduction, TimedGradientReduction) else 0.0,
        "optimizer_s": optimizer_seconds,
    }
