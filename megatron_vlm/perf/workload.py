"""Fixed-shape synthetic micro-batches for a ``memory_model.Workload``: the memory-model checks
and the GPU benchmark run the real model on them, with every shape known in advance (the batches
are ``data/batch.py``'s synthetic ones, laid out by the workload)."""

from __future__ import annotations

from megatron_vlm.backbones import text_tokens_per_image
from megatron_vlm.config import ModelConfig
from megatron_vlm.data.batch import MicroBatch, make_batch, training_inputs
from megatron_vlm.perf.memory_model import Workload


def image_side(workload: Workload, patch_size: int) -> int:
    side = int(round(workload.patches_per_image**0.5))
    if side * side != workload.patches_per_image:
        raise ValueError(f"patches_per_image={workload.patches_per_image} is not a square number of patches")
    return side * patch_size


def synthetic_micro_batch(config: ModelConfig, workload: Workload, seed: int = 0, device: str = "cpu") -> MicroBatch:
    """Square images spread over the rows (first rows first), random text, labels and loss mask."""
    if workload.images and workload.micro_batch_size < 1:
        raise ValueError("a micro-batch needs at least one sequence")
    side = image_side(workload, config.vision.patch_size)
    rows: list[list[tuple[int, int]]] = [[] for _ in range(workload.micro_batch_size)]
    for index in range(workload.images):
        rows[index % workload.micro_batch_size].append((side, side))
    batch = make_batch(
        config, seed=seed, images_per_row=rows, seq_len=workload.seq_length, image_seq_len=text_tokens_per_image(config)
    )
    inputs = training_inputs(batch)
    return {name: tensor.to(device) for name, tensor in inputs.items()}
