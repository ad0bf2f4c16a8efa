"""Backbone recipes: one file per part kind, registered by ``kind`` (see ``base.py``).

    siglip.py             vision: SigLIP at native aspect ratio (packed per-image sequences)
    clip.py               vision: CLIP ViT at its native square resolution (class token, pre-layernorm)
    perceiver.py          connector: SwiGLU projection + Perceiver resampler (Idefics2)
    mlp_connector.py      connector: the SwiGLU projection alone, no pooling (a token per vision token)
    pixel_shuffle.py      connector: pixel shuffle + linear projection (Idefics3)
    idefics_perceiver.py  connector: Idefics1's perceiver resampler (at the vision width); kind none: no pooling
    mistral.py            text: Mistral decoder (GPTModel)
    llama.py              text: Llama decoder (RoPE scaling: linear, llama3)

Every module of this package that registers a recipe is imported here, so adding a backbone is
adding its file (and a preset naming its ``kind``).
"""

import importlib
import pkgutil

from megatron_vlm.backbones.base import PARTS, ParameterCount, kinds, recipe, recipe_for_hf, register

_SHARED = {"attention", "base", "common", "mapping"}  # machinery, not recipes
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "PARTS",
    "ParameterCount",
    "kinds",
    "recipe",
    "recipe_for_hf",
    "recipes_of",
    "register",
    "text_tokens_per_image",
]


def recipes_of(model: object) -> tuple:
    """(vision, connector, text) recipes of a ModelConfig."""
    return (
        recipe("vision", model.vision.kind),
        recipe("connector", model.connector.kind),
        recipe("text", model.text.kind),
    )


def text_tokens_per_image(model: object) -> int:
    """``<image>`` tokens in the text per image: one per image with cross-attention (Idefics1: the
    decoder attends to the image's tokens in its cross-attention blocks, the text only marks where
    the image stands), the connector's image tokens otherwise (they replace the placeholders)."""
    if model.architecture == "cross_attention":
        return 1
    return recipe("connector", model.connector.kind).tokens_per_image(model)
