"""Backbone recipes: one file per part kind, registered by ``kind`` (see ``base.py``).

    siglip.py      vision: SigLIP at native aspect ratio (packed per-image sequences)
    perceiver.py   connector: SwiGLU projection + Perceiver resampler
    mistral.py     text: Mistral decoder (GPTModel)

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

__all__ = ["PARTS", "ParameterCount", "kinds", "recipe", "recipe_for_hf", "recipes_of", "register"]


def recipes_of(model: object) -> tuple:
    """(vision, connector, text) recipes of a ModelConfig."""
    return (
        recipe("vision", model.vision.kind),
        recipe("connector", model.connector.kind),
        recipe("text", model.text.kind),
    )
