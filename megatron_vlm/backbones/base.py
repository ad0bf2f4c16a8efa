"""What a backbone recipe provides, and the registry that maps a part config's ``kind`` to its recipe.

A recipe is one file per part kind (``siglip.py``, ``perceiver.py``, ``mistral.py``) owning all that
knows that part by name: its TransformerConfig and layer spec, its module, its HF config in and out
(through transformers' own config classes), its rows of the HF <-> Megatron table, and its GEMM
shapes, FLOP and parameter counts. The composed model, the converters, the planner and the memory
model ask the recipe. Adding a backbone = one recipe file (registered with ``register``) + a preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PARTS = ("vision", "connector", "text")
_RECIPES: dict[tuple[str, str], Any] = {}


def register(part: str, kind: str, recipe: Any) -> Any:
    if part not in PARTS:
        raise ValueError(f"unknown model part {part!r}; parts are {PARTS}")
    _RECIPES[part, kind] = recipe
    return recipe


def recipe(part: str, kind: str) -> Any:
    """The recipe of ``kind`` for ``part``; a kind nobody registered is refused by name."""
    try:
        return _RECIPES[part, kind]
    except KeyError:
        known = sorted(k for p, k in _RECIPES if p == part)
        raise ValueError(f"unknown {part} kind {kind!r}; registered: {known}") from None


def kinds(part: str) -> list[str]:
    return sorted(k for p, k in _RECIPES if p == part)


def recipe_for_hf(part: str, model_type: str) -> Any:
    """The recipe that reads transformers configs of ``model_type`` (its ``hf_model_types``)."""
    for (p, _), candidate in sorted(_RECIPES.items()):
        if p == part and model_type in candidate.hf_model_types:
            return candidate
    known = sorted(t for (p, _), r in _RECIPES.items() if p == part for t in r.hf_model_types)
    raise ValueError(f"no {part} recipe reads HF model_type {model_type!r}; supported: {known}")


@dataclass(frozen=True)
class ParameterCount:
    """Parameters split over tensor-parallel ranks, and those every rank holds whole."""

    sharded: int = 0
    replicated: int = 0

    def per_rank(self, tp: int) -> int:
        return self.sharded // tp + self.replicated

    def __add__(self, other: ParameterCount) -> ParameterCount:
        return ParameterCount(self.sharded + other.sharded, self.replicated + other.replicated)

    def __mul__(self, times: int) -> ParameterCount:
        return ParameterCount(self.sharded * times, self.replicated * times)
