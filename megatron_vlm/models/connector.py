"""Modality connector: SwiGLU projection, then a Perceiver resampler pooling each image to N latents.

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

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default
from torch import nn

from megatron_vlm.config import ConnectorConfig


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
