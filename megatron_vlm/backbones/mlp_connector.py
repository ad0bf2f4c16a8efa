"""Modality connector without pooling: Idefics2's SwiGLU modality projection alone, every vision token
becoming one image token in the text (the paper's "no pooling" comparison), and its recipe.

The projection is the perceiver connector's (transformers' ``Idefics2Connector.modality_projection``,
an ``Idefics2MLP``: vision hidden -> text intermediate -> text hidden), with the same Megatron and HF
names, so a perceiver checkpoint's projection loads here. The text holds a fixed number of
``<image>`` tokens per image, so every image must give the same number of vision tokens: the vision
recipe's ``tokens_per_image`` (CLIP: class token + grid^2; SigLIP: grid^2 of an image resized square
to its image_size, which training/preflight.py requires of the data).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.backbones import common
from megatron_vlm.backbones.base import ParameterCount, recipe, register
from megatron_vlm.backbones.mapping import Mapping
from megatron_vlm.backbones.perceiver import projection_flops, projection_parameters, projection_rows, swiglu_mlp
from megatron_vlm.config import ConnectorConfig, ModelConfig, ParallelConfig, PrecisionConfig


class MlpConnector(MegatronModule):
    """packed vision features [T, Hv] + tokens per image [N] -> image tokens [T / N, N, H]."""

    def __init__(self, config: TransformerConfig, vision_hidden_size: int) -> None:
        super().__init__(config=config)
        self.projection = swiglu_mlp(config, vision_hidden_size, config.ffn_hidden_size)

    def forward(self, vision_features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        images = lengths.numel()
        counts = sorted(set(lengths.tolist()))
        if len(counts) > 1:
            raise ValueError(
                f"the mlp connector makes one image token per vision token, so every image needs the same "
                f"count; this batch has {counts} vision tokens per image (resize images square at the vision "
                f"image_size: image.resize: square in the data mixture)"
            )
        tokens = self.projection(vision_features[:, None])[0][:, 0]  # [T, H]
        # Image after image in the packed input -> [tokens per image, images, H], as the resampler's latents.
        return tokens.reshape(images, -1, tokens.shape[-1]).transpose(0, 1)


class MlpConnectorRecipe:
    """The modality projection alone (transformers' Idefics2MLP), no resampler."""

    part, kind = "connector", "mlp"
    hidden_act = "silu"
    # No transformers config describes an Idefics2-style connector without a resampler.
    hf_model_types: tuple[str, ...] = ()
    # Every image must give the same vision token count (training/preflight.py checks the data).
    fixed_tokens_per_image = True

    def transformer_config(
        self, model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, initialize: bool = True
    ) -> TransformerConfig:
        """The projection's SwiGLU at the text widths, no biases, Megatron's own linears (never TE's)."""
        return common.connector_config(
            parallel,
            precision,
            initialize,
            num_layers=1,
            hidden_size=model.text.hidden_size,
            ffn_hidden_size=model.text.intermediate_size,
            add_bias_linear=False,
            gated_linear_unit=True,
            activation_func=F.silu,
        )

    def build(
        self, model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, initialize: bool
    ) -> MlpConnector:
        self.tokens_per_image(model)  # refuses a vision encoder without a fixed count
        return MlpConnector(self.transformer_config(model, parallel, precision, initialize), model.vision.hidden_size)

    def tokens_per_image(self, model: ModelConfig) -> int:
        """Image tokens in the text per image: the vision encoder's tokens of one image."""
        vision = recipe("vision", model.vision.kind)
        count = vision.tokens_per_image(model.vision) if hasattr(vision, "tokens_per_image") else None
        if count is None:
            raise ValueError(
                f"connector kind 'mlp' needs a fixed number of vision tokens per image, and the "
                f"{model.vision.kind!r} vision encoder has none: use the perceiver connector"
            )
        return count

    # -- HF configs ------------------------------------------------------------------------

    def from_hf(self, p: Any) -> ConnectorConfig:
        raise ValueError(
            "no transformers config describes the mlp connector (an Idefics2 projection without resampler)"
        )

    def to_hf(self, model: ModelConfig) -> dict[str, Any]:
        raise ValueError(
            "connector kind 'mlp' has no transformers counterpart: transformers' Idefics2 always has a "
            "perceiver resampler, so this model cannot be written as an HF config"
        )

    # -- weights ---------------------------------------------------------------------------

    def rows(self, model: ModelConfig) -> list[Mapping]:
        """Megatron names relative to the connector module, HF names relative to Idefics2's connector."""
        return projection_rows()

    # -- counts ----------------------------------------------------------------------------

    def forward_flops(self, model: ModelConfig, patches: int) -> float:
        """One image of ``patches`` real patches: the projection of each of its vision tokens."""
        vision = recipe("vision", model.vision.kind)
        tokens = vision.output_tokens(model.vision, patches) if hasattr(vision, "output_tokens") else patches
        return projection_flops(model, tokens)

    def parameters(self, model: ModelConfig) -> ParameterCount:
        return projection_parameters(model)


RECIPE = register("connector", "mlp", MlpConnectorRecipe())
