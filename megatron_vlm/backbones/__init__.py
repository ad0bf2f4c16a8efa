"""Backbone recipes: one file per part kind, registered by ``kind`` (see ``base.py``).

siglip.py      vision: SigLIP at native aspect ratio (packed per-image sequences)
perceiver.py   connector: SwiGLU projection + Perceiver resampler
mistral.py     text: Mistral decoder (GPTModel)
"""

from megatron_vlm.backbones import mistral, perceiver, siglip  # noqa: F401  (they register themselves)
from megatron_vlm.backbones.base import PARTS, ParameterCount, kinds, recipe, recipe_for_hf, register

__all__ = ["PARTS", "ParameterCount", "kinds", "recipe", "recipe_for_hf", "recipes_of", "register"]


def recipes_of(model: object) -> tuple:
    """(vision, connector, text) recipes of a ModelConfig."""
    return (
        recipe("vision", model.vision.kind),
        recipe("connector", model.connector.kind),
        recipe("text", model.text.kind),
    )
