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
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm import backend
from megatron_vlm.config import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_vlm.models.attention import PackedSequenceAttention
from megatron_vlm.models.fp8 import te_fp8_parts

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


def _part_kwargs(
    part: str, model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, initialize: bool
) -> dict:
    """``_common_kwargs`` for one part of the model.

    Only the decoder's input is split along the sequence: vision and connector see whole images,
    so sequence parallelism (which would all-gather their inputs) stays off for them. TE runs FP8
    per part, and only for a part whose every GEMM meets TE's FP8 shape rules at this TP size
    (``fp8.te_fp8_parts``); the others run in the training dtype."""
    kwargs = _common_kwargs(parallel, precision, initialize)
    # Each part's own dropout on attention probabilities (transformers' attention_dropout).
    kwargs["attention_dropout"] = getattr(model, part).attention_dropout
    if part != "text":
        kwargs["sequence_parallel"] = False
    if kwargs["fp8"] is not None and (part == "connector" or te_fp8_parts(model, parallel)[part] is not None):
        kwargs["fp8"] = None  # the connector's linears are Megatron's own, not TE's
    return kwargs


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
        **_part_kwargs("vision", model, parallel, precision, initialize),
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
        **_part_kwargs("connector", model, parallel, precision, initialize),
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
        **_part_kwargs("text", model, parallel, precision, initialize),
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


def _te_spec() -> ModuleSpec:
    return copy.deepcopy(get_gpt_layer_with_transformer_engine_spec())


def _local_spec(config: TransformerConfig) -> ModuleSpec:
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
    return spec_linears(_te_spec() if use_te else _local_spec(config))


def vision_layer_spec(config: TransformerConfig, use_te: bool) -> ModuleSpec:
    """Non-causal attention within each image; images arrive as packed sequences (THD, one per
    image: ``models/attention.py``), so there is no mask to interpret. TE attends within
    ``cu_seqlens`` (Megatron turns ``no_mask`` into TE's ``padding`` type for THD); the local spec
    uses ``PackedSequenceAttention``, since Megatron's local core attention refuses packed input."""
    spec = _te_spec() if use_te else _local_spec(config)
    if not use_te:
        spec.submodules.self_attention.submodules.core_attention = PackedSequenceAttention
    spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.no_mask}
    return spec


def language_mask_type(use_te: bool) -> AttnMaskType:
    """The decoder's attention always gets an explicit mask (causal, per packed document, padded
    keys, sliding window), and its kernels must apply it:

    * TE honours an explicit mask only with the ``arbitrary`` type (``causal`` / ``padding`` are
      turned into sequence lengths by its fused and flash backends).
    * Megatron's local core attention hands the mask to ``FusedScaleMaskSoftmax``. When its fused
      kernels are available, ``causal`` runs the upper-triangular kernel, which ignores the mask
      (documents would attend across their boundaries); ``padding`` runs ``ScaledMaskedSoftmax``,
      which applies the mask as given. Without the kernels both types apply the mask.
    """
    return AttnMaskType.arbitrary if use_te else AttnMaskType.padding


def language_layer_spec(
    config: TransformerConfig, use_te: bool, vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """The decoder block of this pipeline chunk: its layers and the final norm (TE's, or
    ``TorchNorm``, so that sequence parallelism works without apex)."""
    spec = _te_spec() if use_te else _local_spec(config)
    spec.submodules.self_attention.params = {"attn_mask_type": language_mask_type(use_te)}
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm: type = TENorm
    else:
        final_norm = TorchNorm
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=final_norm)
