"""What every backbone recipe shares: precision and parallelism settings of a TransformerConfig,
layer specs (Transformer Engine or Megatron-Core's local layers), norms that work with sequence
parallelism, and Transformer Engine's FP8 shape rules.

The TE spec (fused norm+linear, FP8-ready) is used when TE imports, the local spec otherwise.
Their parameter names differ only in where the pre-norms live (``input_layernorm.weight`` vs
``self_attention.linear_qkv.layer_norm_weight``); the local spec's ``sharded_state_dict_keys_map``
writes the TE names, so distributed checkpoints move between them, and the conversion table accepts
both (``models.naming.canonical_name``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm import backend
from megatron_vlm.config import ParallelConfig, PrecisionConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def use_transformer_engine(precision: PrecisionConfig) -> bool:
    if precision.use_transformer_engine is None:
        return backend.has_transformer_engine()
    if precision.use_transformer_engine and not backend.has_transformer_engine():
        raise RuntimeError("use_transformer_engine=True but transformer_engine does not import (needs a GPU)")
    return precision.use_transformer_engine


def fused_rope_available() -> bool:
    """Whether Megatron-Core found TE's fused RoPE kernel (what ``apply_rope_fusion`` needs)."""
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils.fused_apply_rotary_pos_emb is not None


def te_fp8_requested(precision: PrecisionConfig) -> bool:
    """Whether FP8 runs through Transformer Engine (set in the TransformerConfigs); the torch
    backend switches linears after the model is built (models/fp8.py)."""
    return bool(precision.fp8) and backend.fp8_backend(precision.fp8_backend) == "te"


_RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


def connector_config(
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    initialize: bool,
    attention_dropout: float = 0.0,
    **shape: Any,
) -> TransformerConfig:
    """The TransformerConfig of a connector: Megatron's own linears (never TE's, so no FP8 through
    TE), on whole images (no sequence split), whole on the first pipeline stage. A connector without
    attention still needs a head count TP divides (``num_attention_heads`` defaults to TP)."""
    shape.setdefault("num_attention_heads", parallel.tensor_parallel)
    return TransformerConfig(
        pipeline_model_parallel_size=1,
        **shape,
        **transformer_kwargs(
            parallel,
            precision,
            initialize,
            attention_dropout=attention_dropout,
            sequence_parallel=False,
            fp8_problem="the connector's linears are Megatron's own, not Transformer Engine's",
        ),
    )


def transformer_kwargs(
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    initialize: bool,
    *,
    attention_dropout: float,
    sequence_parallel: bool,
    fp8_problem: str | None,
    rope_fusion: bool = False,
) -> dict:
    """The TransformerConfig settings of one part that do not describe its shape.

    ``sequence_parallel``: whether this part's input is split along the sequence (only the
    decoder's is: vision and connector see whole images). ``fp8_problem``: why TE cannot run this
    part's GEMMs in FP8 (``te_fp8_problem``); such a part runs in the training dtype.
    ``rope_fusion``: the part's RoPE through TE's fused kernel (the decoder's, with TE)."""
    if parallel.recompute not in _RECOMPUTE:
        raise ValueError(f"recompute={parallel.recompute!r}: use one of {sorted(_RECOMPUTE)}")
    dtype = torch_dtype(precision.params_dtype)
    return dict(
        tensor_model_parallel_size=parallel.tensor_parallel,
        sequence_parallel=sequence_parallel and parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        fp8=precision.fp8 if te_fp8_requested(precision) and fp8_problem is None else None,
        use_cpu_initialization=not backend.has_cuda(),
        perform_initialization=initialize,  # False when every weight is loaded next
        hidden_dropout=0.0,
        attention_dropout=attention_dropout,  # the part's own (transformers' attention_dropout)
        # The fused kernels below need CUDA extensions; the unfused paths compute the same thing.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=backend.has_fused_softmax(),
        bias_dropout_fusion=False,
        apply_rope_fusion=rope_fusion,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        batch_p2p_comm=backend.has_cuda(),
        # Megatron synchronises the whole device after every batched send/receive only "to work
        # around a bug in older versions of PyTorch" (its docstring); the torch versions supported
        # here need none, and each sync stalls the pipeline.
        batch_p2p_sync=False,
        **_RECOMPUTE[parallel.recompute],
    )


class TorchNorm:
    """torch's LayerNorm / RMSNorm for the local spec, usable with sequence parallelism.

    Megatron-Core's ``WrappedTorchNorm`` refuses ``sequence_parallel``. Under sequence parallelism
    each tensor-parallel rank normalises its slice of the sequence, so its weight gradients are
    partial sums: marking the parameters ``sequence_parallel`` makes ``finalize_model_grads``
    all-reduce them over the tensor-parallel group, as it does for TE's and apex's norms.
    Parameter names (``weight``, ``bias``) are those of ``WrappedTorchNorm``.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object) -> torch.nn.Module:
        if config.normalization == "LayerNorm":
            norm: torch.nn.Module = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization={config.normalization!r}: use LayerNorm or RMSNorm")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def te_layer_spec() -> ModuleSpec:
    return copy.deepcopy(get_gpt_layer_with_transformer_engine_spec())


def local_layer_spec(config: TransformerConfig) -> ModuleSpec:
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=config.normalization))
    spec.submodules.input_layernorm = TorchNorm
    spec.submodules.pre_mlp_layernorm = TorchNorm
    return spec


# The linears of Megatron-Core's Transformer Engine layer spec (get_gpt_layer_with_transformer_engine_spec),
# by class name: start-up checks judge a TE run on machines where TE does not import (tests compare
# this with the real spec where it does).
TE_LAYER_LINEARS = {
    "self_attention.linear_qkv": "TELayerNormColumnParallelLinear",
    "self_attention.linear_proj": "TERowParallelLinear",
    "mlp.linear_fc1": "TELayerNormColumnParallelLinear",
    "mlp.linear_fc2": "TERowParallelLinear",
}


def spec_linears(spec: ModuleSpec) -> dict[str, str]:
    """The class name of each linear a layer spec builds."""
    attention, mlp = spec.submodules.self_attention.submodules, spec.submodules.mlp.submodules
    return {
        "self_attention.linear_qkv": attention.linear_qkv.__name__,
        "self_attention.linear_proj": attention.linear_proj.__name__,
        "mlp.linear_fc1": mlp.linear_fc1.__name__,
        "mlp.linear_fc2": mlp.linear_fc2.__name__,
    }


def layer_linears(config: TransformerConfig, use_te: bool) -> dict[str, str]:
    """The linears a transformer layer will have: from the spec itself, or from
    ``TE_LAYER_LINEARS`` when TE is the target but does not import here."""
    if use_te and not backend.imports("transformer_engine.pytorch"):
        return dict(TE_LAYER_LINEARS)
    return spec_linears(te_layer_spec() if use_te else local_layer_spec(config))


# --------------------------------------------------------------------------------------------
# Transformer Engine's FP8 shape rules
# --------------------------------------------------------------------------------------------

# TE runs an FP8 GEMM only on a 2-D input whose rows are a multiple of 8 and whose columns are a
# multiple of 16, with a weight [out, in] obeying the same (``assert_dim_for_fp8_exec`` in
# transformer_engine/pytorch/utils.py, asserted in the forward of Linear, LayerNormLinear and
# LayerNormMLP); otherwise it stops with an assertion.
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


def te_fp8_problem(gemms: dict[str, tuple[int, int]]) -> str | None:
    """Why TE cannot run a layer whose GEMMs are ``gemms`` (name -> (in, out) per TP rank) in FP8."""
    problems = [
        f"{name} [{out_features} x {in_features}] per TP rank: {problem}"
        for name, (in_features, out_features) in gemms.items()
        if (problem := te_fp8_gemm_problem(None, in_features, out_features))
    ]
    return "; ".join(problems) or None


def transformer_layer_gemms(
    hidden: int, qkv: int, attention: int, ffn: int, gated: bool, tensor_parallel: int
) -> dict[str, tuple[int, int]]:
    """(in, out) features of each GEMM of a Megatron TransformerLayer on one TP rank."""
    tp = tensor_parallel
    return {
        "self_attention.linear_qkv": (hidden, qkv // tp),
        "self_attention.linear_proj": (attention // tp, hidden),
        "mlp.linear_fc1": (hidden, (2 if gated else 1) * ffn // tp),
        "mlp.linear_fc2": (ffn // tp, hidden),
    }


def transformer_layer_forward_flops(tokens: int, gemms: dict[str, tuple[int, int]], attended: int, width: int) -> float:
    """Matmul FLOPs of one layer's forward: its GEMMs over ``tokens`` and attention (scores and
    weighted sum) over ``attended`` (query, key) pairs at ``width`` = heads x head_dim."""
    return tokens * sum(2 * i * o for i, o in gemms.values()) + 2 * 2 * attended * width
