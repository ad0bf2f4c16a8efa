"""Megatron model checkpoints: Megatron-Core dist_checkpointing + a small metadata file.

A checkpoint directory holds ``model/`` (dist_checkpointing: global tensors, so it loads at any
TP/PP/VPP whatever layout saved it) and ``megatron_vlm.json`` (model config, trainable config,
dtype, the layout it was saved at). Directories appear atomically: every rank writes into a
temporary sibling, rank 0 writes the metadata last and renames it into place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.validation import StrictHandling
from packaging.version import Version

from megatron_vlm import backend
from megatron_vlm.config import ModelConfig, TrainableConfig, from_dict, to_dict
from megatron_vlm.distributed import barrier, global_rank

METADATA_FILE = "megatron_vlm.json"
MODEL_DIR = "model"
LATEST = "latest"  # a training run's checkpoints directory names its newest complete checkpoint here
FORMAT_VERSION = 1


def model_sharded_state_dict(chunks: Sequence[torch.nn.Module]) -> dict[str, Any]:
    """One sharded state dict for all of this rank's chunks (virtual pipeline stages)."""
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    merged: dict[str, Any] = {}
    for index, chunk in enumerate(chunks):
        merged[f"chunk{index}"] = chunk.sharded_state_dict()
    return merged


def write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    temporary = directory / (METADATA_FILE + ".tmp")
    temporary.write_text(json.dumps(metadata, indent=2, sort_keys=True))
    os.replace(temporary, directory / METADATA_FILE)


def read_metadata(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a megatron-vlm checkpoint: {METADATA_FILE} is missing")
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {metadata.get('format_version')} (expected {FORMAT_VERSION})")
    if not (Path(directory) / MODEL_DIR).is_dir():
        raise FileNotFoundError(f"{directory} has no {MODEL_DIR}/ directory (incomplete checkpoint?)")
    return metadata


# Megatron-Core 0.19 keeps a distributed checkpoint's common (non-sharded) state inside its sharded
# files instead of a common.pt; older versions cannot find it. 0.19 still reads common.pt, so
# checkpoints move up the supported range, and down only to versions that read the newer layout.
_COMMON_STATE_INSIDE_SINCE = Version("0.19")


def check_dist_checkpoint_readable(directory: str | Path, written_by: str | None = None) -> None:
    """Refuse, by name, a distributed checkpoint the installed Megatron-Core cannot read."""
    directory = Path(directory)
    running = backend.megatron_core_version()
    if running < _COMMON_STATE_INSIDE_SINCE and not (directory / "common.pt").is_file():
        writer = f"megatron-core {written_by}" if written_by else f"megatron-core >= {_COMMON_STATE_INSIDE_SINCE}"
        raise ValueError(
            f"{directory} was written by {writer}, which keeps the checkpoint's common state inside its "
            f"sharded files (no common.pt); megatron-core {running} cannot read that layout. Load it with "
            f"megatron-core >= {_COMMON_STATE_INSIDE_SINCE}"
        )


def model_config_of(metadata: dict[str, Any]) -> ModelConfig:
    return from_dict(ModelConfig, metadata["model"])


def trainable_config_of(metadata: dict[str, Any]) -> TrainableConfig:
    return from_dict(TrainableConfig, metadata.get("trainable", {}))


def save_model(
    chunks: Sequence[torch.nn.Module],
    directory: str | Path,
    model_config: ModelConfig,
    trainable: TrainableConfig | None = None,
    extra: dict[str, Any] | None = None,
    atomic: bool = True,
) -> Path:
    """Collective: save this rank's chunks into ``directory``, created atomically; with
    ``atomic=False`` into an existing directory that the caller itself renames into place."""
    directory = Path(directory)
    temporary = directory.with_name(directory.name + ".incomplete") if atomic else directory
    if global_rank() == 0:
        if atomic and directory.exists():
            raise FileExistsError(f"{directory} exists; refusing to overwrite it")
        if atomic:
            shutil.rmtree(temporary, ignore_errors=True)
        (temporary / MODEL_DIR).mkdir(parents=True)
    barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(temporary / MODEL_DIR))
    barrier()
    if global_rank() == 0:
        write_metadata(temporary, model_metadata(chunks, model_config, trainable, extra))
        if atomic:
            os.replace(temporary, directory)
    barrier()
    return directory


def model_metadata(
    chunks: Sequence[torch.nn.Module],
    model_config: ModelConfig,
    trainable: TrainableConfig | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``megatron_vlm.json`` says of a model checkpoint written from ``chunks`` (and ``extra``)."""
    parameter = next(chunks[0].parameters())
    return {
        "format_version": FORMAT_VERSION,
        "model": to_dict(model_config),
        "trainable": to_dict(trainable or TrainableConfig()),
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "megatron_core_version": str(backend.megatron_core_version()),
        "saved_at_layout": {
            "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
            "virtual_pipeline": len(chunks) if len(chunks) > 1 else None,
        },
        **(extra or {}),
    }


def check_compatible(
    metadata: dict[str, Any], model_config: ModelConfig, trainable: TrainableConfig | None = None
) -> None:
    """Refuse a checkpoint whose model differs from ours, naming every differing field. A field
    the checkpoint predates (e.g. sliding_window) reads as its default, as ``model_config_of`` does."""
    saved = to_dict(model_config_of(metadata))
    ours = to_dict(model_config)
    differences = []
    for section in ("vision", "connector", "text"):
        for key, value in ours[section].items():
            if key == "attention_dropout":  # a training setting, free to differ from the checkpoint's
                continue
            if saved.get(section, {}).get(key) != value:
                differences.append(f"{section}.{key}: checkpoint {saved.get(section, {}).get(key)!r}, model {value!r}")
    for key in ("make_vocab_size_divisible_by", "image_token_id"):
        if saved.get(key) != ours[key]:
            differences.append(f"{key}: checkpoint {saved.get(key)!r}, model {ours[key]!r}")
    if trainable is not None:
        saved_rank = metadata.get("trainable", {}).get("lora_rank", 0)
        if saved_rank != trainable.lora_rank:
            differences.append(f"lora_rank: checkpoint {saved_rank}, model {trainable.lora_rank}")
    if differences:
        raise ValueError("checkpoint does not match the model:\n  " + "\n  ".join(differences))


def load_model(
    chunks: Sequence[torch.nn.Module],
    directory: str | Path,
    model_config: ModelConfig,
    trainable: TrainableConfig | None = None,
) -> dict[str, Any]:
    """Collective: load a checkpoint into this rank's chunks (any saved layout); returns metadata."""
    metadata = read_metadata(directory)
    check_compatible(metadata, model_config, trainable)
    check_dist_checkpoint_readable(Path(directory) / MODEL_DIR, metadata.get("megatron_core_version"))
    state = dist_checkpointing.load(
        model_sharded_state_dict(chunks), str(Path(directory) / MODEL_DIR), strict=StrictHandling.RAISE_ALL
    )
    if len(chunks) == 1:
        chunks[0].load_state_dict(state, strict=True)
    else:
        for index, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"chunk{index}"], strict=True)
    return metadata


def newest_checkpoint(directory: str | Path) -> Path:
    """A checkpoint directory itself, or, for a training run's checkpoints directory (no metadata of its
    own, a ``latest`` pointer), the checkpoint it points at: fine-tuning starts from "the run's weights"."""
    directory = Path(directory)
    pointer = directory / LATEST
    if not (directory / METADATA_FILE).is_file() and pointer.is_file():
        return directory / pointer.read_text().strip()
    return directory


def load_weights(chunks: Sequence[torch.nn.Module], directory: str | Path, model_config: ModelConfig) -> dict[str, Any]:
    """Collective: the weights of a converted or trained checkpoint from elsewhere (the trainer's start
    weights, generation, evaluation), at any layout; ``directory`` may also be a training run's
    checkpoints directory, whose newest checkpoint is read. Its pickles are checked before any library reads
    them (``safe_load``); LoRA adapters it was saved with are loaded and folded into their base
    weights. Returns its metadata."""
    from megatron_vlm.models.lora import apply_trainable, merge_lora
    from megatron_vlm.models.safe_load import check_library_pickles

    directory = newest_checkpoint(directory)
    check_library_pickles(directory)
    saved = trainable_config_of(read_metadata(directory))
    if saved.lora_rank:
        apply_trainable(chunks, saved)
    metadata = load_model(chunks, directory, model_config, saved)
    merge_lora(chunks)
    return metadata
