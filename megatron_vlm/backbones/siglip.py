"""SigLIP vision encoder at native aspect ratio (NaViT-style), on Megatron-Core's TransformerBlock,
and its recipe (config, layer spec, HF config and weight names, GEMM shapes, FLOPs, parameters).

Images arrive padded to a common size with a pixel mask. A patch is real when all its pixels are.
Position ids bucketize each image's fractional patch coordinates onto the fixed
``patches_per_side``^2 learned table, exactly as transformers' Idefics2VisionEmbeddings does.

Only real patches enter the transformer: each image is one sequence of its own, packed end to end
(THD layout, ``cu_seqlens``; see ``backbones/attention.py``). Padded patches are never computed, and
no attention backend has to interpret a padding mask: Transformer Engine's fused and flash
backends read a ``[N, 1, 1, S]`` padding mask as "the first n tokens are real", which is false for
an image narrower than the widest one, whose real patches are not a prefix of the padded grid.
Attention within an image is invariant to the order of its patches, so this equals transformers'
masked computation. Tensors inside the encoder are ``[tokens, 1, hidden]`` (batch of one packed
sequence), as Megatron expects for THD.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping as MappingType
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from megatron_vlm.backbones import common
from megatron_vlm.backbones.attention import PackedSequenceAttention, packed_seq_params
from megatron_vlm.backbones.base import ParameterCount, register
from megatron_vlm.backbones.mapping import Attention, Fuse, Mapping, Split, layer_rows
from megatron_vlm.config import ParallelConfig, PrecisionConfig, VisionConfig


def patch_attention_mask(pixel_attention_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[images, H, W] pixel mask -> [images, H/p, W/p] patch mask (a patch is real if all pixels are)."""
    grid = pixel_attention_mask.unfold(1, patch_size, patch_size).unfold(2, patch_size, patch_size)
    return grid.sum(dim=(-1, -2)) == patch_size * patch_size


def bucketized_position_ids(patch_mask: torch.Tensor, patches_per_side: int) -> torch.Tensor:
    """Position-table index of every patch: [images, h, w] bool -> [images, h*w] long (0 for padding)."""
    images, max_h, max_w = patch_mask.shape
    device = patch_mask.device
    # Made on the host, as transformers makes them: CUDA's arange accumulates in float32 where the
    # CPU's uses double, which moves some boundaries by one ulp and shifts whole rows of position
    # ids (grids of 9, 18 or 27 patches of a 27-patch table; issue #27).
    boundaries = torch.arange(1 / patches_per_side, 1.0, 1 / patches_per_side).to(device)
    rows = patch_mask[:, :, 0].sum(dim=1)
    cols = patch_mask[:, 0, :].sum(dim=1)
    frac_h = torch.arange(max_h, device=device, dtype=torch.float32)[None, :] * (1.0 / rows)[:, None]
    frac_w = torch.arange(max_w, device=device, dtype=torch.float32)[None, :] * (1.0 / cols)[:, None]
    bucket_h = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=True)
    bucket_w = torch.bucketize(frac_w.clamp(max=1.0 - 1e-6), boundaries, right=True)
    ids = (bucket_h[:, :, None] * patches_per_side + bucket_w[:, None, :]).reshape(images, -1)
    return torch.where(patch_mask.reshape(images, -1), ids, torch.zeros_like(ids))


def run_packed(
    encoder: TransformerBlock, packed: torch.Tensor, lengths: torch.Tensor, token_multiple: int = 1
) -> torch.Tensor:
    """Images packed end to end ([tokens, hidden], ``lengths`` tokens each) through a ViT encoder
    block, each image its own sequence (THD). With ``token_multiple`` > 1 (FP8 GEMMs want aligned
    row counts) the tokens are padded up to a multiple of it by one extra sequence of zeros, which
    attends only to itself and is dropped from the output."""
    tokens = packed.shape[0]
    sequence_lengths = lengths
    extra = -tokens % token_multiple
    if extra:
        packed = torch.cat([packed, packed.new_zeros(extra, packed.shape[1])])
        sequence_lengths = torch.cat([lengths, lengths.new_tensor([extra])])
    params: PackedSeqParams = packed_seq_params(sequence_lengths)
    hidden = encoder(hidden_states=packed[:, None, :], attention_mask=None, packed_seq_params=params)
    return hidden[:tokens, 0]


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
        # The patch embedding (one convolution) still runs over the padded images: per patch it is
        # ~0.2% of the 8B encoder's FLOPs (2 x 588 x 1152 against 27 layers at 1152 wide), and the
        # transformer after it sees the real patches only.
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        embeddings = patches.flatten(2).transpose(1, 2)  # [images, max patches, hidden]
        position_ids = bucketized_position_ids(patch_mask, self.vision.patches_per_side)
        real = patch_mask.flatten(1)
        # Row-major within each image, images in order: the packed THD sequence.
        packed = embeddings[real] + self.position_embedding(position_ids[real])
        return packed, lengths

    def forward(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [images, C, H, W], pixel_attention_mask [images, H, W] ->
        (features [tokens, hidden] of the real patches, image after image; patches per image [images])."""
        patch_mask = patch_attention_mask(pixel_attention_mask.bool(), self.vision.patch_size)
        packed, lengths = self.embed(pixel_values, patch_mask)
        return run_packed(self.encoder, packed, lengths, self.token_multiple), lengths

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        """The encoder always starts from pixels on its own stage."""


def resize_position_table(table: torch.Tensor, grid: int) -> torch.Tensor:
    """[old_grid^2, D] learned positions -> [grid^2, D], bicubic over the 2-D grid."""
    old = int(round(table.shape[0] ** 0.5))
    if old * old != table.shape[0]:
        raise ValueError(f"position table of {table.shape[0]} rows is not a square grid")
    if old == grid:
        return table
    image = table.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(table.dtype)


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


class SiglipRecipe:
    """SigLIP (transformers' SiglipVisionModel / Idefics2VisionTransformer): LayerNorm, biased
    linears, gelu-tanh MLP, learned positions bucketized at native resolution."""

    part, kind = "vision", "siglip"
    hidden_act = "gelu_pytorch_tanh"
    # transformers' configs read: SigLIP's own, and Idefics2's and Idefics3's vision configs (the same encoder).
    hf_model_types = ("siglip", "siglip_vision_model", "idefics2_vision", "idefics2", "idefics3_vision")
    # Images at native aspect ratio and any size up to image_size (position buckets).
    fixed_resolution = False
    # Pixel normalization it was trained with (transformers' SiglipImageProcessor, Idefics2's processor).
    image_mean, image_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def transformer_config(
        self, vision: VisionConfig, parallel: ParallelConfig, precision: PrecisionConfig, initialize: bool = True
    ) -> TransformerConfig:
        """It lives whole on pipeline stage 0; its input (whole images) is never split along the sequence."""
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
            activation_func=self.activation(vision),
            pipeline_model_parallel_size=1,
            **common.transformer_kwargs(
                parallel,
                precision,
                initialize,
                attention_dropout=vision.attention_dropout,
                sequence_parallel=False,
                fp8_problem=self.fp8_problem(vision, parallel.tensor_parallel),
            ),
        )

    def activation(self, vision: VisionConfig) -> Any:
        """The MLP's activation (gelu-tanh); another ``hidden_act`` is refused by name."""
        if vision.hidden_act != self.hidden_act:
            raise ValueError(
                f"vision.hidden_act={vision.hidden_act!r}: the siglip recipe implements {self.hidden_act!r}"
            )
        return functools.partial(F.gelu, approximate="tanh")

    def layer_spec(self, config: TransformerConfig, use_te: bool) -> ModuleSpec:
        """Non-causal attention within each image; images arrive as packed sequences (THD, one per
        image), so there is no mask to interpret. TE attends within ``cu_seqlens`` (Megatron turns
        ``no_mask`` into TE's ``padding`` type for THD); the local spec uses
        ``PackedSequenceAttention``, since Megatron's local core attention refuses packed input."""
        spec = common.te_layer_spec() if use_te else common.local_layer_spec(config)
        if not use_te:
            spec.submodules.self_attention.submodules.core_attention = PackedSequenceAttention
        spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.no_mask}
        return spec

    def build(
        self,
        vision: VisionConfig,
        parallel: ParallelConfig,
        precision: PrecisionConfig,
        initialize: bool,
        use_te: bool,
    ) -> SiglipVisionEncoder:
        config = self.transformer_config(vision, parallel, precision, initialize)
        return SiglipVisionEncoder(
            config,
            vision,
            self.layer_spec(config, use_te),
            # TE's FP8 GEMMs need the packed token count aligned (common.te_fp8_gemm_problem).
            token_multiple=common.FP8_TOKEN_MULTIPLE if config.fp8 else 1,
        )

    def tokens_per_image(self, vision: VisionConfig) -> int:
        """Patches of an image that arrives square at image_size (the count varies otherwise: a
        connector that needs it fixed makes the data resize square, training/preflight.py)."""
        return vision.patches_per_side**2

    def output_tokens(self, vision: VisionConfig, patches: int) -> int:
        """Tokens the encoder returns for an image of ``patches`` real patches."""
        return patches

    def smallest_image(self, vision: VisionConfig) -> int:
        """Side of the smallest image the encoder takes (a stand-in image for batches without any)."""
        return vision.patch_size

    # -- HF configs ------------------------------------------------------------------------

    # config.json model types read -> (transformers config class, its vision sub-config or None).
    hf_configs = {
        "siglip": ("SiglipConfig", "vision_config"),
        "siglip_vision_model": ("SiglipVisionConfig", None),
        None: ("SiglipVisionConfig", None),
        "idefics3_vision": ("Idefics3VisionConfig", None),
    }

    def hf_config(self, config_json: MappingType[str, Any]) -> Any:
        """A ``config.json`` of this encoder (the full model's, or its vision model's) -> transformers'
        vision config of it (its defaults fill what the file leaves out)."""
        import transformers

        model_type = config_json.get("model_type")
        if model_type not in self.hf_configs:
            raise ValueError(f"expected a {self.kind} config, found model_type={model_type!r}")
        class_name, section = self.hf_configs[model_type]
        config = getattr(transformers, class_name).from_dict(copy.deepcopy(dict(config_json)))
        return getattr(config, section) if section else config

    def from_hf(self, v: Any, image_size: int | None = None) -> VisionConfig:
        """transformers' SigLIP / Idefics2 vision config -> VisionConfig (optionally at another image size)."""
        if v.hidden_act != self.hidden_act:
            raise ValueError(
                f"vision_config.hidden_act={v.hidden_act!r} is not supported (expected {self.hidden_act!r})"
            )
        return VisionConfig(
            kind=self.kind,
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_layers=v.num_hidden_layers,
            num_heads=v.num_attention_heads,
            patch_size=v.patch_size,
            image_size=image_size or v.image_size,
            num_channels=v.num_channels,
            layer_norm_eps=v.layer_norm_eps,
            attention_dropout=float(v.attention_dropout),
        )

    def to_hf(self, v: VisionConfig) -> dict[str, Any]:
        return {
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads,
            "num_channels": v.num_channels,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": v.layer_norm_eps,
            "attention_dropout": v.attention_dropout,
        }

    # -- weights ---------------------------------------------------------------------------

    # A standalone SigLIP checkpoint's tensors that Idefics2 does not use (pooling head, text tower).
    standalone_ignored = ("head.", "vision_model.head.", "text_model.", "logit_scale", "logit_bias")

    def standalone_names(self, names: set[str]) -> tuple[dict[str, str], list[str]]:
        """A standalone SigLIP checkpoint's tensor names -> {name relative to the vision model:
        source name}, and the names left out."""
        prefix = "vision_model." if any(n.startswith("vision_model.") for n in names) else ""
        used = {
            n[len(prefix) :]: n for n in names if n.startswith(prefix) and not n.startswith(self.standalone_ignored)
        }
        return used, sorted(n for n in names if n.startswith(self.standalone_ignored))

    def adapt_standalone(self, relative: str, tensor: torch.Tensor, v: VisionConfig) -> torch.Tensor:
        """A standalone tensor as this model needs it: the position table at its image size."""
        if relative == "embeddings.position_embedding.weight":
            return resize_position_table(tensor, v.patches_per_side)
        return tensor

    def rows(self, v: VisionConfig) -> list[Mapping]:
        """Megatron names relative to the encoder module, HF names relative to the vision model."""
        return [
            Mapping("patch_embedding.weight", ("embeddings.patch_embedding.weight",)),
            Mapping("patch_embedding.bias", ("embeddings.patch_embedding.bias",)),
            Mapping("position_embedding.weight", ("embeddings.position_embedding.weight",)),
            *layer_rows(v.num_layers, self.layer_rows(v)),
            *weight_and_bias("encoder.final_layernorm", "post_layernorm"),
        ]

    def layer_rows(self, v: VisionConfig) -> list[Mapping]:
        """One encoder layer's rows (``encoder.layers.*.``): transformers' ViT layer of SigLIP and CLIP
        (layer_norm1, q/k/v/out projections with biases, layer_norm2, fc1, fc2)."""
        qkv = tuple(f"encoder.layers.*.self_attn.{p}_proj" for p in "qkv")
        heads = Attention(v.num_heads, v.num_heads, v.head_dim)
        layer = "encoder.layers.*."
        return [
            *weight_and_bias(f"{layer}input_layernorm", f"{layer}layer_norm1"),
            Mapping(
                f"{layer}self_attention.linear_qkv.weight",
                tuple(f"{n}.weight" for n in qkv),
                Split.COLUMN,
                Fuse.QKV,
                heads,
            ),
            Mapping(
                f"{layer}self_attention.linear_qkv.bias", tuple(f"{n}.bias" for n in qkv), Split.COLUMN, Fuse.QKV, heads
            ),
            *weight_and_bias(f"{layer}self_attention.linear_proj", f"{layer}self_attn.out_proj", Split.ROW),
            *weight_and_bias(f"{layer}pre_mlp_layernorm", f"{layer}layer_norm2"),
            *weight_and_bias(f"{layer}mlp.linear_fc1", f"{layer}mlp.fc1", Split.COLUMN, Split.COLUMN),
            *weight_and_bias(f"{layer}mlp.linear_fc2", f"{layer}mlp.fc2", Split.ROW),
        ]

    # -- shapes and counts -----------------------------------------------------------------

    def gemms(self, v: VisionConfig, tensor_parallel: int) -> dict[str, tuple[int, int]]:
        h = v.hidden_size
        return common.transformer_layer_gemms(h, 3 * h, h, v.intermediate_size, False, tensor_parallel)

    def fp8_problem(self, v: VisionConfig, tensor_parallel: int) -> str | None:
        return common.te_fp8_problem(self.gemms(v, tensor_parallel))

    def forward_flops(self, v: VisionConfig, patches: int) -> float:
        """One image of ``patches`` real patches through the encoder (its own sequence)."""
        embed = 2 * patches * (v.num_channels * v.patch_size**2) * v.hidden_size
        layer = common.transformer_layer_forward_flops(patches, self.gemms(v, 1), patches * patches, v.hidden_size)
        return embed + v.num_layers * layer

    def parameters(self, v: VisionConfig) -> ParameterCount:
        h = v.hidden_size
        embeddings = ParameterCount(replicated=v.num_channels * v.patch_size**2 * h + h + v.patches_per_side**2 * h)
        return embeddings + self.layer_parameters(v) * v.num_layers + ParameterCount(replicated=2 * h)

    def layer_parameters(self, v: VisionConfig) -> ParameterCount:
        """One encoder layer: column-parallel weights and biases split; row-parallel outputs keep a
        whole bias; norms whole."""
        h, inner = v.hidden_size, v.intermediate_size
        return ParameterCount(
            sharded=3 * h * h + 3 * h + h * h + h * inner + inner + inner * h, replicated=2 * h + 4 * h
        )


def weight_and_bias(
    megatron: str, hf: str, split: Split = Split.REPLICATED, bias_split: Split = Split.REPLICATED
) -> list[Mapping]:
    """The rows of a layer with a weight and a bias (norms, linears of a ViT)."""
    return [
        Mapping(f"{megatron}.weight", (f"{hf}.weight",), split),
        Mapping(f"{megatron}.bias", (f"{hf}.bias",), bias_split),
    ]


RECIPE = register("vision", "siglip", SiglipRecipe())
