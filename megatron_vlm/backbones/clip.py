"""CLIP ViT vision encoder at its native square resolution, on Megatron-Core's TransformerBlock, and
its recipe (config, layer spec, HF config and weight names, GEMM shapes, FLOPs, parameters).

transformers' CLIPVisionModel: a class token before the patches, learned absolute positions over the
``1 + (image_size / patch_size)^2`` slots, a LayerNorm before the encoder (``pre_layrnorm``), pre-norm
layers with biased linears and quick-GELU. The paper's CLIP baseline sees every image squashed to
that square (``image.resize: square`` in the data mixture), so images arrive whole at exactly
``image_size`` x ``image_size``; anything else is refused, naming the size found. Its output is
CLIPVisionModel's ``last_hidden_state``: every token, class token first, per image.

Each image is one packed sequence (THD, ``cu_seqlens``), as SigLIP's, so both encoders share the
layer spec, the attention backends and the FP8 token padding; here every sequence has the same length.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from megatron_vlm.backbones import common
from megatron_vlm.backbones.base import ParameterCount, register
from megatron_vlm.backbones.mapping import Mapping, layer_rows
from megatron_vlm.backbones.siglip import SiglipRecipe, resize_position_table, run_packed, weight_and_bias
from megatron_vlm.config import ParallelConfig, PrecisionConfig, VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """transformers' QuickGELUActivation (CLIP's ``hidden_act="quick_gelu"``)."""
    return x * torch.sigmoid(1.702 * x)


# VisionConfig.hidden_act -> the function, for the activations transformers' CLIP configs use.
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


def activation(hidden_act: str) -> Any:
    if hidden_act not in ACTIVATIONS:
        raise ValueError(
            f"vision hidden_act={hidden_act!r} is not implemented for CLIP; use one of {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[hidden_act]


class ClipVisionEncoder(MegatronModule):
    """Patch embedding + class token + absolute positions + pre-layernorm + TransformerBlock, on
    whole square images; same interface as ``SiglipVisionEncoder``.

    ``token_multiple``: the packed token count is padded up to a multiple of it with a separate
    sequence of zeros (dropped at the end), for GEMMs that need aligned row counts (FP8).
    """

    def __init__(
        self, config: TransformerConfig, vision: VisionConfig, layer_spec: ModuleSpec, token_multiple: int = 1
    ) -> None:
        super().__init__(config=config)
        self.vision = vision
        self.token_multiple = token_multiple
        hidden, dtype = vision.hidden_size, config.params_dtype
        # Embeddings and the norms around the encoder are replicated across tensor-parallel ranks.
        self.class_embedding = nn.Parameter(torch.zeros(hidden, dtype=dtype))
        self.patch_embedding = nn.Conv2d(
            vision.num_channels,
            hidden,
            kernel_size=vision.patch_size,
            stride=vision.patch_size,
            bias=False,
            dtype=dtype,
        )
        self.position_embedding = nn.Embedding(vision.patches_per_side**2 + 1, hidden, dtype=dtype)
        self.pre_layernorm = nn.LayerNorm(hidden, eps=vision.layer_norm_eps, dtype=dtype)
        if config.perform_initialization:
            config.init_method(self.class_embedding)
            config.init_method(self.patch_embedding.weight)
            config.init_method(self.position_embedding.weight)
        # No final norm in the block: CLIPVisionModel's last_hidden_state is the last layer's output.
        self.encoder = TransformerBlock(config, layer_spec, pre_process=True, post_process=True, post_layer_norm=False)
        # CLIP's post_layernorm normalises only the pooled class token (pooler_output), which
        # Idefics-style models do not use: it is kept, never applied, so a converted CLIP checkpoint
        # keeps its tensors and exports back whole.
        self.post_layernorm = nn.LayerNorm(hidden, eps=vision.layer_norm_eps, dtype=dtype)

    @property
    def tokens_per_image(self) -> int:
        return self.vision.patches_per_side**2 + 1

    def check_images(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> None:
        """Every image whole (no padded pixel) at exactly image_size x image_size, else refused."""
        size = self.vision.image_size
        fix = f"resize images to it in the data mixture: image.resize: square, image.longest_edge: {size}"
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.vision.num_channels:
            raise ValueError(
                f"CLIP takes pixel_values [images, {self.vision.num_channels}, {size}, {size}]; "
                f"got {tuple(pixel_values.shape)}"
            )
        height, width = pixel_values.shape[-2:]
        if (height, width) != (size, size):
            raise ValueError(f"CLIP takes images at exactly {size}x{size} pixels; the batch is {height}x{width}: {fix}")
        mask = pixel_attention_mask.bool()
        padded = (~mask.flatten(1).all(dim=1)).nonzero().flatten().tolist()
        if padded:
            first = mask[padded[0]]
            real = f"{int(first.any(dim=1).sum())}x{int(first.any(dim=0).sum())}"
            raise ValueError(
                f"CLIP takes images at exactly {size}x{size} pixels; images {padded} are padded "
                f"(image {padded[0]} is {real} real pixels, height x width): {fix}"
            )

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, C, S, S] -> [images, 1 + grid^2, hidden]: class token, patches row-major,
        plus positions, pre-layernormed (CLIPVisionEmbeddings, then pre_layrnorm)."""
        images = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # [images, grid^2, hidden]
        cls = self.class_embedding.to(patches.dtype).expand(images, 1, -1)
        embeddings = torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]
        return self.pre_layernorm(embeddings)

    def forward(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [images, C, S, S], pixel_attention_mask [images, S, S] (all True) ->
        (features [images x (1 + grid^2), hidden], image after image; tokens per image [images])."""
        self.check_images(pixel_values, pixel_attention_mask)
        embeddings = self.embed(pixel_values)
        images, per_image, hidden = embeddings.shape
        packed = embeddings.reshape(images * per_image, hidden)
        lengths = torch.full((images,), per_image, dtype=torch.long, device=packed.device)
        return run_packed(self.encoder, packed, lengths, self.token_multiple), lengths

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        """The encoder always starts from pixels on its own stage."""


def resize_clip_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """[1 + old_grid^2, D] -> [1 + grid^2, D]: the class slot kept, the patch grid bicubic-resized
    (as transformers' ``interpolate_pos_encoding``)."""
    return torch.cat([table[:1], resize_position_table(table[1:], grid)])


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


class ClipRecipe(SiglipRecipe):
    """CLIP ViT (transformers' CLIPVisionModel): class token, absolute positions at a fixed square
    resolution, pre-layernorm, LayerNorm pre-norm layers with biased linears, quick-GELU (or GELU).
    Its encoder layers are SigLIP's (the same transformers ViT layer): their config, layer spec, rows,
    GEMMs and counts are inherited."""

    part, kind = "vision", "clip"
    # transformers' configs read: CLIP's vision model, the full CLIP (its vision_config), and
    # Idefics1's CLIP-style tower (IdeficsVisionConfig, read through its families' config).
    hf_model_types = ("clip_vision_model", "clip", "idefics_vision")
    # Every image is squashed to image_size x image_size (training/preflight.py checks the data).
    fixed_resolution = True
    # Pixel normalization CLIP was trained with (transformers' OPENAI_CLIP_MEAN / _STD; Idefics1's
    # processor uses the same).
    image_mean = (0.48145466, 0.4578275, 0.40821073)
    image_std = (0.26862954, 0.26130258, 0.27577711)

    def activation(self, vision: VisionConfig) -> Any:
        return activation(vision.hidden_act)

    def build(
        self,
        vision: VisionConfig,
        parallel: ParallelConfig,
        precision: PrecisionConfig,
        initialize: bool,
        use_te: bool,
    ) -> ClipVisionEncoder:
        if vision.image_size % vision.patch_size:
            raise ValueError(
                f"CLIP image_size {vision.image_size} is not a multiple of its patch_size {vision.patch_size}"
            )
        config = self.transformer_config(vision, parallel, precision, initialize)
        return ClipVisionEncoder(
            config,
            vision,
            self.layer_spec(config, use_te),
            token_multiple=common.FP8_TOKEN_MULTIPLE if config.fp8 else 1,
        )

    def tokens_per_image(self, vision: VisionConfig) -> int:
        """The class token and every patch of the image_size square."""
        return vision.patches_per_side**2 + 1

    def output_tokens(self, vision: VisionConfig, patches: int) -> int:
        """Tokens the encoder returns for an image of ``patches`` patches."""
        return patches + 1

    def smallest_image(self, vision: VisionConfig) -> int:
        """Side of the smallest image the encoder takes (a stand-in image for batches without any)."""
        return vision.image_size

    # -- HF configs ------------------------------------------------------------------------

    hf_configs = {
        "clip": ("CLIPConfig", "vision_config"),
        "clip_vision_model": ("CLIPVisionConfig", None),
        None: ("CLIPVisionConfig", None),
    }

    def from_hf(self, v: Any, image_size: int | None = None) -> VisionConfig:
        """transformers' CLIPVisionConfig -> VisionConfig (optionally at another image size: the
        position table is then resized by ``adapt_standalone``)."""
        activation(v.hidden_act)  # refused by name when not implemented
        for name in ("image_size", "patch_size"):
            if not isinstance(getattr(v, name), int):
                raise ValueError(f"vision_config.{name}={getattr(v, name)!r}: only a square (one int) is supported")
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
            hidden_act=v.hidden_act,
        )

    def to_hf(self, v: VisionConfig) -> dict[str, Any]:
        activation(v.hidden_act)
        return {
            "model_type": "clip_vision_model",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads,
            "num_channels": v.num_channels,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_act": v.hidden_act,
            "layer_norm_eps": v.layer_norm_eps,
            "attention_dropout": v.attention_dropout,
        }

    # -- weights ---------------------------------------------------------------------------

    # A standalone CLIP checkpoint's tensors that the vision tower does not use: the text tower and
    # the contrastive heads (CLIPModel, CLIPVisionModelWithProjection).
    standalone_ignored = ("text_model.", "logit_scale", "visual_projection.", "text_projection.")

    def adapt_standalone(self, relative: str, tensor: torch.Tensor, v: VisionConfig) -> torch.Tensor:
        """A standalone tensor as this model needs it: the position table at its image size."""
        if relative == "embeddings.position_embedding.weight":
            return resize_clip_positions(tensor, v.patches_per_side)
        return tensor

    def rows(self, v: VisionConfig) -> list[Mapping]:
        """Megatron names relative to the encoder module, HF names relative to the vision model."""
        return [
            Mapping("class_embedding", ("embeddings.class_embedding",)),
            Mapping("patch_embedding.weight", ("embeddings.patch_embedding.weight",)),
            Mapping("position_embedding.weight", ("embeddings.position_embedding.weight",)),
            *weight_and_bias("pre_layernorm", "pre_layrnorm"),  # transformers' spelling
            *layer_rows(v.num_layers, self.layer_rows(v)),
            *weight_and_bias("post_layernorm", "post_layernorm"),
        ]

    # -- shapes and counts -----------------------------------------------------------------

    def forward_flops(self, v: VisionConfig, patches: int) -> float:
        """One image of ``patches`` patches (and its class token) through the encoder."""
        tokens = self.output_tokens(v, patches)
        embed = 2 * patches * (v.num_channels * v.patch_size**2) * v.hidden_size
        layer = common.transformer_layer_forward_flops(tokens, self.gemms(v, 1), tokens * tokens, v.hidden_size)
        return embed + v.num_layers * layer

    def parameters(self, v: VisionConfig) -> ParameterCount:
        h = v.hidden_size
        positions = (v.patches_per_side**2 + 1) * h
        # Patch embedding (no bias), class token, positions, pre-layernorm; then the layers; post-layernorm.
        embeddings = ParameterCount(replicated=v.num_channels * v.patch_size**2 * h + h + positions + 2 * h)
        return embeddings + self.layer_parameters(v) * v.num_layers + ParameterCount(replicated=2 * h)


RECIPE = register("vision", "clip", ClipRecipe())
