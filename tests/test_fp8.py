"""Torch-native FP8 linears (models/fp8.py) on CPU: GEMM accuracy, gradients, a model whose
transformer linears run in FP8 training like its bf16 twin, and the compiled casts
(precision.compile) against the op-by-op ones."""

import dataclasses
import functools

import pytest
import torch
from parity import tiny_config

from megatron_vlm import backend
from megatron_vlm.config import ParallelConfig, PrecisionConfig
from megatron_vlm.data.batch import FORWARD_INPUTS
from megatron_vlm.models.fp8 import E4M3, E5M2, EAGER_CASTS, compile_problem, compiled_casts, fp8_linear, quantize
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
    inputs = {k: batch[k] for k in (*FORWARD_INPUTS, "labels")}
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


def test_compiled_casts_equal_the_eager_ones_bit_for_bit():
    """precision.compile's casts (torch.compile'd; inductor's C++ kernels on CPU) give the same FP8
    bits, layout and scale as the op-by-op casts. One function, as compiling is slow on CPU: the
    backward's (pad the rows, absolute maximum, scaled e5m2 cast, transposed copy), which runs the
    other two's code. Two row counts, both padded: the second reuses the first's dynamic-shape
    kernel (a recompile there would be an error), as every GEMM shape of a model does on a GPU."""
    generator = torch.Generator().manual_seed(0)
    casts = compiled_casts()
    for index, rows in enumerate((37, 50)):
        matrix = (torch.randn(rows, 48, generator=generator) * 3.0).bfloat16()
        eager = EAGER_CASTS.rows_transposed(matrix, E5M2)
        with torch._dynamo.config.patch(error_on_recompile=index > 0):
            compiled = casts.rows_transposed(matrix, E5M2)
        padded = -(-rows // 16) * 16
        assert [t.shape for t in eager] == [(padded, 48), (48, padded), ()]
        for reference, value in zip(eager, compiled, strict=True):
            assert value.dtype == reference.dtype and value.shape == reference.shape
            assert value.stride() == reference.stride()
            bits = torch.uint8 if value.dtype == E5M2 else value.dtype
            assert torch.equal(value.view(bits), reference.view(bits))


def test_precision_compile_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match=r"precision.compile=true .* needs precision.fp8"):
        PrecisionConfig(params_dtype="bfloat16", compile=True)
    with pytest.raises(ValueError, match=r"Transformer Engine fuses its own: use precision.fp8_backend=torch"):
        PrecisionConfig(params_dtype="bfloat16", fp8="hybrid", fp8_backend="te", compile=True)
    assert compile_problem(torch.device("cpu")) is None  # g++ is here
    assert "not supported on meta" in compile_problem(torch.device("meta"))


def test_precision_compile_reaches_the_fp8_linears(megatron_single_process):
    """build_model_chunks passes precision.compile on: every switched linear casts through the
    compiled functions (nothing is compiled until a forward runs)."""
    config = tiny_config()
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, intermediate_size=192))
    for compile, expected in ((False, EAGER_CASTS), (True, compiled_casts())):
        precision = PrecisionConfig(params_dtype="bfloat16", fp8="hybrid", fp8_backend="torch", compile=compile)
        (model,) = build_model_chunks(config, ParallelConfig(), precision)
        impls = [
            m._forward_impl for m in model.modules() if isinstance(getattr(m, "_forward_impl", None), functools.partial)
        ]
        assert impls and all(impl.args == ("hybrid", expected) for impl in impls)
