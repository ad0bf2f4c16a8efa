"""TransformerConfigs and layer specs for the three parts of Idefics2.

The Transformer Engine spec (fused norm+linear, FP8-ready) is used when TE imports, the local
Megatron-Core spec otherwise. Their parameter names differ only in where the pre-norms live
(``input_layernorm.weight`` vs ``self_attention.linear_qkv.layer_norm_weight``); the local spec's
``sharded_state_dict_keys_map`` writes the TE names, so distributed checkpoints move between them,
and the conversion table accepts both (``conversion.mapping.canonical_name``).
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm import backend
from megatron_vlm.config import ModelConfig, ParallelConfig, PrecisionConfig

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


def _common_kwargs(parallel: ParallelConfig, precision: PrecisionConfig, initialize: bool) -> dict:
    dtype = torch_dtype(precision.params_dtype)
    recompute = {
        "none": {},
        "selective": {"recompute_granularity": "selective"},
        "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    }
    if parallel.recompute not in recompute:
        raise ValueError(f"recompute={parallel.recompute!r}: use one of {sorted(recompute)}")
    # Megatron-Core runs FP8 itself only through TE; the torch backend switches linears after
    # the model is built (models/fp8.py).
    te_fp8 = precision.fp8 if precision.fp8 and backend.fp8_backend(precision.fp8_backend) == "te" else None
    return dict(
        tensor_model_parallel_size=parallel.tensor_parallel,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        fp8=te_fp8,
        use_cpu_initialization=not backend.has_cuda(),
        perform_initialization=initialize,  # False when every weight is loaded next
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # The fused kernels below need CUDA extensions; the unfused paths compute the same thing.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=backend.has_fused_softmax(),
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        batch_p2p_comm=backend.has_cuda(),
        **recompute[parallel.recompute],
    )


def vision_transformer_config(
    model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, initialize: bool = True
) -> TransformerConfig:
    """SigLIP: LayerNorm, biased linears, gelu-tanh MLP. It lives whole on pipeline stage 0."""
    vision = model.vision
    return TransformerConfig(
        num_layers=vision.num_layers,
        hidden_size=vision.hidden_size,
        ffn_hidden_size=vision.intermediate_size,
        num_attention_heads=vision.num_heads,
        kv_channels=vision.head_dim,
        normalization="LayerNorm",
        layernorm_epsilon=vision.layer_norm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=functools.partial(F.gelu, approximate="tanh"),
        pipeline_model_parallel_size=1,
        **_common_kwargs(parallel, precision, initialize),
    )


def connector_transformer_config(
    model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, initialize: bool = True
) -> TransformerConfig:
    """Projection and resampler work at the text width, with SwiGLU MLPs and no biases."""
    connector = model.connector
    return TransformerConfig(
        num_layers=connector.depth,
        hidden_size=model.text.hidden_size,
        ffn_hidden_size=model.text.intermediate_size,
        num_attention_heads=connector.num_heads,
        num_query_groups=connector.num_kv_heads,
        kv_channels=connector.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=connector.rms_norm_eps,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        pipeline_model_parallel_size=1,
        **_common_kwargs(parallel, precision, initialize),
    )


def language_transformer_config(
    model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, initialize: bool = True
) -> TransformerConfig:
    """Mistral: RMSNorm, SwiGLU, GQA, RoPE; split over the pipeline, stage 0 possibly lighter."""
    text = model.text
    return TransformerConfig(
        num_layers=text.num_layers,
        hidden_size=text.hidden_size,
        ffn_hidden_size=text.intermediate_size,
        num_attention_heads=text.num_heads,
        num_query_groups=text.num_kv_heads,
        kv_channels=text.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=text.rms_norm_eps,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        num_layers_in_first_pipeline_stage=parallel.decoder_layers_in_first_stage,
        **_common_kwargs(parallel, precision, initialize),
    )


def layer_spec(config: TransformerConfig, attn_mask_type: AttnMaskType, use_te: bool) -> ModuleSpec:
    """A TransformerLayer spec with the given attention mask type."""
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization=config.normalization)
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.params = {"attn_mask_type": attn_mask_type}
    return spec


def vision_layer_spec(config: TransformerConfig, use_te: bool) -> ModuleSpec:
    # Non-causal; padded patches are masked out as keys.
    return layer_spec(config, AttnMaskType.padding, use_te)


def language_layer_spec(config: TransformerConfig, use_te: bool) -> ModuleSpec:
    # Causal, with an explicit mask for padding and packed documents. TE honours an explicit
    # mask only with the 'arbitrary' type; the local path applies any mask it is given.
    return layer_spec(config, AttnMaskType.arbitrary if use_te else AttnMaskType.causal, use_te)
