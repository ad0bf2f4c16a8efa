"""SigLIP vision encoder at native aspect ratio (NaViT-style), on Megatron-Core's TransformerBlock.

Images arrive padded to a common size with a pixel mask. A patch is real when all its pixels are.
Position ids bucketize each image's fractional patch coordinates onto the fixed
``patches_per_side``^2 learned table, exactly as transformers' Idefics2VisionEmbeddings does.

Only real patches enter the transformer: each image is one sequence of its own, packed end to end
(THD layout, ``cu_seqlens``; see ``models/attention.py``). Padded patches are never computed, and
no attention backend has to interpret a padding mask: Transformer Engine's fused and flash
backends read a ``[N, 1, 1, S]`` padding mask as "the first n tokens are real", which is false for
an image narrower than the widest one, whose real patches are not a prefix of the padded grid.
Attention within an image is invariant to the order of its patches, so this equals transformers'
masked computation. Tensors inside the encoder are ``[tokens, 1, hidden]`` (batch of one packed
sequence), as Megatron expects for THD.
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from megatron_vlm.config import VisionConfig
from megatron_vlm.models.attention import packed_seq_params


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
    """Patch embedding + bucketized positions + TransformerBlock + post-layernorm, on packed images.

    ``token_multiple``: the packed token count is padded up to a multiple of it with a separate
    sequence of zeros (dropped at the end), for GEMMs that need aligned row counts (FP8).
    """

    def __init__(
        self, config: TransformerConfig, vision: VisionConfig, layer_spec: ModuleSpec, token_multiple: int = 1
    ) -> None:
        super().__init__(config=config)
        self.vision = vision
        self.token_multiple = token_multiple
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

    def embed(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Real patches of every image, embedded and packed: ([tokens, hidden], patches per image)."""
        lengths = patch_mask.flatten(1).sum(1)
        empty = (lengths == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"images {empty} have no complete {self.vision.patch_size}x{self.vision.patch_size} patch "
                f"(pixel mask smaller than one patch)"
            )
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        embeddings = patches.flatten(2).transpose(1, 2)  # [images, max patches, hidden]
        position_ids = bucketized_position_ids(patch_mask, self.vision.patches_per_side)
        real = patch_mask.flatten(1)
        # Row-major within each image, images in order: the packed THD sequence.
        packed = embeddings[real] + self.position_embedding(position_ids[real])
        return packed, lengths

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [images, C, H, W], patch_mask [images, H/p, W/p] ->
        (features [tokens, hidden] of the real patches, image after image; patches per image [images])."""
        packed, lengths = self.embed(pixel_values, patch_mask)
        tokens = packed.shape[0]
        sequence_lengths = lengths
        extra = -tokens % self.token_multiple
        if extra:  # an extra sequence of zeros: attends only to itself, dropped below
            packed = torch.cat([packed, packed.new_zeros(extra, packed.shape[1])])
            sequence_lengths = torch.cat([lengths, lengths.new_tensor([extra])])
        params: PackedSeqParams = packed_seq_params(sequence_lengths)
        hidden = self.encoder(hidden_states=packed[:, None, :], attention_mask=None, packed_seq_params=params)
        return hidden[:tokens, 0], lengths

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        """The encoder always starts from pixels on its own stage."""
