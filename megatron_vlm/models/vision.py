"""SigLIP vision encoder at native aspect ratio (NaViT-style), on Megatron-Core's TransformerBlock.

Images arrive padded to a common size with a pixel mask. A patch is real when all its pixels are;
padded patches get position 0 and are masked out as attention keys, so they influence nothing.
Position ids bucketize each image's fractional patch coordinates onto the fixed
``patches_per_side``^2 learned table, exactly as transformers' Idefics2VisionEmbeddings does.
Tensors inside the encoder are sequence-first ``[patches, images, hidden]`` as in Megatron.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from megatron_vlm.config import VisionConfig


def patch_attention_mask(pixel_attention_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[images, H, W] pixel mask -> [images, H/p, W/p] patch mask (a patch is real if all pixels are)."""
    grid = pixel_attention_mask.unfold(1, patch_size, patch_size).unfold(2, patch_size, patch_size)
    return grid.sum(dim=(-1, -2)) == patch_size * patch_size


def bucketized_position_ids(patch_mask: torch.Tensor, patches_per_side: int) -> torch.Tensor:
    """Position-table index of every patch: [images, h, w] bool -> [images, h*w] long (0 for padding)."""
    images, max_h, max_w = patch_mask.shape
    device = patch_mask.device
    boundaries = torch.arange(1 / patches_per_side, 1.0, 1 / patches_per_side, device=device)
    rows = patch_mask[:, :, 0].sum(dim=1)
    cols = patch_mask[:, 0, :].sum(dim=1)
    frac_h = torch.arange(max_h, device=device, dtype=torch.float32)[None, :] * (1.0 / rows)[:, None]
    frac_w = torch.arange(max_w, device=device, dtype=torch.float32)[None, :] * (1.0 / cols)[:, None]
    bucket_h = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=True)
    bucket_w = torch.bucketize(frac_w.clamp(max=1.0 - 1e-6), boundaries, right=True)
    ids = (bucket_h[:, :, None] * patches_per_side + bucket_w[:, None, :]).reshape(images, -1)
    return torch.where(patch_mask.reshape(images, -1), ids, torch.zeros_like(ids))


class SiglipVisionEncoder(MegatronModule):
    """Patch embedding + bucketized positions + TransformerBlock + post-layernorm."""

    def __init__(self, config: TransformerConfig, vision: VisionConfig, layer_spec: ModuleSpec) -> None:
        super().__init__(config=config)
        self.vision = vision
        # Replicated across tensor-parallel ranks: small, and its input is the raw image.
        self.patch_embedding = nn.Conv2d(
            vision.num_channels,
            vision.hidden_size,
            kernel_size=vision.patch_size,
            stride=vision.patch_size,
            dtype=config.params_dtype,
        )
        self.position_embedding = nn.Embedding(
            vision.patches_per_side**2, vision.hidden_size, dtype=config.params_dtype
        )
        if config.perform_initialization:
            config.init_method(self.patch_embedding.weight)
            nn.init.zeros_(self.patch_embedding.bias)
            config.init_method(self.position_embedding.weight)
        # post_process=True gives the block its final LayerNorm: SigLIP's post_layernorm.
        self.encoder = TransformerBlock(config, layer_spec, pre_process=True, post_process=True)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """pixel_values [images, C, H, W], patch_mask [images, H/p, W/p] -> [patches, images, hidden]."""
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        embeddings = patches.flatten(2).transpose(1, 2)  # [images, patches, hidden]
        position_ids = bucketized_position_ids(patch_mask, self.vision.patches_per_side)
        embeddings = embeddings + self.position_embedding(position_ids)
        # Megatron masks are True where attention is *not* allowed: here, padded keys.
        key_padding = ~patch_mask.reshape(patch_mask.shape[0], 1, 1, -1)
        hidden = embeddings.transpose(0, 1).contiguous()
        return self.encoder(hidden_states=hidden, attention_mask=key_padding)

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        """The encoder always starts from pixels on its own stage."""
