"""Idefics1's connector (transformers' IdeficsPerceiverResampler), and its recipe: a Perceiver
resampler at the *vision* width that pools each image's vision tokens to ``num_latents`` latents.
The cross-attention decoder (``models/cross_attention.py``) reads them as keys and values; nothing
projects them to the text width.

Per block: LayerNorms on the context and the latents, multi-head attention whose queries are the
latents and whose keys/values are ``[context; latents]`` (no mask: a fixed-resolution encoder gives
every image the same tokens), optional LayerNorms on queries and keys per head, then a LayerNorm +
ReLU MLP at 4x the width, each with a residual; a final LayerNorm. LayerNorm eps is transformers'
default (1e-5), which Idefics hard-codes. Tensor parallelism splits heads and the MLP width.
Latent tensors are sequence-first: ``[latents, images, width]``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from megatron_vlm.backbones import common
from megatron_vlm.backbones.base import ParameterCount, recipe, register
from megatron_vlm.backbones.mapping import Mapping, Split, layer_rows
from megatron_vlm.backbones.perceiver import ShardedModuleList
from megatron_vlm.config import ConnectorConfig, ModelConfig, ParallelConfig, PrecisionConfig

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which IdeficsPerceiverResampler uses everywhere


class HeadLayerNorm(nn.Module):
    """A LayerNorm over ``head_dim`` shared by every head. Each tensor-parallel rank holds some of
    the heads, so its weight gradient is a partial sum: ``copy_to_tensor_model_parallel_region``
    (identity forward, all-reduce backward) makes it the full sum on every rank."""

    def __init__(self, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(head_dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = tensor_parallel.copy_to_tensor_model_parallel_region(self.weight)
        bias = tensor_parallel.copy_to_tensor_model_parallel_region(self.bias)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, LAYER_NORM_EPS)


class IdeficsPerceiverAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, connector: ConnectorConfig) -> None:
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        if connector.num_heads % tp:
            raise ValueError(f"resampler heads ({connector.num_heads}) must be divisible by tensor parallel size {tp}")
        self.heads = connector.num_heads // tp
        self.head_dim = connector.head_dim
        width, inner, dtype = config.hidden_size, connector.num_heads * connector.head_dim, config.params_dtype
        self.context_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS, dtype=dtype)
        self.latents_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS, dtype=dtype)
        self.q_norm = HeadLayerNorm(self.head_dim, dtype) if connector.qk_layer_norms else None
        self.k_norm = HeadLayerNorm(self.head_dim, dtype) if connector.qk_layer_norms else None

        def column() -> tensor_parallel.ColumnParallelLinear:
            return tensor_parallel.ColumnParallelLinear(
                width, inner, config=config, init_method=config.init_method, bias=False, gather_output=False
            )

        self.linear_q, self.linear_k, self.linear_v = column(), column(), column()
        self.linear_proj = tensor_parallel.RowParallelLinear(
            inner,
            width,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
        )

    def _heads(self, projected: torch.Tensor) -> torch.Tensor:
        tokens, images, _ = projected.shape  # -> [images, heads, tokens, head_dim]
        return projected.view(tokens, images, self.heads, self.head_dim).permute(1, 2, 0, 3)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """context [T, N, W], latents [L, N, W] -> [L, N, W]."""
        context = self.context_norm(context)
        latents = self.latents_norm(latents)
        keys_values = torch.cat([context, latents], dim=0)  # Flamingo: latents attend to themselves too
        query = self._heads(self.linear_q(latents)[0])
        key = self._heads(self.linear_k(keys_values)[0])
        value = self._heads(self.linear_v(keys_values)[0])
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        attended = F.scaled_dot_product_attention(query, key, value)  # no dropout in Idefics' resampler
        latents_out = attended.permute(2, 0, 1, 3).reshape(latents.shape[0], latents.shape[1], -1)
        return self.linear_proj(latents_out)[0]


class IdeficsPerceiverBlock(MegatronModule):
    def __init__(self, config: TransformerConfig, connector: ConnectorConfig) -> None:
        super().__init__(config=config)
        self.attention = IdeficsPerceiverAttention(config, connector)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS, dtype=config.params_dtype)
        submodules = MLPSubmodules(
            linear_fc1=tensor_parallel.ColumnParallelLinear, linear_fc2=tensor_parallel.RowParallelLinear
        )
        self.mlp = MLP(config, submodules, input_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attention(context, latents)
        return latents + self.mlp(self.mlp_norm(latents))[0]


class IdeficsPerceiverResampler(MegatronModule):
    """packed vision features [T, W] (images of equal length, one after another) + tokens per image
    [N] -> latents [L, N, W]."""

    def __init__(self, config: TransformerConfig, connector: ConnectorConfig) -> None:
        super().__init__(config=config)
        width = config.hidden_size
        self.latents = nn.Parameter(torch.ones(connector.num_latents, width, dtype=config.params_dtype))
        if config.perform_initialization:
            nn.init.normal_(self.latents)  # transformers' init
        self.layers = ShardedModuleList(IdeficsPerceiverBlock(config, connector) for _ in range(connector.depth))
        self.final_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS, dtype=config.params_dtype)

    def forward(self, vision_features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        images = lengths.numel()
        if images and bool((lengths != lengths[0]).any()):
            raise ValueError(
                f"the Idefics perceiver takes images of equal token counts (a fixed-resolution encoder); got {lengths}"
            )
        context = vision_features.view(images, -1, vision_features.shape[-1]).transpose(0, 1)  # [T, N, W]
        latents = self.latents[:, None, :].expand(-1, images, -1)
        for layer in self.layers:
            latents = layer(context, latents)
        return self.final_norm(latents)


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


class IdeficsPerceiverRecipe:
    """transformers' IdeficsPerceiverResampler at the vision width (ReLU MLP, LayerNorms)."""

    part, kind = "connector", "idefics_perceiver"
    hf_model_types = ("idefics_perciever",)  # sic: transformers' IdeficsPerceiverConfig.model_type
    # Every image must give the same vision token count (training/preflight.py checks the data).
    fixed_tokens_per_image = True

    def transformer_config(
        self, model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, initialize: bool = True
    ) -> TransformerConfig:
        """At the vision width, MLP 4x that, ReLU, no biases; Megatron's own linears (never TE's)."""
        connector = model.connector
        return common.connector_config(
            parallel,
            precision,
            initialize,
            num_layers=connector.depth,
            hidden_size=model.vision.hidden_size,
            ffn_hidden_size=4 * model.vision.hidden_size,
            num_attention_heads=connector.num_heads,
            kv_channels=connector.head_dim,
            add_bias_linear=False,
            gated_linear_unit=False,
            activation_func=F.relu,
        )

    def build(
        self, model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, initialize: bool
    ) -> IdeficsPerceiverResampler:
        if model.architecture != "cross_attention":
            raise ValueError(
                "connector kind 'idefics_perceiver' keeps the vision width: it feeds cross-attention "
                f"(model.architecture: cross_attention), not {model.architecture!r}"
            )
        return IdeficsPerceiverResampler(
            self.transformer_config(model, parallel, precision, initialize), model.connector
        )

    def tokens_per_image(self, model: ModelConfig) -> int:
        """Image tokens (keys of the cross-attention) per image: the latents."""
        return model.connector.num_latents

    # -- HF configs ------------------------------------------------------------------------

    def from_hf(self, p: Any) -> ConnectorConfig:
        """transformers' IdeficsPerceiverConfig -> ConnectorConfig."""
        return ConnectorConfig(
            kind=self.kind,
            num_latents=p.resampler_n_latents,
            depth=p.resampler_depth,
            num_heads=p.resampler_n_heads,
            num_kv_heads=p.resampler_n_heads,
            head_dim=p.resampler_head_dim,
            qk_layer_norms=bool(p.qk_layer_norms_perceiver),
        )

    def to_hf(self, model: ModelConfig) -> dict[str, Any]:
        c = model.connector
        return {
            "model_type": IdeficsPerceiverRecipe.hf_model_types[0],
            "use_resampler": True,
            "resampler_n_latents": c.num_latents,
            "resampler_depth": c.depth,
            "resampler_n_heads": c.num_heads,
            "resampler_head_dim": c.head_dim,
            "qk_layer_norms_perceiver": c.qk_layer_norms,
        }

    # -- weights ---------------------------------------------------------------------------

    def rows(self, model: ModelConfig) -> list[Mapping]:
        """Megatron names relative to the connector module, HF names relative to the resampler."""

        def norm(megatron: str, hf: str) -> list[Mapping]:
            return [Mapping(f"{megatron}.{p}", (f"{hf}.{p}",)) for p in ("weight", "bias")]

        layer = [
            *norm("layers.*.attention.context_norm", "blocks.*.0.context_layer_norm"),
            *norm("layers.*.attention.latents_norm", "blocks.*.0.latents_layer_norm"),
            Mapping("layers.*.attention.linear_q.weight", ("blocks.*.0.q_proj.weight",), Split.COLUMN),
            Mapping("layers.*.attention.linear_k.weight", ("blocks.*.0.k_proj.weight",), Split.COLUMN),
            Mapping("layers.*.attention.linear_v.weight", ("blocks.*.0.v_proj.weight",), Split.COLUMN),
            Mapping("layers.*.attention.linear_proj.weight", ("blocks.*.0.output_proj.weight",), Split.ROW),
            *norm("layers.*.mlp_norm", "blocks.*.1.ln"),
            Mapping("layers.*.mlp.linear_fc1.weight", ("blocks.*.1.fc.weight",), Split.COLUMN),
            Mapping("layers.*.mlp.linear_fc2.weight", ("blocks.*.1.c_proj.weight",), Split.ROW),
        ]
        if model.connector.qk_layer_norms:
            layer += [
                *norm("layers.*.attention.q_norm", "blocks.*.0.q_layer_norm"),
                *norm("layers.*.attention.k_norm", "blocks.*.0.k_layer_norm"),
            ]
        return [
            Mapping("latents", ("latents",)),
            *layer_rows(model.connector.depth, layer),
            *norm("final_norm", "layer_norm"),
        ]

    # -- counts ----------------------------------------------------------------------------

    def forward_flops(self, model: ModelConfig, patches: int) -> float:
        """One image of ``patches`` patches (its vision tokens as the encoder returns them)."""
        vision = recipe("vision", model.vision.kind)
        tokens = vision.output_tokens(model.vision, patches) if hasattr(vision, "output_tokens") else patches
        c, w = model.connector, model.vision.hidden_size
        inner, latents = c.num_heads * c.head_dim, c.num_latents
        keys = tokens + latents
        layer = (
            2 * latents * w * inner  # q
            + 2 * 2 * keys * w * inner  # k, v over [context; latents]
            + 2 * 2 * latents * keys * inner  # scores and weighted sum
            + 2 * latents * inner * w  # output
            + 2 * 2 * latents * w * 4 * w  # MLP at 4x width
        )
        return c.depth * layer

    def parameters(self, model: ModelConfig) -> ParameterCount:
        c, w = model.connector, model.vision.hidden_size
        inner = c.num_heads * c.head_dim
        norms = 3 * 2 * w + (2 * 2 * c.head_dim if c.qk_layer_norms else 0)
        layer = ParameterCount(sharded=4 * w * inner + 2 * 4 * w * w, replicated=norms)
        return ParameterCount(replicated=c.num_latents * w + 2 * w) + layer * c.depth


RECIPE = register("connector", "idefics_perceiver", IdeficsPerceiverRecipe())


class NoConnector(MegatronModule):
    """Every vision token of every image, as it is: packed [T, W] -> [tokens per image, N, W]."""

    def forward(self, vision_features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        images = lengths.numel()
        if images and bool((lengths != lengths[0]).any()):
            raise ValueError(f"connector kind 'none' takes images of equal token counts; got {lengths}")
        return vision_features.view(images, -1, vision_features.shape[-1]).transpose(0, 1)


class NoConnectorRecipe(IdeficsPerceiverRecipe):
    """Idefics1 without its resampler (``use_resampler=False``): the cross-attention keys are every
    vision token of the image (CLIP: the class token and every patch). No parameters; the perceiver
    settings are kept only so that the HF config is written back as it was read."""

    kind = "none"
    hf_model_types = ()

    def build(self, model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, initialize: bool) -> Any:
        if model.architecture != "cross_attention":
            raise ValueError(f"connector kind 'none' feeds cross-attention, not {model.architecture!r}")
        self.tokens_per_image(model)  # refuses a vision encoder without a fixed count
        return NoConnector(config=self.transformer_config(model, parallel, precision, initialize))

    def tokens_per_image(self, model: ModelConfig) -> int:
        """The vision encoder's tokens of one image."""
        vision = recipe("vision", model.vision.kind)
        count = vision.tokens_per_image(model.vision) if hasattr(vision, "tokens_per_image") else None
        if count is None:
            raise ValueError(f"connector kind 'none' needs a fixed vision token count; {model.vision.kind!r} has none")
        return count

    def from_hf(self, p: Any) -> ConnectorConfig:
        config = super().from_hf(p)
        config.kind = self.kind
        return config

    def to_hf(self, model: ModelConfig) -> dict[str, Any]:
        return {**super().to_hf(model), "use_resampler": False}

    def rows(self, model: ModelConfig) -> list[Mapping]:
        return []

    def forward_flops(self, model: ModelConfig, patches: int) -> float:
        return 0.0

    def parameters(self, model: ModelConfig) -> ParameterCount:
        return ParameterCount()


NONE_RECIPE = register("connector", "none", NoConnectorRecipe())
