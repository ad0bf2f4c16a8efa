"""Mistral decoder (transformers' MistralForCausalLM) as a recipe: Megatron-Core's GPTModel with
RMSNorm, SwiGLU, GQA, RoPE and a sliding window; split over the pipeline, stage 0 possibly lighter."""

from __future__ import annotations

import copy
from collections.abc import Mapping as MappingType
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.backbones import common
from megatron_vlm.backbones.attention import DecoderAttention, te_decoder_attention
from megatron_vlm.backbones.base import ParameterCount, register
from megatron_vlm.backbones.mapping import Attention, Fuse, Mapping, Split, layer_rows
from megatron_vlm.config import ModelConfig, ParallelConfig, PrecisionConfig, TextConfig


class MistralRecipe:
    part, kind = "text", "mistral"
    hidden_act = "silu"
    tokenizer = "mistral"  # data.tokens.load_tokenizer: Mistral-7B's, shipped in mistral-common
    hf_model_types = ("mistral",)

    def transformer_config(
        self, model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, initialize: bool = True
    ) -> TransformerConfig:
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
            # transformers' window: the query and sliding_window - 1 keys before it (TE's (left, right)).
            window_size=None if text.sliding_window is None else (text.sliding_window - 1, 0),
            # No shape exchange between pipeline stages: every micro-batch of a step is packed to one
            # length every stage computes itself (``Idefics2Model.layout``). Megatron's variable
            # lengths exchange shapes and synchronise the whole device at every send and receive
            # (and 0.16's interleaved schedule pairs the exchanges wrongly: it hangs).
            variable_seq_lengths=False,
            # No MoE here; Megatron refuses variable lengths beside its default MoE dispatcher's name.
            moe_token_dispatcher_type="alltoall",
            **common.transformer_kwargs(
                parallel,
                precision,
                initialize,
                attention_dropout=text.attention_dropout,
                sequence_parallel=True,  # the decoder's sequence is what sequence parallelism splits
                fp8_problem=self.fp8_problem(text, parallel.tensor_parallel),
                # With TE, the per-token RoPE of DecoderAttentionMixin runs TE's fused kernel: the
                # packed tokens as one [tokens, 1, heads, d] sequence, each with its own angles.
                rope_fusion=common.use_transformer_engine(precision) and common.fused_rope_available(),
            ),
        )

    def block_spec(
        self, config: TransformerConfig, use_te: bool, vp_stage: int | None = None
    ) -> TransformerBlockSubmodules:
        """The decoder block of this pipeline chunk: its layers and the final norm (TE's, or
        ``TorchNorm``, so that sequence parallelism works without apex).

        The decoder runs each micro-batch as packed documents (THD, ``attention.DocumentLayout``),
        each its own causal sequence: TE attends within ``cu_seqlens`` (Megatron turns ``causal``
        into TE's ``padding_causal`` for THD) with the sliding window as ``window_size``; the local
        spec uses ``PackedSequenceAttention`` (Megatron's local core attention refuses THD). Either
        applies RoPE itself, from each packed token's position (``attention.DecoderAttentionMixin``),
        and serves generation's key/value cache."""
        spec = common.te_layer_spec() if use_te else common.local_layer_spec(config)
        core = te_decoder_attention() if use_te else DecoderAttention
        spec.submodules.self_attention.submodules.core_attention = core
        spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.causal}
        if use_te:
            from megatron.core.extensions.transformer_engine import TENorm

            final_norm: type = TENorm
        else:
            final_norm = common.TorchNorm
        layers = get_num_layers_to_build(config, vp_stage=vp_stage)
        return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=final_norm)

    def build(
        self,
        model: ModelConfig,
        config: TransformerConfig,
        use_te: bool,
        pre_process: bool,
        post_process: bool,
        vp_stage: int | None,
        layer_module: type | None = None,
        layer_params: dict[str, Any] | None = None,
    ) -> GPTModel:
        """``layer_module`` / ``layer_params``: another TransformerLayer class for every layer, built
        with these extra arguments (the cross-attention decoder's, ``models/cross_attention.py``)."""
        block = self.block_spec(config, use_te, vp_stage)
        if layer_module is not None:
            for spec in block.layer_specs:
                spec.module = layer_module
                spec.params = {**(spec.params or {}), **(layer_params or {})}
        return GPTModel(
            config=config,
            transformer_layer_spec=block,
            vocab_size=model.padded_vocab_size,
            max_sequence_length=model.text.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=False,
            # RoPE is applied per packed token by the core attention (DecoderAttentionMixin), from
            # the positions and ``inverse_frequencies``: Megatron's own RoPE over packed sequences
            # restarts at 0 in each and reads their boundaries on the host in every layer.
            position_embedding_type="none",
            # Images are spliced into the whole sequence, then it is split (models/idefics2.py).
            scatter_embedding_sequence_parallel=False,
            vp_stage=vp_stage,
        )

    def inverse_frequencies(self, t: TextConfig) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim / 2] (float32): theta^(-2i/d), as Megatron's and
        transformers' default RoPE."""
        dim = t.head_dim
        return 1.0 / (t.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))

    # -- HF configs ------------------------------------------------------------------------

    def hf_config(self, config_json: MappingType[str, Any]) -> Any:
        """A Mistral (or Llama-layout) ``config.json`` -> transformers' config of that model type."""
        from transformers import AutoConfig

        model_type = config_json.get("model_type")
        if model_type not in self.hf_model_types:
            raise ValueError(f"expected a Mistral text config, found model_type={model_type!r}")
        values = {k: v for k, v in copy.deepcopy(dict(config_json)).items() if k != "model_type"}
        return AutoConfig.for_model(model_type, **values)

    def from_hf(self, t: Any) -> TextConfig:
        """transformers' Mistral config -> TextConfig."""
        if t.hidden_act != self.hidden_act:
            raise ValueError(f"text_config.hidden_act={t.hidden_act!r} is not supported (expected {self.hidden_act!r})")
        if getattr(t, "tie_word_embeddings", False):
            raise ValueError("text_config.tie_word_embeddings=True is not supported (Idefics2 unties them)")
        heads = t.num_attention_heads
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // heads
        if head_dim * heads != t.hidden_size:
            raise ValueError(
                f"text_config.head_dim={head_dim} x {heads} heads must equal hidden_size={t.hidden_size} "
                "(a decoupled head size is not supported)"
            )
        return TextConfig(
            kind=self.kind,
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_layers=t.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=t.num_key_value_heads or heads,
            rope_theta=_rope_theta(t),
            rms_norm_eps=t.rms_norm_eps,
            max_position_embeddings=t.max_position_embeddings,
            sliding_window=getattr(t, "sliding_window", None),
            attention_dropout=float(getattr(t, "attention_dropout", 0.0)),
        )

    def to_hf(self, t: TextConfig, pad_token_id: int) -> dict[str, Any]:
        return {
            "model_type": "mistral",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "head_dim": t.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "max_position_embeddings": t.max_position_embeddings,
            "sliding_window": t.sliding_window,
            "attention_dropout": t.attention_dropout,
            "pad_token_id": pad_token_id,
            "tie_word_embeddings": False,
        }

    # -- weights ---------------------------------------------------------------------------

    def standalone_names(self, names: set[str]) -> tuple[dict[str, str], list[str]]:
        """A standalone MistralForCausalLM checkpoint's names -> {name relative to the decoder
        (``/`` for the root): source name}, and the names left out (none)."""
        return {("/" + n if n == "lm_head.weight" else n.removeprefix("model.")): n for n in names}, []

    def adapt_standalone(self, relative: str, tensor: torch.Tensor, t: TextConfig) -> torch.Tensor:
        return tensor

    def rows(self, t: TextConfig) -> list[Mapping]:
        """Megatron names relative to the GPTModel, HF names relative to the decoder (``/`` marks
        the checkpoint's root: the output layer lives beside the decoder in transformers)."""
        heads = Attention(t.num_heads, t.num_kv_heads, t.head_dim)
        qkv = tuple(f"layers.*.self_attn.{p}_proj.weight" for p in "qkv")
        layer = "decoder.layers.*."
        layers = [
            Mapping(f"{layer}input_layernorm.weight", ("layers.*.input_layernorm.weight",)),
            Mapping(f"{layer}self_attention.linear_qkv.weight", qkv, Split.COLUMN, Fuse.QKV, heads),
            Mapping(f"{layer}self_attention.linear_proj.weight", ("layers.*.self_attn.o_proj.weight",), Split.ROW),
            Mapping(f"{layer}pre_mlp_layernorm.weight", ("layers.*.post_attention_layernorm.weight",)),
            Mapping(
                f"{layer}mlp.linear_fc1.weight",
                ("layers.*.mlp.gate_proj.weight", "layers.*.mlp.up_proj.weight"),
                Split.GATED_COLUMN,
                Fuse.GATE_UP,
            ),
            Mapping(f"{layer}mlp.linear_fc2.weight", ("layers.*.mlp.down_proj.weight",), Split.ROW),
        ]
        embedding = Mapping("embedding.word_embeddings.weight", ("embed_tokens.weight",), Split.VOCAB)
        output = Mapping("output_layer.weight", ("/lm_head.weight",), Split.VOCAB)
        if t.additional_vocab_size:  # stored apart (Idefics1's decoupled embedding and LM head)
            extra = ("embed_tokens.additional_embedding.weight", "/lm_head.additional_fc.weight")
            embedding = Mapping(embedding.megatron, (*embedding.hf, extra[0]), Split.VOCAB, Fuse.VOCAB_CONCAT)
            output = Mapping(output.megatron, (*output.hf, extra[1]), Split.VOCAB, Fuse.VOCAB_CONCAT)
        return [
            embedding,
            *layer_rows(t.num_layers, layers),
            Mapping("decoder.final_layernorm.weight", ("norm.weight",)),
            output,
        ]

    # -- shapes and counts -----------------------------------------------------------------

    def gemms(self, t: TextConfig, tensor_parallel: int) -> dict[str, tuple[int, int]]:
        qkv = (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
        return common.transformer_layer_gemms(
            t.hidden_size, qkv, t.num_heads * t.head_dim, t.intermediate_size, True, tensor_parallel
        )

    def fp8_problem(self, t: TextConfig, tensor_parallel: int) -> str | None:
        return common.te_fp8_problem(self.gemms(t, tensor_parallel))

    def layer_forward_flops(self, t: TextConfig, tokens: int, attended: int) -> float:
        """One decoder layer over ``tokens`` positions; ``attended`` is the sum over positions of
        how many keys each attends to (causal, document-aware, windowed)."""
        return common.transformer_layer_forward_flops(tokens, self.gemms(t, 1), attended, t.num_heads * t.head_dim)

    def output_forward_flops(self, t: TextConfig, tokens: int) -> float:
        return 2 * tokens * t.hidden_size * t.vocab_size

    def layer_parameters(self, t: TextConfig) -> ParameterCount:
        h, q, kv = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
        return ParameterCount(
            sharded=h * (q + 2 * kv) + q * h + h * 2 * t.intermediate_size + t.intermediate_size * h, replicated=2 * h
        )


def _rope_theta(t: Any) -> float:
    """The RoPE base; any RoPE variant other than the default (scaling, partial rotary) is refused."""
    rope = dict(getattr(t, "rope_parameters", None) or {})
    scaling = dict(getattr(t, "rope_scaling", None) or {})  # transformers 4 keeps scaling apart
    for name, params in (("rope_parameters", rope), ("rope_scaling", scaling)):
        kind = params.get("rope_type", params.get("type", "default"))
        extra = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type", "type")}
        if kind != "default" or extra:
            raise ValueError(
                f"text_config.{name}: RoPE type {kind!r} {extra or ''} is not supported "
                "(only the default RoPE, with rope_theta, is implemented)"
            )
    theta = rope.get("rope_theta", getattr(t, "rope_theta", None))
    return float(10000.0 if theta is None else theta)


RECIPE = register("text", "mistral", MistralRecipe())
