"""Llama decoder (transformers' LlamaForCausalLM) as a recipe: Mistral's GPTModel without the
sliding window, with RoPE scaling as Llama configs carry it (``linear``: Llama-2 long-context
fine-tunes; ``llama3``: Llama 3.1+).

Megatron-Core's own Llama-3 scaling hard-codes three of its four parameters, so the rotary
frequencies are computed here from the config (transformers' rules, ``modeling_rope_utils``): the
decoder's attention applies RoPE from them (``inverse_frequencies``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.backbones.base import register
from megatron_vlm.backbones.mistral import MistralRecipe
from megatron_vlm.config import ModelConfig, TextConfig

# The parameters each RoPE type reads (besides rope_type and rope_theta), and which are required.
_ROPE_TYPES = {
    "default": ((), ()),
    "linear": (("factor",), ("factor",)),
    "llama3": (
        ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    ),
}


def rope_scaling_problem(scaling: dict[str, Any] | None) -> str | None:
    """Why a RoPE scaling dict cannot be used (None if it can): an unknown type or key, or a
    missing parameter, named."""
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in _ROPE_TYPES:
        return f"RoPE type {kind!r} is not implemented (implemented: {sorted(_ROPE_TYPES)})"
    allowed, required = _ROPE_TYPES[kind]
    keys = set(scaling) - {"rope_type", "type", "rope_theta"}
    unknown = sorted(keys - set(allowed))
    missing = sorted(set(required) - keys)
    if unknown:
        return f"RoPE type {kind!r}: parameters {unknown} are not implemented"
    if missing:
        return f"RoPE type {kind!r} needs {missing}"
    return None


def scaled_inverse_frequencies(t: TextConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim / 2] (the default ones, ``inv_freq``) scaled as the
    decoder's config says."""
    scaling = dict(t.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        # Long wavelengths (beyond the original context / low) are divided by the factor, short
        # ones (below original context / high) kept, and those between interpolated smoothly.
        scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelength < old_context / high) & ~(wavelength > old_context / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class LlamaRecipe(MistralRecipe):
    part, kind = "text", "llama"
    hf_model_types = ("llama",)
    # Llama's tokenizers are not available offline: runs use Mistral-7B's (same SentencePiece
    # scheme, 32000 tokens); exporters write tokenizer files only when given them.
    tokenizer = "mistral"

    def transformer_config(self, model: ModelConfig, *args: Any, **kwargs: Any) -> TransformerConfig:
        self.check(model.text)
        return super().transformer_config(model, *args, **kwargs)

    def check(self, t: TextConfig) -> None:
        if t.sliding_window is not None:
            raise ValueError(f"text.sliding_window={t.sliding_window}: Llama has no sliding window (use kind mistral)")
        problem = rope_scaling_problem(t.rope_scaling)
        if problem:
            raise ValueError(f"text.rope_scaling: {problem}")

    def inverse_frequencies(self, t: TextConfig) -> torch.Tensor:
        return scaled_inverse_frequencies(t, super().inverse_frequencies(t))

    # -- HF configs ------------------------------------------------------------------------

    def from_hf(self, t: Any) -> TextConfig:
        """transformers' Llama config -> TextConfig, RoPE scaling read. Biases and ``pretraining_tp``
        are written back as False / 1 (``to_hf``), so the round-trip check refuses them by name."""
        theta, scaling = _rope(t)
        config = super().from_hf(_PlainRope(t))
        config.kind = self.kind
        config.sliding_window = None
        config.rope_theta = theta
        config.rope_scaling = scaling
        self.check(config)
        return config

    def to_hf(self, t: TextConfig, pad_token_id: int) -> dict[str, Any]:
        values = super().to_hf(t, pad_token_id)
        del values["sliding_window"]
        values.update(model_type="llama", attention_bias=False, mlp_bias=False, pretraining_tp=1)
        if t.rope_scaling:
            del values["rope_theta"]
            values["rope_parameters"] = {"rope_theta": t.rope_theta, **t.rope_scaling}
        return values


def _rope(t: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from transformers' rope_parameters (v5) or rope_scaling (v4)."""
    params = dict(getattr(t, "rope_parameters", None) or {})
    params.update(dict(getattr(t, "rope_scaling", None) or {}))
    theta = params.pop("rope_theta", getattr(t, "rope_theta", None))
    kind = params.get("rope_type", params.get("type", "default"))
    scaling = None if kind == "default" and set(params) <= {"rope_type", "type"} else params
    if scaling is not None and "type" in scaling:  # transformers 4's spelling
        scaling["rope_type"] = scaling.pop("type")
    problem = rope_scaling_problem(scaling)
    if problem:
        raise ValueError(f"text_config.rope_parameters: {problem}")
    return float(10000.0 if theta is None else theta), scaling


class _PlainRope:
    """A view of a transformers config without its RoPE scaling, for the Mistral reader (which
    refuses any scaling); everything else is the config's own."""

    def __init__(self, config: Any) -> None:
        self._config = config

    def __getattr__(self, name: str) -> Any:
        if name in ("rope_parameters", "rope_scaling"):
            return None
        return getattr(self._config, name)


RECIPE = register("text", "llama", LlamaRecipe())
