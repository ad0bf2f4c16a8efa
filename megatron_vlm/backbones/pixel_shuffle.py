"""Modality connector by pixel shuffle (Idefics3), and its recipe (config, HF config and weight names,
FLOPs, parameters).

Semantics follow transformers' Idefics3Connector: each image's full ``grid x grid`` patch features
are regrouped so that every ``s x s`` block of neighbouring patches becomes one token of ``s^2`` x
the vision width (``pixel_shuffle``, ``s = scale_factor``), then one linear without bias
(``modality_projection.proj``) maps it to the text width. An image gives ``(grid / s)^2`` tokens.

transformers reads the grid side as ``sqrt(patches)`` of the padded batch, so its connector is only
meaningful on images that fill the encoder's whole ``image_size x image_size`` input (its processor
resizes or splits every image into such squares). Here each image must arrive that way: any other
patch count is refused, naming the data option that makes it so (``image.resize: square``).

Tensor parallelism splits the projection's output features (column-parallel, gathered), so every
rank ends with the whole image tokens, as the perceiver's row-parallel output does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.backbones import common
from megatron_vlm.backbones.base import ParameterCount, recipe, register
from megatron_vlm.backbones.mapping import Mapping, Split
from megatron_vlm.config import ConnectorConfig, ModelConfig, ParallelConfig, PrecisionConfig


def pixel_shuffle(features: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """[images, grid^2, D] (row-major patches) -> [images, (grid/s)^2, D s^2], as transformers'
    ``Idefics3Connector.pixel_shuffle``: the same views and permutations, so the s^2 neighbours of a
    block land in the same order within the new token's features."""
    images, patches, width = features.shape
    side = int(round(patches**0.5))
    s = scale_factor
    x = features.reshape(images, side, side // s, width * s)  # s neighbours along a row, side by side
    x = x.permute(0, 2, 1, 3).reshape(images, side // s, side // s, width * s * s)  # then s rows
    return x.permute(0, 2, 1, 3).reshape(images, patches // (s * s), width * s * s)


class PixelShuffleConnector(MegatronModule):
    """packed vision features [T, Hv] + patches per image [N] -> image tokens [(grid/s)^2, N, H]."""

    def __init__(self, config: TransformerConfig, scale_factor: int, grid: int, vision_hidden_size: int) -> None:
        super().__init__(config=config)
        self.scale_factor = scale_factor
        self.grid = grid
        self.projection = tensor_parallel.ColumnParallelLinear(
            vision_hidden_size * scale_factor**2,
            config.hidden_size,
            config=config,
            init_method=config.init_method,
            bias=False,
            gather_output=True,  # the decoder's embeddings are whole on every tensor-parallel rank
        )

    def forward(self, vision_features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        full = self.grid * self.grid
        wrong = sorted({int(n) for n in lengths.tolist() if int(n) != full})
        if wrong:
            raise ValueError(
                f"the pixel_shuffle connector needs every image to fill the vision encoder's whole "
                f"{self.grid}x{self.grid} patch grid ({full} patches: an image resized square at the vision "
                f"image_size); this batch has images of {wrong} patches (set image.resize: square in the data "
                f"mixture, with longest_edge the vision image_size)"
            )
        images = lengths.numel()
        shuffled = pixel_shuffle(vision_features.reshape(images, full, -1), self.scale_factor)
        tokens, _ = self.projection(shuffled.transpose(0, 1))  # [tokens per image, images, H]
        return tokens


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


class PixelShuffleRecipe:
    """Idefics3's connector (transformers' Idefics3Connector): pixel shuffle by ``scale_factor``,
    then one linear (no bias) from ``s^2`` x the vision width to the text width."""

    part, kind = "connector", "pixel_shuffle"
    # transformers keeps scale_factor on the top-level Idefics3Config (there is no connector config).
    hf_model_types = ("idefics3",)
    # Every image must give the same, full patch grid (training/preflight.py checks the data).
    fixed_tokens_per_image = True

    def transformer_config(
        self, model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, initialize: bool = True
    ) -> TransformerConfig:
        """The projection at the text width, Megatron's own linear (never TE's): no FP8 through TE."""
        return common.connector_config(
            parallel,
            precision,
            initialize,
            num_layers=1,
            hidden_size=model.text.hidden_size,
            add_bias_linear=False,
            activation_func=F.silu,
        )

    def build(
        self, model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, initialize: bool
    ) -> PixelShuffleConnector:
        self.tokens_per_image(model)  # refuses a grid the scale factor does not divide
        if model.text.hidden_size % parallel.tensor_parallel:
            raise ValueError(
                f"text hidden_size {model.text.hidden_size} must be divisible by tensor parallel size "
                f"{parallel.tensor_parallel} (the pixel_shuffle projection splits its outputs)"
            )
        return PixelShuffleConnector(
            self.transformer_config(model, parallel, precision, initialize),
            model.connector.scale_factor,
            self.grid(model),
            model.vision.hidden_size,
        )

    def grid(self, model: ModelConfig) -> int:
        """Patches per side of an image at the vision image_size."""
        return model.vision.image_size // model.vision.patch_size

    def tokens_per_image(self, model: ModelConfig) -> int:
        """Image tokens in the text per image: (grid / s)^2 (Idefics3-8B: 364 px / 14 = 26, s=2: 169)."""
        s, grid = model.connector.scale_factor, self.grid(model)
        if s < 1:
            raise ValueError(f"connector.scale_factor={s} must be a positive integer")
        if grid % s:
            raise ValueError(
                f"connector.scale_factor={s} does not divide the vision patch grid of {grid} "
                f"(image_size {model.vision.image_size} // patch_size {model.vision.patch_size})"
            )
        vision = recipe("vision", model.vision.kind)
        count = vision.tokens_per_image(model.vision) if hasattr(vision, "tokens_per_image") else None
        if count != grid * grid:
            raise ValueError(
                f"connector kind 'pixel_shuffle' needs the vision encoder to return one token per patch of a "
                f"{grid}x{grid} grid; the {model.vision.kind!r} encoder returns {count} tokens per image"
            )
        return (grid // s) ** 2

    def smallest_image(self, model: ModelConfig) -> int:
        """Side of the smallest image this connector takes, a full grid (the model's stand-in image for
        batches without any must be at least this big)."""
        return model.vision.image_size

    # -- HF configs ------------------------------------------------------------------------

    def from_hf(self, hf: Any) -> ConnectorConfig:
        """transformers' Idefics3Config (its top-level scale_factor) -> ConnectorConfig."""
        scale = hf.scale_factor
        if not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale_factor={scale!r} must be a positive integer")
        return ConnectorConfig(kind=self.kind, scale_factor=scale)

    def to_hf(self, model: ModelConfig) -> dict[str, Any]:
        """The top-level Idefics3Config keys this connector sets."""
        return {"scale_factor": model.connector.scale_factor}

    # -- weights ---------------------------------------------------------------------------

    def rows(self, model: ModelConfig) -> list[Mapping]:
        """Megatron names relative to the connector module, HF names relative to Idefics3's connector."""
        return [Mapping("projection.weight", ("modality_projection.proj.weight",), Split.COLUMN)]

    # -- counts ----------------------------------------------------------------------------

    def forward_flops(self, model: ModelConfig, patches: int) -> float:
        """One image of ``patches`` patches: patches / s^2 tokens through a [H, Hv s^2] linear."""
        return 2 * patches * model.vision.hidden_size * model.text.hidden_size

    def activation_bytes(
        self, model: ModelConfig, images: int, patches: int, element_bytes: float, tensor_parallel: int
    ) -> float:
        """What one micro-batch leaves for the backward (perf/memory_model.py): the shuffled features
        (a copy: the projection's saved input) and the gathered image tokens, whole on every TP rank."""
        tokens = images * patches // model.connector.scale_factor**2
        return (
            images * patches * model.vision.hidden_size * element_bytes
            + tokens * model.text.hidden_size * element_bytes
        )

    def parameters(self, model: ModelConfig) -> ParameterCount:
        s = model.connector.scale_factor
        return ParameterCount(sharded=model.vision.hidden_size * s * s * model.text.hidden_size)


RECIPE = register("connector", "pixel_shuffle", PixelShuffleRecipe())
