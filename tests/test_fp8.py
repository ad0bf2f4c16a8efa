"""Torch-native FP8 linears (models/fp8.py) on CPU: GEMM accuracy, gradients, and a model whose
transformer linears run in FP8 training like its bf16 twin."""

import dataclasses
import functools

import pytest
import torch
from parity import tiny_config

from megatron_vlm import backend
from megatron_vlm.config import ParallelConfig, PrecisionConfig
from megatron_vlm.models.fp8 import E4M3, fp8_linear, quantize
from megatron_vlm.models.idefics2 import build_model_chunks
from megatron_vlm.perf.memory_model import Workload
from megatron_vlm.perf.workload import synthetic_micro_batch


def relative_error(value, reference):
    return float((value.float() - reference.float()).norm() / reference.float().norm())


def test_quantize_uses_the_format_range_and_round_trips():
    tensor = torch.randn(64, 48) * 3.0
    quantized, inverse_scale = quantize(tensor, E4M3)
    assert quantized.dtype == E4M3
    assert float(quantized.float().abs().max()) == pytest.approx(torch.finfo(E4M3).max)
    assert relative_error(quantized.float() * inverse_scale, tensor) < 0.05


@pytest.mark.parametrize("recipe", ["hybrid", "e4m3"])
def test_fp8_linear_output_and_gradients_close_to_fp32(recipe):
    generator = torch.Generator().manual_seed(0)
    rows = 37  # not a multiple of 16: rows are padded inside and cut again
    x = torch.randn(rows, 64, generator=generator, dtype=torch.float32).bfloat16().requires_grad_()
    weight = (torch.randn(96, 64, generator=generator) * 0.05).bfloat16().requires_grad_()
    bias = torch.randn(96, generator=generator).bfloat16().requires_grad_()
    output = fp8_linear(x, weight, bias, recipe)
    grad = torch.randn(rows, 96, generator=generator).bfloat16()
    output.backward(grad)
    x_ref, w_ref, b_ref = (t.detach().float().requires_grad_() for t in (x, weight, bias))
    reference = torch.nn.functional.linear(x_ref, w_ref, b_ref)
    reference.backward(grad.float())
    assert output.shape == (rows, 96) and output.dtype == torch.bfloat16
    assert relative_error(output, reference) < 0.08
    assert relative_error(x.grad, x_ref.grad) < 0.15
    assert relative_error(weight.grad, w_ref.grad) < 0.15
    assert relative_error(bias.grad, b_ref.grad) < 1e-2


def test_fp8_model_trains_like_its_bf16_twin(megatron_single_process):
    config = tiny_config()
    text = dataclasses.replace(config.text, intermediate_size=192)  # FP8 GEMMs need multiples of 16
    config = dataclasses.replace(config, text=text)
    assert backend.fp8_backend("auto") == "torch"  # no Transformer Engine here
    batch = synthetic_micro_batch(config, Workload(micro_batch_size=2, seq_length=96, images=2, patches_per_image=16))
    inputs = {
        k: batch[k]
        for k in ("input_ids", "position_ids", "attention_mask", "pixel_values", "pixel_attention_mask", "labels")
    }
    losses = {}
    for fp8 in (None, "hybrid"):
        torch.manual_seed(0)
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(0)
        (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig(params_dtype="bfloat16", fp8=fp8))
        switched = [m for m in model.modules() if isinstance(getattr(m, "_forward_impl", None), functools.partial)]
        assert bool(switched) == bool(fp8)
        per_token = model(**inputs)
        loss = (per_token.float() * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        loss.backward()
        losses[fp8] = float(loss)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    assert losses["hybrid"] == pytest.approx(losses[None], rel=0.02)
