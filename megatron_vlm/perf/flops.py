"""Analytic FLOP count of the model (matmuls, 2 FLOPs per multiply-add): vision encoder at native
resolution, projection, resampler and the decoder on packed sequences, each part counted by its
backbone recipe, and the gated cross-attention blocks of the cross-attention architecture.
Training = 3x forward."""

from __future__ import annotations

import time
from typing import Any

import torch

from megatron_vlm.backbones import recipes_of
from megatron_vlm.config import ModelConfig
from megatron_vlm.data.batch import attended_images
from megatron_vlm.models.cross_attention import gated_block_forward_flops, gated_blocks_in


def vision_forward_flops(config: ModelConfig, patches: int) -> float:
    """One image of ``patches`` real patches through the vision encoder and the connector."""
    vision, connector, _ = recipes_of(config)
    return vision.forward_flops(config.vision, patches) + connector.forward_flops(config, patches)


def decoder_layer_forward_flops(config: ModelConfig, tokens: int, attended: int) -> float:
    """One decoder layer over ``tokens`` positions; ``attended`` is the sum over positions of how
    many keys each attends to (causal, document-aware)."""
    return recipes_of(config)[2].layer_forward_flops(config.text, tokens, attended)


def output_layer_forward_flops(config: ModelConfig, tokens: int) -> float:
    return recipes_of(config)[2].output_forward_flops(config.text, tokens)


def decoder_forward_flops(config: ModelConfig, tokens: int, attended: int) -> float:
    """``tokens`` positions through every decoder layer and the output layer."""
    return config.text.num_layers * decoder_layer_forward_flops(config, tokens, attended) + output_layer_forward_flops(
        config, tokens
    )


def real_patches(config: ModelConfig, batch: dict[str, Any]) -> list[int]:
    """The whole patches of each image of a micro-batch: from the images' sizes the loader keeps on
    the host (``image_sizes``: no read of a pixel mask that DALI made on the GPU, which would wait
    for every queued kernel), else from the pixel mask's real rows x columns."""
    patch = config.vision.patch_size
    if "image_sizes" in batch:
        return [(h // patch) * (w // patch) for h, w in batch["image_sizes"]]
    mask = batch["pixel_attention_mask"]
    if not mask.shape[0]:
        return []
    rows = (mask[:, :, 0].sum(1) // patch).tolist()
    cols = (mask[:, 0, :].sum(1) // patch).tolist()
    return [int(r * c) for r, c in zip(rows, cols, strict=True)]


def vision_positions(config: ModelConfig, patches: list[int]) -> int:
    """Positions the vision encoder computes for images of ``patches`` real patches: each image's
    tokens (its patches, plus CLIP's class token), packed one image after another. (Under FP8 with
    Transformer Engine the packed rows are also padded to a multiple of 16: not counted here.)"""
    vision = recipes_of(config)[0]
    return sum(vision.output_tokens(config.vision, count) for count in patches)


def document_lengths(document_ids: torch.Tensor) -> list[int]:
    """The tokens of each document of a micro-batch (``document_ids`` [b, s], -1 padding)."""
    lengths = []
    for row in document_ids.tolist():
        previous = None
        for document in row:
            if document < 0:
                previous = None
                continue
            if document != previous:
                lengths.append(0)
                previous = document
            lengths[-1] += 1
    return lengths


def attended_keys(length: int, sliding_window: int | None = None) -> int:
    """Keys summed over a causal document's queries: query i sees i + 1 keys, at most the window."""
    if sliding_window is None or sliding_window >= length:
        return length * (length + 1) // 2
    return sliding_window * (sliding_window + 1) // 2 + (length - sliding_window) * sliding_window


def batch_training_flops(config: ModelConfig, batch: dict[str, torch.Tensor]) -> float:
    """Model FLOPs of one training micro-batch (forward + backward = 3x forward): its real patches
    and real tokens (the decoder runs the documents packed, padding dropped)."""
    flops = sum(vision_forward_flops(config, patches) for patches in real_patches(config, batch))
    lengths = document_lengths(batch["document_ids"])
    attended = sum(attended_keys(length, config.text.sliding_window) for length in lengths)
    flops += decoder_forward_flops(config, sum(lengths), attended)
    if config.architecture == "cross_attention":
        flops += cross_attention_forward_flops(config, batch)
    return 3.0 * flops


def cross_attention_forward_flops(config: ModelConfig, batch: dict[str, torch.Tensor]) -> float:
    """The gated cross-attention blocks of a micro-batch: each row's images give the context (the
    connector's tokens per image), and a token attends to one image's tokens once one precedes it in
    its document."""
    per_image = recipes_of(config)[1].tokens_per_image(config)
    input_ids = batch["input_ids"]
    images = int((input_ids == config.image_token_id).sum())
    attends = attended_images(input_ids, batch["document_ids"], config.image_token_id)
    blocks = gated_blocks_in(config, 0, config.text.num_layers)
    return blocks * gated_block_forward_flops(
        config, int((batch["document_ids"] >= 0).sum()), images * per_image, int((attends >= 0).sum()) * per_image
    )


def generated_token_flops(config: ModelConfig, position: int, attends_image: bool = False) -> float:
    """Forward FLOPs of one token generated at ``position`` with the key/value cache
    (``inference/generate.py``): every decoder layer over one position attending ``position + 1``
    keys (at most the sliding window), the output layer, and with cross-attention each gated block's
    query, output projection and MLP, attending its cached image tokens when the token has an image."""
    keys = position + 1
    if config.text.sliding_window is not None:
        keys = min(keys, config.text.sliding_window)
    flops = decoder_forward_flops(config, 1, keys)
    if config.architecture == "cross_attention":
        per_image = recipes_of(config)[1].tokens_per_image(config)
        blocks = gated_blocks_in(config, 0, config.text.num_layers)
        flops += blocks * gated_block_forward_flops(config, 1, 0, per_image if attends_image else 0)
    return flops


def measured_matmul_tflops(dtype: torch.dtype, device: str, size: int | None = None, seconds: float = 0.5) -> float:
    """The matmul throughput of this device, measured now: the peak that MFU is reported against.
    FP8 dtypes time ``torch._scaled_mm`` (e4m3 x e4m3 -> bf16), the GEMM FP8 training runs."""
    size = size or (8192 if device.startswith("cuda") else 1024)
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype).t()  # column-major, as _scaled_mm wants
        one = torch.ones((), device=device)

        def multiply() -> torch.Tensor:
            return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    else:
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)

        def multiply() -> torch.Tensor:
            return torch.matmul(a, b)

    multiply()
    count, start = 0, time.perf_counter()
    while True:
        multiply()
        count += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * size**3 * count / elapsed / 1e12
