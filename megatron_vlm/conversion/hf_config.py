"""Our ModelConfig <-> transformers' Idefics2Config (both directions, one place).

Reading goes through transformers' own config classes first, so every key a ``config.json``
leaves out takes transformers' default, exactly as ``from_pretrained`` would (the Hub's
idefics2-8b stores only the sub-config keys that differ from the defaults). What we do not model
is refused by name: after reading, the config is written back (``to_hf_config``) and every
model-affecting field whose value differs from the source's is reported, except the
bookkeeping keys in ``NON_MODEL_KEYS``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from megatron_vlm.config import ConnectorConfig, ModelConfig, TextConfig, VisionConfig

# Keys of transformers' configs that do not change the model's forward pass (what the
# round-trip check ignores): version and naming metadata, the storage dtype (the converter's
# --dtype decides it), generation / output switches, token ids used only by generation and
# tokenizers, heads of other tasks, and initialisation (every weight is loaded).
NON_MODEL_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "architectures",
        "dtype",
        "torch_dtype",
        "use_cache",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "bos_token_id",
        "eos_token_id",
        "id2label",
        "label2id",
        "problem_type",
        "is_encoder_decoder",
        "chunk_size_feed_forward",  # feed-forward chunking: a memory option, the same numbers
        "initializer_range",
    }
)


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
            "attention_dropout": v.attention_dropout,
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
            "attention_dropout": c.attention_dropout,
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
            "sliding_window": t.sliding_window,
            "attention_dropout": t.attention_dropout,
            "pad_token_id": config.pad_token_id,
            "tie_word_embeddings": False,
        },
    }


def to_hf_config(config: ModelConfig) -> Any:
    from transformers import Idefics2Config

    return Idefics2Config(**to_hf_config_dict(config))


# --------------------------------------------------------------------------------------------
# config.json -> transformers' config objects (their defaults fill what the file leaves out)
# --------------------------------------------------------------------------------------------


def idefics2_hf_config(hf: Mapping[str, Any] | Any) -> Any:
    """An Idefics2 ``config.json`` dict (or an Idefics2Config) -> transformers' Idefics2Config."""
    if not isinstance(hf, Mapping):
        return hf
    from transformers import Idefics2Config

    model_type = hf.get("model_type", "idefics2")
    if model_type != "idefics2":
        raise ValueError(f"expected an Idefics2 config (model_type 'idefics2'), found model_type={model_type!r}")
    return Idefics2Config.from_dict(copy.deepcopy(dict(hf)))  # transformers edits the dict it reads


def siglip_vision_hf_config(config: Mapping[str, Any]) -> Any:
    """A SigLIP ``config.json`` (the full SigLIP or its vision model) -> SiglipVisionConfig."""
    from transformers import SiglipConfig, SiglipVisionConfig

    model_type = config.get("model_type")
    if model_type == "siglip":
        return SiglipConfig.from_dict(copy.deepcopy(dict(config))).vision_config
    if model_type in ("siglip_vision_model", None):
        return SiglipVisionConfig.from_dict(copy.deepcopy(dict(config)))
    raise ValueError(f"expected a SigLIP config, found model_type={model_type!r}")


def text_hf_config(config: Mapping[str, Any]) -> Any:
    """A Mistral (or Llama-layout) ``config.json`` -> transformers' config of that model type."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if model_type not in ("mistral", "llama"):
        raise ValueError(f"expected a Mistral text config, found model_type={model_type!r}")
    values = {k: v for k, v in copy.deepcopy(dict(config)).items() if k != "model_type"}
    return AutoConfig.for_model(model_type, **values)


# --------------------------------------------------------------------------------------------
# transformers' config objects -> ours
# --------------------------------------------------------------------------------------------


def _require_act(section: Any, expected: str, name: str) -> None:
    if section.hidden_act != expected:
        raise ValueError(f"{name}.hidden_act={section.hidden_act!r} is not supported (expected {expected!r})")


def _rope_theta(t: Any) -> float:
    """The RoPE base; any RoPE variant other than the default (scaling, partial rotary) is refused."""
    rope = dict(getattr(t, "rope_parameters", None) or {})
    scaling = dict(getattr(t, "rope_scaling", None) or {})  # transformers 4 keeps scaling apart
    for name, params in (("rope_parameters", rope), ("rope_scaling", scaling)):
        kind = params.get("rope_type", params.get("type", "default"))
        extra = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type", "type")}
        if kind != "default" or extra:
            raise ValueError(
                f"text_config.{name}: RoPE type {kind!r} {extra or ''} is not supported "
                "(only the default RoPE, with rope_theta, is implemented)"
            )
    theta = rope.get("rope_theta", getattr(t, "rope_theta", None))
    return float(10000.0 if theta is None else theta)


def vision_config_from_hf(v: Any, image_size: int | None = None) -> VisionConfig:
    """SigLIP / Idefics2 vision config object -> VisionConfig (optionally at another image size)."""
    _require_act(v, "gelu_pytorch_tanh", "vision_config")
    return VisionConfig(
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


def text_config_from_hf(t: Any) -> TextConfig:
    """Mistral config object -> TextConfig."""
    _require_act(t, "silu", "text_config")
    if getattr(t, "tie_word_embeddings", False):
        raise ValueError("text_config.tie_word_embeddings=True is not supported (Idefics2 unties them)")
    heads = t.num_attention_heads
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // heads
    if head_dim * heads != t.hidden_size:
        raise ValueError(
            f"text_config.head_dim={head_dim} x {heads} heads must equal hidden_size={t.hidden_size} "
            "(a decoupled head size is not supported)"
        )
    return TextConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_layers=t.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=t.num_key_value_heads or heads,
        rope_theta=_rope_theta(t),
        rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings,
        sliding_window=getattr(t, "sliding_window", None),
        attention_dropout=float(getattr(t, "attention_dropout", 0.0)),
    )


def from_hf_config(hf: Mapping[str, Any] | Any) -> ModelConfig:
    """Idefics2Config (object or config.json dict) -> ModelConfig. Refuses, naming each field,
    whatever would change the model but is not modelled here."""
    hf = idefics2_hf_config(hf)
    v, p, t = hf.vision_config, hf.perceiver_config, hf.text_config
    _require_act(p, "silu", "perceiver_config")
    if hf.tie_word_embeddings:
        raise ValueError("tie_word_embeddings=True is not supported (Idefics2 unties them)")
    config = ModelConfig(
        vision=vision_config_from_hf(v),
        connector=ConnectorConfig(
            num_latents=p.resampler_n_latents,
            depth=p.resampler_depth,
            num_heads=p.resampler_n_heads,
            num_kv_heads=p.num_key_value_heads,
            head_dim=p.resampler_head_dim,
            rms_norm_eps=p.rms_norm_eps,
            attention_dropout=float(p.attention_dropout),
        ),
        text=text_config_from_hf(t),
        image_token_id=hf.image_token_id,
        pad_token_id=getattr(t, "pad_token_id", 0) or 0,
    )
    written = to_hf_config_dict(config)
    problems = unmodelled_fields(hf, {k: v for k, v in written.items() if not k.endswith("_config")}, "")
    for section in ("vision_config", "perceiver_config", "text_config"):
        problems += unmodelled_fields(getattr(hf, section), written[section], f"{section}.")
    refuse_unmodelled(problems)
    return config


# --------------------------------------------------------------------------------------------
# The round-trip check: every source field we would not write back the same
# --------------------------------------------------------------------------------------------


def unmodelled_fields(source: Any, written: dict[str, Any], prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    """``prefix + key=value`` for each field of the transformers config ``source`` whose value
    differs from what we write back (``written``, read by the same config class, so both sides
    share its defaults). Keys the class does not declare are ignored: transformers' model does
    not read them either."""
    values = {k: v for k, v in written.items() if k != "model_type"}
    if prefix:  # a sub-config: read ours back through the source's own class
        ours = type(source).from_dict(copy.deepcopy(values)).to_dict()
    else:
        ours = values
    problems = []
    for key, value in source.to_dict().items():
        if key in NON_MODEL_KEYS or key in skip or key.endswith("_config") or key not in ours:
            continue
        if ours[key] != value:
            problems.append(f"{prefix}{key}={value!r}")
    return problems


def refuse_unmodelled(problems: list[str]) -> None:
    if problems:
        raise ValueError(
            "the HF config sets fields this model does not implement (converting would silently change "
            "the model): " + ", ".join(problems)
        )
