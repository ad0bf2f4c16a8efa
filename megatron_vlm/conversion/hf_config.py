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

from megatron_vlm.backbones import recipe_for_hf, recipes_of
from megatron_vlm.config import ModelConfig

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
    """Our ModelConfig as transformers' Idefics2Config dict; each part written by its recipe."""
    vision, connector, text = recipes_of(config)
    return {
        "model_type": "idefics2",
        "architectures": ["Idefics2ForConditionalGeneration"],
        "image_token_id": config.image_token_id,
        "tie_word_embeddings": False,
        "vision_config": vision.to_hf(config.vision),
        "perceiver_config": connector.to_hf(config),
        "text_config": text.to_hf(config.text, config.pad_token_id),
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


# --------------------------------------------------------------------------------------------
# transformers' config objects -> ours
# --------------------------------------------------------------------------------------------


def from_hf_config(hf: Mapping[str, Any] | Any) -> ModelConfig:
    """Idefics2Config (object or config.json dict) -> ModelConfig. Refuses, naming each field,
    whatever would change the model but is not modelled here."""
    hf = idefics2_hf_config(hf)
    if hf.tie_word_embeddings:
        raise ValueError("tie_word_embeddings=True is not supported (Idefics2 unties them)")
    # Each part read by the recipe for its sub-config's model type (Idefics2: SigLIP, Perceiver, Mistral).
    vision = recipe_for_hf("vision", hf.vision_config.model_type)
    connector = recipe_for_hf("connector", hf.perceiver_config.model_type)
    text = recipe_for_hf("text", hf.text_config.model_type)
    config = ModelConfig(
        vision=vision.from_hf(hf.vision_config),
        connector=connector.from_hf(hf.perceiver_config),
        text=text.from_hf(hf.text_config),
        image_token_id=hf.image_token_id,
        pad_token_id=getattr(hf.text_config, "pad_token_id", 0) or 0,
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
