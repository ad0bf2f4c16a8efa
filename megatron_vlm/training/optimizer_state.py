"""The optimizer's state in model space: one tensor per model parameter and state, resharded on load.

Megatron-Core keeps Adam's state where the optimizer steps: with the distributed optimizer each
data-parallel rank holds a flat range of every parameter's fp32 main copy and moments; with bf16
parameters and no distributed optimizer every rank holds them whole. Neither layout survives a
change of (TP, PP, DP), and Megatron-Core's own reshardable formats fail without apex/TE on the
versions we support (0.16.1: flattened ranges refused, torch Adam's 'step' dropped, bf16 main
parameters mapped to the wrong tensors; 0.19.2: the state is gathered with ``.cuda()``, and the
default format does not find our parameters).

So we write the state as the model is written: for every trainable parameter, its fp32 main copy
(when the parameter itself is lower precision) and each Adam state tensor, shaped like the
parameter and sharded like it (the model's own sharded entries, TP offsets, pipeline-global layer
numbers, the SwiGLU factories), through ``dist_checkpointing``. Any layout loads it: each rank reads
the parameters it holds now and keeps its flat range. The distributed optimizer's ranges are
summed into the whole parameter over its data-parallel group first, one parameter at a time;
only the main replica (data-parallel rank 0, and TP rank 0 of TP-replicated parameters) keeps a
host copy to write. The step count (the same for every parameter) is recorded in JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica
from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
from megatron.core.dist_checkpointing.validation import StrictHandling

MAIN = "param"  # the fp32 main copy's name among the state tensors


@dataclass
class _Shard:
    """What this rank's optimizer holds of one model parameter."""

    param: torch.nn.Parameter  # the model parameter (this rank's TP piece)
    main: torch.Tensor | None  # what the inner optimizer steps: fp32, [start, end) of ``param`` flattened
    inner: torch.optim.Optimizer
    start: int
    end: int
    group: Any  # the data-parallel group holding the other ranges (distributed optimizer), else None


def _parts(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _shards(optimizer: Any) -> dict[int, _Shard]:
    """Every parameter the optimizer trains, by ``id``; with the distributed optimizer also those
    whose range on this rank is empty (``main`` None): the data-parallel sums need every rank."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    shards: dict[int, _Shard] = {}
    for part in _parts(optimizer):
        if isinstance(part, DistributedOptimizer):
            # Every parameter of its gradient buffers (the range map lists only those with a range here).
            for param in (param for buffer in part.buffers for param in buffer.param_index_map):
                shards[id(param)] = _Shard(param, None, part.optimizer, 0, 0, part.data_parallel_group)
            pairs = [(part.model_float16_groups, part.shard_fp32_from_float16_groups)]
            pairs.append((part.model_fp32_groups, part.shard_fp32_groups))
            for models, mains in pairs:
                for model_group, main_group in zip(models, mains, strict=True):
                    for param, main in zip(model_group, main_group, strict=True):
                        where = part._get_model_param_range_map(param)["param"]
                        shards[id(param)] = _Shard(
                            param, main, part.optimizer, where.start, where.end, part.data_parallel_group
                        )
        elif hasattr(part, "float16_groups"):  # bf16 parameters, fp32 main copies, whole on every rank
            pairs = [(part.float16_groups, part.fp32_from_float16_groups)]
            pairs.append((part.fp32_from_fp32_groups, part.fp32_from_fp32_groups))
            for models, mains in pairs:
                for model_group, main_group in zip(models, mains, strict=True):
                    for param, main in zip(model_group, main_group, strict=True):
                        shards[id(param)] = _Shard(param, main, part.optimizer, 0, param.numel(), None)
        else:  # fp32: the optimizer steps the model parameters themselves
            for group in part.optimizer.param_groups:
                for param in group["params"]:
                    shards[id(param)] = _Shard(param, param, part.optimizer, 0, param.numel(), None)
    return shards


def _entries(model_entries: dict[str, Any]) -> dict[int, ShardedTensor | ShardedTensorFactory]:
    return {
        id(entry.data): entry
        for entry in nested_values(model_entries)
        if isinstance(entry, ShardedTensor | ShardedTensorFactory)
    }


def _ordered(chunks: Sequence[torch.nn.Module], shards: dict[int, _Shard]) -> list[_Shard]:
    """The trained parameters in model order: the same on every rank of a data-parallel group."""
    return [shards[id(p)] for chunk in chunks for p in chunk.parameters() if id(p) in shards]


def _step_and_keys(shards: Sequence[_Shard]) -> tuple[int | None, list[str]]:
    """Adam's step count and the names of its per-parameter state tensors, agreed by every rank
    (a rank may hold no range of any parameter yet)."""
    steps, keys = set(), set()
    for shard in shards:
        if shard.main is None:
            continue
        state = shard.inner.state.get(shard.main, {})
        keys |= {k for k, v in state.items() if torch.is_tensor(v) and v.shape == shard.main.shape and k != "step"}
        if "step" in state:
            steps.add(int(state["step"]))
        for group in shard.inner.param_groups:  # fused optimizers (apex, TE) count per group
            if "step" in group and any(p is shard.main for p in group["params"]):
                steps.add(int(group["step"]))
    gathered: list[Any] = [(sorted(steps), sorted(keys))]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (sorted(steps), sorted(keys)))
    all_steps = {s for rank_steps, _ in gathered for s in rank_steps}
    if len(all_steps) > 1:
        raise RuntimeError(f"the optimizer's parameters are at different steps {sorted(all_steps)}: cannot save them")
    return (all_steps.pop() if all_steps else None), sorted({k for _, rank_keys in gathered for k in rank_keys})


def _names(shard: _Shard, keys: Sequence[str]) -> list[str]:
    """The state tensors written for a parameter: its main copy only when it is a separate (fp32) one."""
    return ([MAIN] if shard.param.dtype != torch.float32 else []) + list(keys)


def sharded_state(
    optimizer: Any, chunks: Sequence[torch.nn.Module], model_entries: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective (data-parallel sums). (sharded state dict for ``dist_checkpointing.save``, JSON description)."""
    entries = _entries(model_entries)
    shards = _ordered(chunks, _shards(optimizer))
    step, keys = _step_and_keys(shards)
    state: dict[str, dict[str, Any]] = {}
    # Dict keys are positions here: the layers of a stack share one checkpoint key (a prepended axis).
    for position, shard in enumerate(shards):
        entry = entries[id(shard.param)]
        keep = is_main_replica(entry.replica_id)
        for name in _names(shard, keys):
            piece = None
            if shard.main is not None:
                piece = shard.main if name == MAIN else shard.inner.state[shard.main][name]
            whole = torch.zeros(shard.param.numel(), dtype=torch.float32, device=shard.param.device)
            if piece is not None:
                whole[shard.start : shard.end] = piece.detach().view(-1)
            if shard.group is not None:
                dist.all_reduce(whole, group=shard.group)  # ranges are disjoint: the sum is the parameter
            # Replicas write nothing: a zero-strided stand-in of the right shape costs no memory.
            data = (
                whole.view(shard.param.shape).cpu()
                if keep
                else torch.zeros((), dtype=torch.float32).expand(shard.param.shape)
            )
            state.setdefault(name, {})[position] = make_sharded_optimizer_tensor(entry, data, f"optimizer.{name}")
    return state, {"format": "model_space", "step": step, "state_keys": keys}


def save(optimizer: Any, chunks: Sequence[torch.nn.Module], model_entries: dict[str, Any], directory: Path) -> dict:
    """Collective. Writes the optimizer state into ``directory``; returns its JSON description."""
    state, description = sharded_state(optimizer, chunks, model_entries)
    dist_checkpointing.save(state, str(directory))
    return description


@torch.no_grad()
def load(
    optimizer: Any,
    chunks: Sequence[torch.nn.Module],
    model_entries: dict[str, Any],
    directory: Path,
    description: dict[str, Any],
) -> None:
    """Collective. Restores the optimizer state written by :func:`save` at any layout."""
    if description.get("format") != "model_space":
        raise ValueError(f"{directory}: optimizer state format {description.get('format')!r} is not 'model_space'")
    entries = _entries(model_entries)
    shards = _ordered(chunks, _shards(optimizer))
    keys, step = description["state_keys"], description["step"]
    request: dict[str, dict[str, Any]] = {}
    for position, shard in enumerate(shards):
        entry = entries[id(shard.param)]
        for name in _names(shard, keys):
            data = torch.zeros(shard.param.shape, dtype=torch.float32)
            request.setdefault(name, {})[position] = make_sharded_optimizer_tensor(entry, data, f"optimizer.{name}")
    if not request:
        return
    loaded = dist_checkpointing.load(request, str(directory), strict=StrictHandling.RAISE_ALL)
    for position, shard in enumerate(shards):
        if shard.main is None:
            continue
        values = {
            name: loaded[name][position].reshape(-1)[shard.start : shard.end].reshape(shard.main.shape)
            for name in _names(shard, keys)
        }
        if MAIN in values:
            shard.main.copy_(values.pop(MAIN))
        if step is None:
            continue
        state = shard.inner.state[shard.main]
        for name, value in values.items():
            state[name] = value.to(shard.main.device, torch.float32).clone()
        _set_step(shard, state, step)


def _set_step(shard: _Shard, state: dict[str, Any], step: int) -> None:
    for group in shard.inner.param_groups:
        if not any(p is shard.main for p in group["params"]):
            continue
        if "step" in group:  # apex / TE fused Adam count per group
            group["step"] = step
            return
        # torch's Adam: a float32 scalar on the host, on the parameter's device when capturable or fused
        on_device = group.get("capturable") or group.get("fused")
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=shard.main.device if on_device else None)
        return
