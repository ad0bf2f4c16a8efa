"""Our ModelConfig <-> transformers' Idefics2Config (both directions, one place)."""

from __future__ import annotations

from typing import Any

from megatron_vlm.config import ConnectorConfig, ModelConfig, TextConfig, VisionConfig


def to_hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    v, c, t = config.vision, config.connector, config.text
    return {
        "model_type": "idefics2",
        "architectures": ["Idefics2ForConditionalGeneration"],
        "image_token_id": config.image_token_id,
        "tie_word_embeddings": False,
        "vision_config": {
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads,
            "num_channels": v.num_channels,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": v.layer_norm_eps,
        },
        "perceiver_config": {
            "hidden_act": "silu",
            "hidden_size": t.hidden_size,
            "rms_norm_eps": c.rms_norm_eps,
            "resampler_n_latents": c.num_latents,
            "resampler_depth": c.depth,
            "resampler_n_heads": c.num_heads,
            "resampler_head_dim": c.head_dim,
            "num_key_value_heads": c.num_kv_heads,
        },
        "text_config": {
            "model_type": "mistral",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "head_dim": t.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "max_position_embeddings": t.max_position_embeddings,
            "sliding_window": None,  # Idefics2 trains on sequences shorter than Mistral's window
            "pad_token_id": config.pad_token_id,
            "tie_word_embeddings": False,
        },
    }


def to_hf_config(config: ModelConfig) -> Any:
    from transformers import Idefics2Config

    return Idefics2Config(**to_hf_config_dict(config))


def _get(section: Any, key: str, default: Any = None) -> Any:
    if isinstance(section, dict):
        return section.get(key, default)
    return getattr(section, key, default)


def _require_act(section: Any, expected: str) -> None:
    if _get(section, "hidden_act", expected) != expected:
        raise ValueError(f"unsupported hidden_act={_get(section, 'hidden_act')!r} (expected {expected!r})")


def vision_config_from_hf(v: Any, image_size: int | None = None) -> VisionConfig:
    """SigLIP / Idefics2 vision config -> VisionConfig (optionally at another image size)."""
    _require_act(v, "gelu_pytorch_tanh")
    return VisionConfig(
        hidden_size=_get(v, "hidden_size"),
        intermediate_size=_get(v, "intermediate_size"),
        num_layers=_get(v, "num_hidden_layers"),
        num_heads=_get(v, "num_attention_heads"),
        patch_size=_get(v, "patch_size"),
        image_size=image_size or _get(v, "image_size"),
        num_channels=_get(v, "num_channels", 3),
        layer_norm_eps=_get(v, "layer_norm_eps", 1e-6),
    )


def text_config_from_hf(t: Any) -> TextConfig:
    """Mistral config -> TextConfig."""
    _require_act(t, "silu")
    if _get(t, "tie_word_embeddings", False):
        raise ValueError("tied word embeddings are not supported (Idefics2 unties them)")
    heads = _get(t, "num_attention_heads")
    head_dim = _get(t, "head_dim") or _get(t, "hidden_size") // heads
    if head_dim * heads != _get(t, "hidden_size"):
        raise ValueError("text head_dim * heads must equal hidden_size")
    rope_theta = _get(t, "rope_theta")
    if rope_theta is None:  # transformers 5 keeps it in rope_parameters
        rope_theta = (_get(t, "rope_parameters") or {}).get("rope_theta", 10000.0)
    return TextConfig(
        vocab_size=_get(t, "vocab_size"),
        hidden_size=_get(t, "hidden_size"),
        intermediate_size=_get(t, "intermediate_size"),
        num_layers=_get(t, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=_get(t, "num_key_value_heads") or heads,
        rope_theta=float(rope_theta),
        rms_norm_eps=_get(t, "rms_norm_eps"),
        max_position_embeddings=_get(t, "max_position_embeddings"),
    )


def from_hf_config(hf: Any) -> ModelConfig:
    """Idefics2Config (object or config.json dict) -> ModelConfig. Refuses what we do not model."""
    v, p, t = _get(hf, "vision_config"), _get(hf, "perceiver_config"), _get(hf, "text_config")
    _require_act(p, "silu")
    if _get(hf, "tie_word_embeddings", False):
        raise ValueError("tied word embeddings are not supported (Idefics2 unties them)")
    return ModelConfig(
        vision=vision_config_from_hf(v),
        connector=ConnectorConfig(
            num_latents=_get(p, "resampler_n_latents"),
            depth=_get(p, "resampler_depth"),
            num_heads=_get(p, "resampler_n_heads"),
            num_kv_heads=_get(p, "num_key_value_heads"),
            head_dim=_get(p, "resampler_head_dim"),
            rms_norm_eps=_get(p, "rms_norm_eps"),
        ),
        text=text_config_from_hf(t),
        image_token_id=_get(hf, "image_token_id", 32001),
        pad_token_id=_get(t, "pad_token_id", 0) or 0,
    )
