"""Modality connector: SwiGLU projection, then a Perceiver resampler pooling each image to N latents,
and its recipe (config, HF config and weight names, FLOPs, parameters).

Semantics follow transformers' Idefics2Connector: latents attend (non-causally) to the
concatenation ``[image features; latents]`` with grouped-query attention, keys of padded patches
masked. Tensor parallelism splits the projection's hidden width and the resampler's heads (query
and key/value heads alike), so ``num_kv_heads`` must be divisible by TP.

Image features arrive packed (``[tokens, hidden]``, the real patches of each image one after the
other, as the vision encoder produces them): the projection and the key/value projections run on
real patches only. Only the attention itself lays keys out per image, ``[images, longest + latents]``
with a key mask, where the few latent queries make padding cheap.
Latent tensors are sequence-first: ``[latents, images, hidden]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default
from torch import nn

from megatron_vlm.backbones import common
from megatron_vlm.backbones.base import ParameterCount, register
from megatron_vlm.backbones.mapping import Fuse, Mapping, Split, layer_rows
from megatron_vlm.config import ConnectorConfig, ModelConfig, ParallelConfig, PrecisionConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as Idefics2RMSNorm."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        hidden = hidden.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(dtype)


def swiglu_mlp(config: TransformerConfig, input_size: int, ffn_hidden_size: int) -> MLP:
    """Megatron MLP with fused gate/up (column-parallel) and down (row-parallel) projections."""
    # MLP sizes linear_fc2 from config.ffn_hidden_size, so the width goes into the config.
    config = dataclasses.replace(config, ffn_hidden_size=ffn_hidden_size)
    submodules = MLPSubmodules(
        linear_fc1=tensor_parallel.ColumnParallelLinear, linear_fc2=tensor_parallel.RowParallelLinear
    )
    return MLP(config, submodules, input_size=input_size, ffn_hidden_size=ffn_hidden_size)


def projection_rows() -> list[Mapping]:
    """The modality projection's rows (Megatron: ``projection.``, HF: ``modality_projection.``),
    shared by every connector built on it."""
    return [
        Mapping(
            "projection.linear_fc1.weight",
            ("modality_projection.gate_proj.weight", "modality_projection.up_proj.weight"),
            Split.GATED_COLUMN,
            Fuse.GATE_UP,
        ),
        Mapping("projection.linear_fc2.weight", ("modality_projection.down_proj.weight",), Split.ROW),
    ]


def projection_flops(model: ModelConfig, tokens: int) -> float:
    """The modality projection's forward over ``tokens`` vision tokens."""
    t = model.text
    return 2 * tokens * (2 * model.vision.hidden_size * t.intermediate_size + t.intermediate_size * t.hidden_size)


def projection_parameters(model: ModelConfig) -> ParameterCount:
    t = model.text
    return ParameterCount(
        sharded=model.vision.hidden_size * 2 * t.intermediate_size + t.intermediate_size * t.hidden_size
    )


class PackedKeys:
    """Where each packed patch goes among its image's keys: ``[longest + latents, images]``, the
    image's patches first (padding after them, masked), then the image's latents, as transformers'
    ``[image features; latents]``."""

    def __init__(self, lengths: torch.Tensor, latents: int) -> None:
        images = lengths.numel()
        self.longest = int(lengths.max()) if images else 0
        image_of_token = torch.repeat_interleave(torch.arange(images, device=lengths.device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        slot = torch.arange(image_of_token.numel(), device=lengths.device) - starts[image_of_token]
        self.image_of_token, self.slot = image_of_token, slot
        real = torch.arange(self.longest, device=lengths.device)[None, :] < lengths[:, None]
        self.keep = torch.cat([real, real.new_ones(images, latents)], dim=1)  # [N, longest + L]

    def keys(self, packed: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """packed [T, W] (per patch), latents [L, N, W] -> [longest + L, N, W]."""
        images = latents.shape[1]
        grid = packed.new_zeros(self.longest, images, packed.shape[-1])
        grid = grid.index_put((self.slot, self.image_of_token), packed)
        return torch.cat([grid, latents], dim=0)


class PerceiverAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, connector: ConnectorConfig) -> None:
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        if connector.num_heads % tp or connector.num_kv_heads % tp:
            raise ValueError(
                f"resampler heads ({connector.num_heads}) and KV heads ({connector.num_kv_heads}) "
                f"must be divisible by tensor parallel size {tp}"
            )
        self.heads = connector.num_heads // tp
        self.kv_heads = connector.num_kv_heads // tp
        self.head_dim = connector.head_dim
        hidden = config.hidden_size

        def column(out_features: int) -> tensor_parallel.ColumnParallelLinear:
            return tensor_parallel.ColumnParallelLinear(
                hidden,
                out_features,
                config=config,
                init_method=config.init_method,
                bias=False,
                gather_output=False,
            )

        self.linear_q = column(connector.num_heads * connector.head_dim)
        self.linear_k = column(connector.num_kv_heads * connector.head_dim)
        self.linear_v = column(connector.num_kv_heads * connector.head_dim)
        self.linear_proj = tensor_parallel.RowParallelLinear(
            connector.num_heads * connector.head_dim,
            hidden,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
        )

    def _heads(self, projected: torch.Tensor, heads: int) -> torch.Tensor:
        tokens, images, _ = projected.shape  # -> [images, heads, tokens, head_dim]
        return projected.view(tokens, images, heads, self.head_dim).permute(1, 2, 0, 3)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, layout: PackedKeys) -> torch.Tensor:
        """latents [L, N, H], context [T, H] packed -> [L, N, H]."""
        query = self._heads(self.linear_q(latents)[0], self.heads)
        key = layout.keys(self.linear_k(context[:, None])[0][:, 0], self.linear_k(latents)[0])
        value = layout.keys(self.linear_v(context[:, None])[0][:, 0], self.linear_v(latents)[0])
        key, value = self._heads(key, self.kv_heads), self._heads(value, self.kv_heads)
        groups = self.heads // self.kv_heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        dropout = self.config.attention_dropout if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork():  # dropout differs per TP rank's heads
            attended = F.scaled_dot_product_attention(
                query, key, value, attn_mask=layout.keep[:, None, None, :], dropout_p=dropout
            )
        latents_out = attended.permute(2, 0, 1, 3).reshape(latents.shape[0], latents.shape[1], -1)
        return self.linear_proj(latents_out)[0]


class PerceiverLayer(MegatronModule):
    def __init__(self, config: TransformerConfig, connector: ConnectorConfig) -> None:
        super().__init__(config=config)
        hidden, eps, dtype = config.hidden_size, connector.rms_norm_eps, config.params_dtype
        self.input_latents_norm = RMSNorm(hidden, eps, dtype)
        self.input_context_norm = RMSNorm(hidden, eps, dtype)
        self.attention = PerceiverAttention(config, connector)
        self.pre_mlp_norm = RMSNorm(hidden, eps, dtype)
        self.mlp = swiglu_mlp(config, hidden, 4 * hidden)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, layout: PackedKeys) -> torch.Tensor:
        latents = latents + self.attention(self.input_latents_norm(latents), self.input_context_norm(context), layout)
        return latents + self.mlp(self.pre_mlp_norm(latents))[0]


class ShardedModuleList(nn.ModuleList):
    """A ModuleList whose distributed-checkpoint entries come from its members.

    Megatron's default treats a plain ModuleList as replicated tensors, which would save each
    tensor-parallel shard of the resampler layers as if it were the whole tensor.
    """

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        entries = {}
        for index, module in enumerate(self):
            entries.update(sharded_state_dict_default(module, f"{prefix}{index}.", sharded_offsets, metadata))
        return entries


class Idefics2Connector(MegatronModule):
    """packed vision features [T, Hv] + patches per image [N] -> resampled image tokens [L, N, H]."""

    def __init__(self, config: TransformerConfig, connector: ConnectorConfig, vision_hidden_size: int) -> None:
        super().__init__(config=config)
        self.projection = swiglu_mlp(config, vision_hidden_size, config.ffn_hidden_size)
        hidden = config.hidden_size
        self.latents = nn.Parameter(torch.ones(connector.num_latents, hidden, dtype=config.params_dtype))
        self.layers = ShardedModuleList(PerceiverLayer(config, connector) for _ in range(connector.depth))
        self.final_norm = RMSNorm(hidden, connector.rms_norm_eps, config.params_dtype)

    def forward(self, vision_features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        context = self.projection(vision_features[:, None])[0][:, 0]  # [T, H]: real patches only
        images = lengths.numel()
        latents = self.latents[:, None, :].expand(-1, images, -1)
        layout = PackedKeys(lengths, self.latents.shape[0])
        for layer in self.layers:
            latents = layer(latents, context, layout)
        return self.final_norm(latents)


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


class PerceiverRecipe:
    """Idefics2's connector (transformers' Idefics2Connector): a SwiGLU projection from the vision
    width to the text width, and a Perceiver resampler (GQA, RMSNorm, SwiGLU MLP at 4x width)."""

    part, kind = "connector", "perceiver"
    hidden_act = "silu"
    hf_model_types = ("idefics2_perceiver", "idefics2")

    def transformer_config(
        self, model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, initialize: bool = True
    ) -> TransformerConfig:
        """Projection and resampler work at the text width, with SwiGLU MLPs and no biases. Their
        linears are Megatron's own (never TE's): no FP8 through TE, no sequence split."""
        connector = model.connector
        return common.connector_config(
            parallel,
            precision,
            initialize,
            attention_dropout=connector.attention_dropout,
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
        )

    def build(
        self, model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, initialize: bool
    ) -> Idefics2Connector:
        config = self.transformer_config(model, parallel, precision, initialize)
        return Idefics2Connector(config, model.connector, model.vision.hidden_size)

    def tokens_per_image(self, model: ModelConfig) -> int:
        """Image tokens in the text per image: the latents, whatever the image's size."""
        return model.connector.num_latents

    # -- HF configs ------------------------------------------------------------------------

    def from_hf(self, p: Any) -> ConnectorConfig:
        """transformers' Idefics2PerceiverConfig -> ConnectorConfig."""
        if p.hidden_act != self.hidden_act:
            raise ValueError(
                f"perceiver_config.hidden_act={p.hidden_act!r} is not supported (expected {self.hidden_act!r})"
            )
        return ConnectorConfig(
            kind=self.kind,
            num_latents=p.resampler_n_latents,
            depth=p.resampler_depth,
            num_heads=p.resampler_n_heads,
            num_kv_heads=p.num_key_value_heads,
            head_dim=p.resampler_head_dim,
            rms_norm_eps=p.rms_norm_eps,
            attention_dropout=float(p.attention_dropout),
        )

    def to_hf(self, model: ModelConfig) -> dict[str, Any]:
        c = model.connector
        return {
            "hidden_act": self.hidden_act,
            "hidden_size": model.text.hidden_size,
            "rms_norm_eps": c.rms_norm_eps,
            "resampler_n_latents": c.num_latents,
            "resampler_depth": c.depth,
            "resampler_n_heads": c.num_heads,
            "resampler_head_dim": c.head_dim,
            "num_key_value_heads": c.num_kv_heads,
            "attention_dropout": c.attention_dropout,
        }

    # -- weights ---------------------------------------------------------------------------

    def rows(self, model: ModelConfig) -> list[Mapping]:
        """Megatron names relative to the connector module, HF names relative to Idefics2's connector."""
        hf = "perceiver_resampler.layers.*."
        layer = [
            Mapping("layers.*.input_latents_norm.weight", (f"{hf}input_latents_norm.weight",)),
            Mapping("layers.*.input_context_norm.weight", (f"{hf}input_context_norm.weight",)),
            Mapping("layers.*.attention.linear_q.weight", (f"{hf}self_attn.q_proj.weight",), Split.COLUMN),
            Mapping("layers.*.attention.linear_k.weight", (f"{hf}self_attn.k_proj.weight",), Split.COLUMN),
            Mapping("layers.*.attention.linear_v.weight", (f"{hf}self_attn.v_proj.weight",), Split.COLUMN),
            Mapping("layers.*.attention.linear_proj.weight", (f"{hf}self_attn.o_proj.weight",), Split.ROW),
            Mapping("layers.*.pre_mlp_norm.weight", (f"{hf}post_attention_layernorm.weight",)),
            Mapping(
                "layers.*.mlp.linear_fc1.weight",
                (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"),
                Split.GATED_COLUMN,
                Fuse.GATE_UP,
            ),
            Mapping("layers.*.mlp.linear_fc2.weight", (f"{hf}mlp.down_proj.weight",), Split.ROW),
        ]
        return [
            *projection_rows(),
            Mapping("latents", ("perceiver_resampler.latents",)),
            *layer_rows(model.connector.depth, layer),
            Mapping("final_norm.weight", ("perceiver_resampler.norm.weight",)),
        ]

    # -- counts ----------------------------------------------------------------------------

    def forward_flops(self, model: ModelConfig, patches: int) -> float:
        """One image of ``patches`` real patches: projection, then the resampler."""
        c, ht = model.connector, model.text.hidden_size
        projection = projection_flops(model, patches)
        latents, q_width, kv_width = c.num_latents, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        context = patches + latents
        layer = (
            2 * latents * ht * q_width  # q
            + 2 * 2 * context * ht * kv_width  # k, v over [image; latents]
            + 2 * 2 * latents * context * q_width  # scores and weighted sum
            + 2 * latents * q_width * ht  # output
            + 2 * latents * 3 * ht * 4 * ht  # SwiGLU MLP at 4x width
        )
        return projection + c.depth * layer

    def parameters(self, model: ModelConfig) -> ParameterCount:
        c, t = model.connector, model.text
        h, q, kv = t.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        projection = projection_parameters(model)
        layer = ParameterCount(sharded=h * q + 2 * h * kv + q * h + h * 8 * h + 4 * h * h, replicated=3 * h)
        return (
            projection + ParameterCount(replicated=c.num_latents * h) + layer * c.depth + ParameterCount(replicated=h)
        )


RECIPE = register("connector", "perceiver", PerceiverRecipe())
