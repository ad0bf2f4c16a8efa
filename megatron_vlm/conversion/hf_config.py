"""Our ModelConfig <-> transformers' model configs, for every family the converters handle.

The family is chosen by ``ModelConfig.family`` when writing and by the ``config.json``'s
``model_type`` when reading (``conversion/families``). Reading goes through transformers' own config
classes first, so every key a ``config.json`` leaves out takes transformers' default, exactly as
``from_pretrained`` would (the Hub's idefics2-8b stores only the sub-config keys that differ from the
defaults). What we do not model is refused by name: after reading, the config is written back and
every model-affecting field whose value differs from the source's is reported, except the
bookkeeping keys in ``NON_MODEL_KEYS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megatron_vlm.config import ModelConfig
from megatron_vlm.conversion.families import family_for_hf, family_of
from megatron_vlm.conversion.families.base import (  # noqa: F401  (re-exported for the converters)
    NON_MODEL_KEYS,
    refuse_unmodelled,
    unmodelled_fields,
)


def to_hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """Our ModelConfig as its family's transformers config dict (a ``config.json``)."""
    return family_of(config).to_hf_config_dict(config)


def to_hf_config(config: ModelConfig) -> Any:
    """Our ModelConfig as its family's transformers config object."""
    return family_of(config).to_hf_config(config)


def from_hf_config(hf: Mapping[str, Any] | Any) -> ModelConfig:
    """A ``config.json`` dict (or a transformers config object) of a supported family -> ModelConfig.
    Refuses, naming it, a model type we do not convert, and each field that would change the model
    but is not modelled here."""
    return family_for_hf(hf).from_hf_config(hf)
