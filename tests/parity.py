"""Shared by the parity tests and their multi-process workers: tiny configs, HF oracle, batches."""

from __future__ import annotations

import dataclasses
import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from megatron_vlm.config import ModelConfig, load_model_preset  # noqa: E402
from megatron_vlm.conversion.hf_config import to_hf_config  # noqa: E402

IMAGE_SIZES = [(56, 98), (98, 42), (60, 90), (84, 84)]  # (h, w): wide, tall, non-multiple of 14, square


def tiny_config(**text_overrides: int) -> ModelConfig:
    config = load_model_preset("tiny")
    # A small vocabulary keeps HF and Megatron fast; the image tokens sit at its end.
    text = dataclasses.replace(config.text, vocab_size=259, **text_overrides)
    return dataclasses.replace(
        config,
        text=text,
        fake_image_token_id=256,
        image_token_id=257,
        end_of_utterance_token_id=258,
        make_vocab_size_divisible_by=16,
    )


def hf_model(config: ModelConfig, seed: int = 0) -> torch.nn.Module:
    from transformers import Idefics2ForConditionalGeneration

    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(to_hf_config(config)).float().eval()
    # HF initialises norms to 1 and latents to 1: randomise them so the mapping of every tensor shows.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "latents" in name or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


@dataclasses.dataclass
class Batch:
    input_ids: torch.Tensor  # [b, s]
    padding: torch.Tensor  # [b, s] 1 real, 0 padded
    images_per_row: list[list[tuple[int, int]]]
    pixel_values: torch.Tensor  # [images, 3, H, W] batch-major
    pixel_mask: torch.Tensor  # [images, H, W]


def make_batch(
    config: ModelConfig, seed: int = 0, images_per_row: list[list[tuple[int, int]]] | None = None, seq_len: int = 48
) -> Batch:
    """Rows mixing images of several aspect ratios, a text-only row and right padding."""
    generator = torch.Generator().manual_seed(seed)
    if images_per_row is None:
        images_per_row = [[IMAGE_SIZES[0]], [], [IMAGE_SIZES[1], IMAGE_SIZES[2]], [IMAGE_SIZES[3]]]
    latents = config.connector.num_latents
    input_ids = torch.randint(1, 250, (len(images_per_row), seq_len), generator=generator)
    padding = torch.ones_like(input_ids)
    for row, images in enumerate(images_per_row):
        position = 3
        for _ in images:
            span = [config.fake_image_token_id] + [config.image_token_id] * latents + [config.fake_image_token_id]
            input_ids[row, position : position + len(span)] = torch.tensor(span)
            position += len(span) + 2
        if position > seq_len:
            raise ValueError(f"seq_len {seq_len} too short for {len(images)} images")
    padded_row = next((r for r, images in enumerate(images_per_row) if not images), None)
    if padded_row is not None:  # the text-only row ends with padding
        padding[padded_row, -5:] = 0
        input_ids[padded_row, -5:] = 0
    sizes = [size for images in images_per_row for size in images]
    max_h = max((h for h, _ in sizes), default=14)
    max_w = max((w for _, w in sizes), default=14)
    pixel_values = torch.zeros(len(sizes), 3, max_h, max_w)
    pixel_mask = torch.zeros(len(sizes), max_h, max_w, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        pixel_values[i, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        pixel_mask[i, :h, :w] = True
    return Batch(input_ids, padding, images_per_row, pixel_values, pixel_mask)


def hf_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """Our flat image list -> transformers' [batch, max images, ...] with all-zero padding images."""
    rows = len(batch.images_per_row)
    if batch.pixel_values.shape[0] == 0:  # transformers wants no pixel_values at all then
        return dict(input_ids=batch.input_ids, attention_mask=batch.padding)
    most = max(1, max(len(images) for images in batch.images_per_row))
    _, channels, h, w = batch.pixel_values.shape
    pixel_values = torch.zeros(rows, most, channels, h, w)
    pixel_mask = torch.zeros(rows, most, h, w, dtype=torch.long)
    index = 0
    for row, images in enumerate(batch.images_per_row):
        for slot in range(len(images)):
            pixel_values[row, slot] = batch.pixel_values[index]
            pixel_mask[row, slot] = batch.pixel_mask[index].long()
            index += 1
    return dict(
        input_ids=batch.input_ids,
        attention_mask=batch.padding,
        pixel_values=pixel_values,
        pixel_attention_mask=pixel_mask,
    )


@torch.no_grad()
def hf_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    return model(**hf_inputs(batch)).logits


def megatron_attention_mask(padding: torch.Tensor) -> torch.Tensor:
    """[b, s] padding -> [b, 1, s, s] bool, True where attention is not allowed (causal + pad keys)."""
    seq = padding.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    return causal[None, None] | ~padding.bool()[:, None, None, :]


def megatron_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    seq = batch.input_ids.shape[1]
    return dict(
        input_ids=batch.input_ids,
        position_ids=torch.arange(seq).expand_as(batch.input_ids),
        attention_mask=megatron_attention_mask(batch.padding),
        pixel_values=batch.pixel_values,
        pixel_attention_mask=batch.pixel_mask,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(script: str, nproc: int, args: list[str], timeout: int = 600) -> None:
    """Launch ``tests/workers/<script>`` on ``nproc`` real processes; raise with its output on failure."""
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).resolve().parent / "workers" / script
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(worker),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode:
        raise RuntimeError(
            f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
        )
