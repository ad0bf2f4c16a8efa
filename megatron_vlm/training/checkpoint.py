"""Training checkpoints: everything needed to continue a run exactly, written atomically.

    OUTPUT/checkpoints/
      latest                  name of the newest complete checkpoint (written last, atomically)
      iter_0000200/
        model/, megatron_vlm.json   a model checkpoint (models.checkpoint_io): any layout loads it
        optimizer/                  optimizer state (dist_checkpointing, from the model's entries);
                                    empty with the distributed or bf16 optimizer, saved per rank
        rank00000.pt ...            per-rank state: RNG generators, the data loader's position, and
                                    (distributed or bf16 optimizer) this rank's optimizer state

A checkpoint is written into ``.iter_XXXXXXX.incomplete`` and renamed when every rank is done; a
kill during the write leaves the previous checkpoint and ``latest`` untouched. The model and the
optimizer reshard; the per-rank files resume exactly at the same data-parallel layout.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_vlm.config import ModelConfig, TrainableConfig
from megatron_vlm.distributed import barrier, global_rank
from megatron_vlm.models.checkpoint_io import (
    check_dist_checkpoint_readable,
    load_model,
    model_sharded_state_dict,
    save_model,
)

LATEST = "latest"


def _parts(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _main_params(part: Any) -> list[torch.Tensor]:
    """fp32 master copies of low-precision parameters (this rank's shard with the distributed optimizer)."""
    groups = getattr(part, "shard_fp32_from_float16_groups", None) or getattr(part, "fp32_from_float16_groups", None)
    return [p for group in groups or [] for p in group]


def _per_rank(optimizer: Any) -> bool:
    """Whether this optimizer's state is checkpointed per rank rather than with dist_checkpointing.

    The one place that says why. Megatron-Core's own formats fail without apex/TE (torch's Adam),
    on every supported version (tried on 2 gloo ranks, a save then a load into a fresh optimizer):
    - 0.16.1: the distributed optimizer's default sharding rejects flattened ranges,
      ``fully_reshardable`` drops torch Adam's per-parameter 'step', ``dp_reshardable`` loads only
      into pre-filled state and then drifts; the bf16 optimizer's sharded state maps main parameters
      to the wrong model tensors.
    - 0.19.2: ``fully_reshardable`` gathers the state with ``.cuda()`` (no CPU path);
      ``dp_reshardable`` asserts on a fresh optimizer's empty state, and with pre-filled state it
      drifts (bf16) or fails an in-place check (fp32); the default ``fully_sharded_model_space``
      does not find our parameters among the model's sharded tensors.
    Saved per rank, the state resumes exactly at the same layout on both versions; fp32 without the
    distributed optimizer keeps the reshardable dist_checkpointing path.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(part, DistributedOptimizer) or _main_params(part) for part in _parts(optimizer))


def optimizer_shard_state(optimizer: Any) -> list[dict[str, Any]]:
    """This rank's optimizer state: the inner torch optimizer's (moments, steps) and main params."""
    return [
        {"inner": part.optimizer.state_dict(), "main": [p.detach().clone() for p in _main_params(part)]}
        for part in _parts(optimizer)
    ]


@torch.no_grad()
def load_optimizer_shard_state(optimizer: Any, state: list[dict[str, Any]]) -> None:
    parts = _parts(optimizer)
    if len(parts) != len(state):
        raise ValueError(f"optimizer has {len(parts)} parts, the checkpoint {len(state)}: not the same run layout")
    for part, saved in zip(parts, state, strict=True):
        part.optimizer.load_state_dict(saved["inner"])
        mains = _main_params(part)
        if len(mains) != len(saved["main"]):
            raise ValueError("the optimizer's parameter shards differ from the checkpoint's: not the same layout")
        for main, value in zip(mains, saved["main"], strict=True):
            main.copy_(value)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def latest_checkpoint(root: str | Path) -> Path | None:
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist")
    return path


def save_training_checkpoint(
    root: str | Path,
    iteration: int,
    chunks: Sequence[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    loader_state: dict[str, Any],
    model_config: ModelConfig,
    trainable: TrainableConfig,
    keep_last: int,
) -> Path:
    """Collective. Model (as a model checkpoint), optimizer, scheduler, RNG and loader state."""
    root = Path(root)
    final = root / f"iter_{iteration:07d}"
    temporary = root / f".iter_{iteration:07d}.incomplete"
    if global_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".iter_*.incomplete"):  # left by writes that were cut off
            shutil.rmtree(stale, ignore_errors=True)
        temporary.mkdir()
    barrier()
    save_model(
        chunks,
        temporary,
        model_config,
        trainable,
        atomic=False,
        extra={"iteration": iteration, "scheduler": scheduler.state_dict()},
    )
    model_entries = model_sharded_state_dict(chunks)
    if global_rank() == 0:
        (temporary / "optimizer").mkdir()
    barrier()
    per_rank = {"rng": rng_state(), "loader": loader_state, "iteration": iteration}
    if _per_rank(optimizer):
        per_rank["optimizer"] = optimizer_shard_state(optimizer)
    else:
        dist_checkpointing.save(optimizer.sharded_state_dict(model_entries), str(temporary / "optimizer"))
    torch.save(per_rank, temporary / f"rank{global_rank():05d}.pt")
    barrier()
    if global_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
        for old in sorted(root.glob("iter_*"))[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_training_checkpoint(
    path: Path,
    chunks: Sequence[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    model_config: ModelConfig,
    trainable: TrainableConfig,
) -> tuple[int, dict[str, Any]]:
    """Collective. Restores model, optimizer, scheduler and this rank's RNG; returns the
    iteration and this rank's loader state."""
    metadata = load_model(chunks, path, model_config, trainable)
    rank_file = path / f"rank{global_rank():05d}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(
            f"{rank_file} is missing: exact resume needs the same number of ranks as the run that saved "
            f"{path.name} ({parallel_state.get_data_parallel_world_size()} data-parallel now)"
        )
    per_rank = torch.load(rank_file, weights_only=False)
    if _per_rank(optimizer):
        if "optimizer" not in per_rank:
            raise ValueError(
                f"{path.name} holds a dist_checkpointing optimizer state: resume with the same precision and optimizer"
            )
        load_optimizer_shard_state(optimizer, per_rank["optimizer"])
    else:
        check_dist_checkpoint_readable(path / "optimizer", metadata.get("megatron_core_version"))
        optimizer_state = dist_checkpointing.load(
            optimizer.sharded_state_dict(model_sharded_state_dict(chunks), is_loading=True),
            str(path / "optimizer"),
            strict=StrictHandling.RAISE_ALL,
        )
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(metadata["scheduler"])
    set_rng_state(per_rank["rng"])
    return metadata["iteration"], per_rank["loader"]
