"""FP8 linears without Transformer Engine: ``torch._scaled_mm`` with per-tensor current scaling.

Transformer Engine is the FP8 path of choice on Hopper (fused casts, delayed scaling). Where it is
not installed, the same recipe runs on torch's own FP8 GEMM: every linear of the transformer
layers (vision, resampler, decoder) casts its input and weight to e4m3 with a scale from the
tensor's current absolute maximum, multiplies in FP8 with a higher-precision output, and in
backward casts the output gradient to e5m2 ("hybrid") or e4m3. Embeddings, the output layer and
norms stay in the weights' precision, as in Megatron's FP8 recipes. Its inputs are kept in FP8
for backward, which also halves the memory those activations need. ``torch._scaled_mm`` runs on
CPU too, so this path is tested without a GPU.

Each cast reads its tensor twice (the absolute maximum, then the scaled cast) and, run op by op,
also writes fp32 copies in between: the suspected reason FP8 ran slower than bf16 at 8B widths
(bench/results/gpu_proxy.md; its profiler breakdown measures it). ``compile=True``
(``precision.compile``) runs the casts as
``torch.compile``d functions instead, which fuse each into one reduction and one cast pass (the
backward's gradient cast also writes its transposed copy in that pass), as torchao's Float8Linear
relies on torch.compile to do; the GEMMs and the autograd function stay as they are. The results
equal the op-by-op casts (tests/test_fp8.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from megatron_vlm.backbones import recipes_of
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


def quantize_rows(matrix: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize`` of ``matrix`` [rows, K] with its rows padded (zeros) to a multiple of 16."""
    return quantize(_pad_rows(matrix), dtype)


def quantize_rows_transposed(
    matrix: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_rows`` and a contiguous copy of its transpose (the weight-gradient GEMM's operand)."""
    quantized, inverse_scale = quantize_rows(matrix, dtype)
    return quantized, quantized.t().contiguous(), inverse_scale


class Casts(NamedTuple):
    """The three casts an FP8 linear makes: op by op, or each as one compiled function."""

    tensor: Callable[[torch.Tensor, torch.dtype], tuple[torch.Tensor, torch.Tensor]]
    rows: Callable[[torch.Tensor, torch.dtype], tuple[torch.Tensor, torch.Tensor]]
    rows_transposed: Callable[[torch.Tensor, torch.dtype], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


EAGER_CASTS = Casts(quantize, quantize_rows, quantize_rows_transposed)


@functools.cache
def compiled_casts() -> Casts:
    """The casts through ``torch.compile`` (made once per process; compiled at their first call).

    dynamic=True: one kernel serves every GEMM shape of the model (weights, and micro-batches whose
    token counts vary), instead of a recompile per shape until torch marks the sizes dynamic.
    fullgraph=True: a cast that cannot be compiled whole fails at its first call rather than
    falling back to the op-by-op casts unnoticed."""

    def compiled(function: Callable[..., Any]) -> Callable[..., Any]:
        function = torch.compile(function, dynamic=True, fullgraph=True)

        def call(tensor: torch.Tensor, dtype: torch.dtype) -> Any:
            # The casts need no autograd, and the detached alias is a plain tensor: torch.compile
            # keeps a parameter's shape static and guards on a view's base, which would recompile
            # for every weight shape and every reshaped activation (past its recompile limit).
            return function(tensor.detach(), dtype)

        return call

    return Casts(compiled(quantize), compiled(quantize_rows), compiled(quantize_rows_transposed))


def compile_problem(device: torch.device) -> str | None:
    """Why the compiled casts cannot run on ``device`` here (None: they can)."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support this Python ({torch.__version__})"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "torch.compile needs Triton for CUDA kernels and it does not import"
    if device.type == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as error:  # inductor's own search for a C++ compiler, with its message
            return f"torch.compile needs a C++ compiler for CPU kernels: {error}"
        return None
    return f"compiled FP8 casts are not supported on {device.type}"


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
        casts: Casts,
    ) -> torch.Tensor:
        leading = input.shape[:-1]
        rows = input.reshape(-1, input.shape[-1])
        count = rows.shape[0]
        input8, input_scale = casts.rows(rows, E4M3)
        weight8, weight_scale = casts.tensor(weight, E4M3)
        output = torch._scaled_mm(input8, weight8.t(), scale_a=input_scale, scale_b=weight_scale, out_dtype=input.dtype)
        ctx.save_for_backward(input8, input_scale, weight8, weight_scale)
        ctx.grad_dtype, ctx.count, ctx.leading, ctx.casts = grad_dtype, count, leading, casts
        ctx.allreduce_dgrad, ctx.tp_group = allreduce_dgrad, tp_group
        ctx.input_dtype, ctx.weight_dtype = input.dtype, weight.dtype
        return output[:count].reshape(*leading, weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input8, input_scale, weight8, weight_scale = ctx.saved_tensors
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
        if ctx.needs_input_grad[1]:
            grad8, grad8_t, grad_scale = ctx.casts.rows_transposed(grad_rows, ctx.grad_dtype)
        else:
            grad8, grad_scale = ctx.casts.rows(grad_rows, ctx.grad_dtype)
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
                grad8_t,
                _column_major(input8),
                scale_a=grad_scale,
                scale_b=input_scale,
                out_dtype=ctx.weight_dtype,
            )
        return grad_input, grad_weight, None, None, None, None


def fp8_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    recipe: str = "hybrid",
    allreduce_dgrad: bool = False,
    tp_group: torch.distributed.ProcessGroup | None = None,
    casts: Casts = EAGER_CASTS,
) -> torch.Tensor:
    """``F.linear`` with FP8 GEMMs (``recipe``: "hybrid" e5m2 gradients, or "e4m3" throughout);
    ``casts``: ``EAGER_CASTS`` or ``compiled_casts()``."""
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r}: use one of {sorted(RECIPES)}")
    output = _Fp8Matmul.apply(input, weight, RECIPES[recipe], allreduce_dgrad, tp_group, casts)
    return output if bias is None else output + bias


# Arguments newer Megatron-Core versions pass to ``_forward_impl``, with the value meaning "off":
# anything else asks for something these linears do not do.
_INERT_ARGUMENTS = {"async_grad_allreduce": None, "gtp_remat_size": 1}  # gtp_remat_size: 0.19+


def _megatron_forward_impl(
    recipe: str,
    casts: Casts,
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
    return fp8_linear(input, weight, bias, recipe, allreduce_dgrad and weight.requires_grad, tp_group, casts)


def te_fp8_parts(model: ModelConfig, parallel: ParallelConfig) -> dict[str, str | None]:
    """For the parts built from TE layers (vision, text), why each cannot run FP8 through TE at
    this TP size (None: it can), by their recipes' GEMM shapes (``backbones.common``'s rule).

    Token counts are not checked here: packed vision tokens are padded to
    ``common.FP8_TOKEN_MULTIPLE``, and the decoder's micro-batch shapes are checked against the data
    at start-up (training/preflight.py)."""
    vision, _, text = recipes_of(model)
    tp = parallel.tensor_parallel
    return {"vision": vision.fp8_problem(model.vision, tp), "text": text.fp8_problem(model.text, tp)}


def use_torch_fp8(chunks: Iterable[torch.nn.Module], recipe: str = "hybrid", compile: bool = False) -> list[str]:
    """Switch the transformer linears of ``chunks`` to FP8; returns the names switched.

    The output layer (a vocabulary-sized GEMM whose logits feed the loss) stays in higher
    precision, and so does any linear with a dimension FP8 GEMMs cannot take. ``compile``
    (``precision.compile``): the casts run as compiled functions (``compiled_casts``)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r}: use one of {sorted(RECIPES)}")
    chunks = list(chunks)
    casts = EAGER_CASTS
    if compile:
        devices = {param.device for chunk in chunks for param in chunk.parameters()}
        for device in sorted(devices, key=str):
            problem = compile_problem(device)
            if problem:
                raise ValueError(f"precision.compile=true cannot work here: {problem}")
        casts = compiled_casts()
    switched = []
    for index, chunk in enumerate(chunks):
        for name, module in chunk.named_modules():
            if not isinstance(module, ColumnParallelLinear | RowParallelLinear) or name.endswith("output_layer"):
                continue
            if any(size % _ALIGN for size in module.weight.shape):
                continue
            module._forward_impl = functools.partial(_megatron_forward_impl, recipe, casts)
            switched.append(f"{index}.{name}")
    return switched
