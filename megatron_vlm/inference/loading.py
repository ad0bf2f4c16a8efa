"""A model for generation and evaluation, from a converted or training checkpoint, at any layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_vlm.config import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_vlm.models.checkpoint_io import load_weights, model_config_of, read_metadata
from megatron_vlm.models.idefics2 import build_model_chunks


def load_for_inference(
    directory: str | Path, parallel: ParallelConfig, params_dtype: str | None = None
) -> tuple[list[torch.nn.Module], ModelConfig, dict[str, Any]]:
    """Collective over the initialised layout: this rank's model chunks with the checkpoint's weights
    (LoRA adapters merged), in eval mode, computing in ``params_dtype`` (default: the checkpoint's);
    Transformer Engine where it imports. Returns (chunks, model config, checkpoint metadata)."""
    metadata = read_metadata(directory)
    config = model_config_of(metadata)
    precision = PrecisionConfig(params_dtype=params_dtype or metadata["dtype"])
    chunks = build_model_chunks(config, parallel, precision, initialize_weights=False)
    load_weights(chunks, directory, config)
    for chunk in chunks:
        chunk.eval()
    return chunks, config, metadata
