"""Analytic FLOP count of Idefics2 (matmuls, 2 FLOPs per multiply-add): vision encoder at native
resolution, projection, resampler and the decoder on packed sequences. Training = 3x forward."""

from __future__ import annotations

import time

import torch

from megatron_vlm.config import ModelConfig


def vision_forward_flops(config: ModelConfig, patches: int) -> float:
    """One image of ``patches`` real patches through the encoder and the connector."""
    v, c, t = config.vision, config.connector, config.text
    hv, ht = v.hidden_size, t.hidden_size
    embed = 2 * patches * (v.num_channels * v.patch_size**2) * hv
    per_layer = 2 * patches * (4 * hv * hv + 2 * hv * v.intermediate_size) + 4 * patches * patches * hv
    projection = 2 * patches * (2 * hv * t.intermediate_size + t.intermediate_size * ht)
    latents, q_width, kv_width = c.num_latents, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    context = patches + latents
    resampler_layer = (
        2 * latents * ht * q_width  # q
        + 2 * 2 * context * ht * kv_width  # k, v over [image; latents]
        + 2 * 2 * latents * context * q_width  # scores and weighted sum
        + 2 * latents * q_width * ht  # output
        + 2 * latents * 3 * ht * 4 * ht  # SwiGLU MLP at 4x width
    )
    return embed + v.num_layers * per_layer + projection + c.depth * resampler_layer


def decoder_layer_forward_flops(config: ModelConfig, tokens: int, attended: int) -> float:
    """One decoder layer over ``tokens`` positions; ``attended`` is the sum over positions of how
    many keys each attends to (causal, document-aware)."""
    t = config.text
    h, kv = t.hidden_size, t.num_kv_heads * t.head_dim
    per_token = 2 * h * (h + 2 * kv) + 2 * h * h + 2 * 3 * h * t.intermediate_size
    return tokens * per_token + 2 * 2 * attended * h


def output_layer_forward_flops(config: ModelConfig, tokens: int) -> float:
    return 2 * tokens * config.text.hidden_size * config.text.vocab_size


def decoder_forward_flops(config: ModelConfig, tokens: int, attended: int) -> float:
    """``tokens`` positions through every decoder layer and the output layer."""
    return config.text.num_layers * decoder_layer_forward_flops(config, tokens, attended) + output_layer_forward_flops(
        config, tokens
    )


def batch_training_flops(config: ModelConfig, batch: dict[str, torch.Tensor]) -> float:
    """Model FLOPs of one training micro-batch (forward + backward = 3x forward)."""
    patch = config.vision.patch_size
    mask = batch["pixel_attention_mask"]
    flops = 0.0
    if mask.shape[0]:
        rows = (mask[:, :, 0].sum(1) // patch).tolist()
        cols = (mask[:, 0, :].sum(1) // patch).tolist()
        flops += sum(vision_forward_flops(config, int(r * c)) for r, c in zip(rows, cols, strict=True))
    allowed = ~batch["attention_mask"]
    tokens = batch["input_ids"].numel()
    flops += decoder_forward_flops(config, tokens, int(allowed.sum()))
    return 3.0 * flops


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
