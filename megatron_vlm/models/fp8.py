"""FP8 linears without Transformer Engine: ``torch._scaled_mm`` with per-tensor current scaling.

Transformer Engine is the FP8 path of choice on Hopper (fused casts, delayed scaling). Where it is
not installed, the same recipe runs on torch's own FP8 GEMM: every linear of the transformer
layers (vision, resampler, decoder) casts its input and weight to e4m3 with a scale from the
tensor's current absolute maximum, multiplies in FP8 with a higher-precision output, and in
backward casts the output gradient to e5m2 ("hybrid") or e4m3. Embeddings, the output layer and
norms stay in the weights' precision, as in Megatron's FP8 recipes. Its inputs are kept in FP8
for backward, which also halves the memory those activations need. ``torch._scaled_mm`` runs on
CPU too, so this path is tested without a GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from megatron_vlm.config import ModelConfig, ParallelConfig

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
RECIPES = {"hybrid": E5M2, "e4m3": E4M3}  # the dtype of gradients; forward tensors are e4m3
_ALIGN = 16  # FP8 GEMMs need every dimension to be a multiple of 16


def quantize(tensor: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``tensor`` in FP8 scaled to use the format's range, and the scale that undoes it."""
    amax = tensor.detach().abs().amax().float().clamp(min=1e-12)
    scale = torch.finfo(dtype).max / amax
    limit = torch.finfo(dtype).max
    quantized = (tensor.float() * scale).clamp(-limit, limit).to(dtype)
    return quantized, scale.reciprocal()


def _column_major(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.t().contiguous().t()


def _pad_rows(matrix: torch.Tensor) -> torch.Tensor:
    extra = -matrix.shape[0] % _ALIGN
    return F.pad(matrix, (0, 0, 0, extra)) if extra else matrix


class _Fp8Matmul(torch.autograd.Function):
    """input [..., K] @ weight[N, K].t() in FP8; gradients for both."""

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        weight: torch.Tensor,
        grad_dtype: torch.dtype,
        allreduce_dgrad: bool,
        tp_group: torch.distributed.ProcessGroup | None,
    ) -> torch.Tensor:
        leading = input.shape[:-1]
        rows = input.reshape(-1, input.shape[-1])
        count = rows.shape[0]
        input8, input_scale = quantize(_pad_rows(rows), E4M3)
        weight8, weight_scale = quantize(weight, E4M3)
        output = torch._scaled_mm(input8, weight8.t(), scale_a=input_scale, scale_b=weight_scale, out_dtype=input.dtype)
        ctx.save_for_backward(input8, input_scale, weight8, weight_scale)
        ctx.grad_dtype, ctx.count, ctx.leading = grad_dtype, count, leading
        ctx.allreduce_dgrad, ctx.tp_group = allreduce_dgrad, tp_group
        ctx.input_dtype, ctx.weight_dtype = input.dtype, weight.dtype
        return output[:count].reshape(*leading, weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input8, input_scale, weight8, weight_scale = ctx.saved_tensors
        grad8, grad_scale = quantize(_pad_rows(grad_output.reshape(-1, grad_output.shape[-1])), ctx.grad_dtype)
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_input = torch._scaled_mm(
                grad8, _column_major(weight8), scale_a=grad_scale, scale_b=weight_scale, out_dtype=ctx.input_dtype
            )
            grad_input = grad_input[: ctx.count].reshape(*ctx.leading, weight8.shape[1])
            if ctx.allreduce_dgrad:
                torch.distributed.all_reduce(grad_input, group=ctx.tp_group)
        if ctx.needs_input_grad[1]:
            grad_weight = torch._scaled_mm(
                grad8.t().contiguous(),
                _column_major(input8),
                scale_a=grad_scale,
                scale_b=input_scale,
                out_dtype=ctx.weight_dtype,
            )
        return grad_input, grad_weight, None, None, None


def fp8_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    recipe: str = "hybrid",
    allreduce_dgrad: bool = False,
    tp_group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor:
    """``F.linear`` with FP8 GEMMs (``recipe``: "hybrid" e5m2 gradients, or "e4m3" throughout)."""
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r}: use one of {sorted(RECIPES)}")
    output = _Fp8Matmul.apply(input, weight, RECIPES[recipe], allreduce_dgrad, tp_group)
    return output if bias is None else output + bias


# Arguments newer Megatron-Core versions pass to ``_forward_impl``, with the value meaning "off":
# anything else asks for something these linears do not do.
_INERT_ARGUMENTS = {"async_grad_allreduce": None, "gtp_remat_size": 1}  # gtp_remat_size: 0.19+


def _megatron_forward_impl(
    recipe: str,
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gradient_accumulation_fusion: bool,
    allreduce_dgrad: bool,
    sequence_parallel: bool,
    grad_output_buffer: list | None = None,
    wgrad_deferral_limit: int | None = 0,
    tp_group: torch.distributed.ProcessGroup | None = None,
    **others: Any,
) -> torch.Tensor:
    """Drop-in for Megatron-Core's ``linear_with_grad_accumulation_and_async_allreduce`` (its
    arguments across 0.16-0.19)."""
    if sequence_parallel:
        raise NotImplementedError("torch FP8 linears do not support sequence parallelism: use Transformer Engine")
    if gradient_accumulation_fusion:
        raise NotImplementedError("torch FP8 linears return weight gradients: turn off gradient_accumulation_fusion")
    for name, value in others.items():
        if name not in _INERT_ARGUMENTS or (value is not None and value != _INERT_ARGUMENTS[name]):
            raise NotImplementedError(f"torch FP8 linears do not support {name}={value!r}")
    return fp8_linear(input, weight, bias, recipe, allreduce_dgrad and weight.requires_grad, tp_group)


# --------------------------------------------------------------------------------------------
# Transformer Engine's FP8 shape rules
# --------------------------------------------------------------------------------------------

# TE runs an FP8 GEMM only on a 2-D input whose rows are a multiple of 8 and whose columns are a
# multiple of 16, with a weight [out, in] obeying the same (``check_dim_for_fp8_exec`` /
# ``assert_dim_for_fp8_exec`` in transformer_engine/pytorch/utils.py, asserted in the forward of
# Linear, LayerNormLinear and LayerNormMLP); otherwise it stops with an assertion.
TE_FP8_ROWS = 8
TE_FP8_COLUMNS = 16
# Packed vision tokens are padded to this multiple when the vision tower runs FP8 under TE.
FP8_TOKEN_MULTIPLE = 16


def te_fp8_gemm_problem(rows: int | None, in_features: int, out_features: int) -> str | None:
    """Why TE cannot run ``input [rows, in] @ weight[out, in].t()`` in FP8 (None if it can).
    ``rows=None`` checks the weight alone."""
    problems = []
    if rows is not None and rows % TE_FP8_ROWS:
        problems.append(f"{rows} rows (tokens) not a multiple of {TE_FP8_ROWS}")
    if in_features % TE_FP8_COLUMNS:
        problems.append(f"input width {in_features} not a multiple of {TE_FP8_COLUMNS}")
    if out_features % TE_FP8_ROWS:
        problems.append(f"output width {out_features} not a multiple of {TE_FP8_ROWS}")
    return "; ".join(problems) or None


def part_gemms(model: ModelConfig, part: str, tensor_parallel: int) -> dict[str, tuple[int, int]]:
    """(in, out) features of each GEMM of one transformer layer of ``part`` ("vision" or "text")
    on one tensor-parallel rank, named as the layer's linears."""
    if part == "vision":
        v = model.vision
        hidden, ffn, qkv = v.hidden_size, v.intermediate_size, 3 * v.hidden_size
        attention, gated = v.hidden_size, 1
    elif part == "text":
        t = model.text
        hidden, ffn = t.hidden_size, t.intermediate_size
        qkv = (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
        attention, gated = t.num_heads * t.head_dim, 2
    else:
        raise ValueError(f"unknown part {part!r}: vision or text")
    tp = tensor_parallel
    return {
        "self_attention.linear_qkv": (hidden, qkv // tp),
        "self_attention.linear_proj": (attention // tp, hidden),
        "mlp.linear_fc1": (hidden, gated * ffn // tp),
        "mlp.linear_fc2": (ffn // tp, hidden),
    }


def te_fp8_parts(model: ModelConfig, parallel: ParallelConfig) -> dict[str, str | None]:
    """For the parts built from TE layers, why each cannot run FP8 at this TP size (None: it can).

    Token counts are not checked here: packed vision tokens are padded to ``FP8_TOKEN_MULTIPLE``,
    and the decoder's micro-batch shapes are checked against the data at start-up."""
    reasons: dict[str, str | None] = {}
    for part in ("vision", "text"):
        problems = [
            f"{name} [{out_features} x {in_features}] per TP rank: {problem}"
            for name, (in_features, out_features) in part_gemms(model, part, parallel.tensor_parallel).items()
            if (problem := te_fp8_gemm_problem(None, in_features, out_features))
        ]
        reasons[part] = "; ".join(problems) or None
    return reasons


def use_torch_fp8(chunks: Iterable[torch.nn.Module], recipe: str = "hybrid") -> list[str]:
    """Switch the transformer linears of ``chunks`` to FP8; returns the names switched.

    The output layer (a vocabulary-sized GEMM whose logits feed the loss) stays in higher
    precision, and so does any linear with a dimension FP8 GEMMs cannot take."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r}: use one of {sorted(RECIPES)}")
    switched = []
    for index, chunk in enumerate(chunks):
        for name, module in chunk.named_modules():
            if not isinstance(module, ColumnParallelLinear | RowParallelLinear) or name.endswith("output_layer"):
                continue
            if any(size % _ALIGN for size in module.weight.shape):
                continue
            module._forward_impl = functools.partial(_megatron_forward_impl, recipe)
            switched.append(f"{index}.{name}")
    return switched
