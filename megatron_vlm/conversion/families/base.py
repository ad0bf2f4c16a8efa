"""What a model family is to the converters, and the registry mapping ``ModelConfig.family`` and a
``config.json``'s ``model_type`` to it.

A family is one transformers model class and its checkpoint format (Idefics2, Idefics3, Idefics1):
its top-level config (read and written through transformers' own config class, so defaults are
theirs), where each part's tensors live in its checkpoint (``part_prefixes``), the tensors that belong
to no part (``extra_rows``: Idefics1's gated cross-attention blocks), its processor, and how a batch
is handed to it (the oracle of the parity tests and of ``verify_conversion``). The parts themselves
are the backbone recipes' (``megatron_vlm/backbones``). Adding a family = one file here.

The round-trip check (``unmodelled_fields``) lives here too: every family reads a config, writes it
back, and refuses by name each model-affecting field that would not survive.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

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

_FAMILIES: dict[str, Any] = {}


def register_family(family: Any) -> Any:
    _FAMILIES[family.name] = family
    return family


def family(name: str) -> Any:
    """The family ``ModelConfig.family`` names; an unknown one is refused by name."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; supported: {sorted(_FAMILIES)}") from None


def family_of(config: ModelConfig) -> Any:
    return family(config.family)


def family_for_hf(config_json: Mapping[str, Any] | Any) -> Any:
    """The family that reads this ``config.json`` (a dict, or a transformers config object), from its
    ``model_type``; a model type we do not convert is refused by name."""
    model_type = config_json.get("model_type") if isinstance(config_json, Mapping) else config_json.model_type
    for candidate in _FAMILIES.values():
        if candidate.hf_model_type == model_type:
            return candidate
    supported = sorted(f"{f.hf_model_type} ({f.hf_architecture})" for f in _FAMILIES.values())
    raise ValueError(
        f"config.json has model_type={model_type!r}, which this converter does not support; supported: "
        + ", ".join(supported)
    )


def read_hf_config(config_json: Mapping[str, Any] | Any, config_class: type) -> Any:
    """A ``config.json`` dict through transformers' config class (its defaults fill what the file
    leaves out, as ``from_pretrained`` would); a config object is returned as it is."""
    if not isinstance(config_json, Mapping):
        return config_json
    return config_class.from_dict(copy.deepcopy(dict(config_json)))  # transformers edits the dict it reads


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


def check_round_trip(source: Any, written: dict[str, Any], sections: tuple[str, ...]) -> None:
    """Refuse, naming each, the fields of ``source`` (top level and the sub-configs ``sections``)
    that the config we built would not write back the same."""
    top = {k: v for k, v in written.items() if k not in sections}
    problems = unmodelled_fields(source, top, "")
    for section in sections:
        problems += unmodelled_fields(getattr(source, section), written[section], f"{section}.")
    refuse_unmodelled(problems)


def require_kinds(config: ModelConfig, family_name: str, **expected: tuple[str, ...]) -> None:
    """A family's checkpoint format holds only certain part kinds (Idefics2: SigLIP + perceiver or
    MLP + Mistral/Llama): refuse another, naming it, before anything is written."""
    found = {"vision": config.vision.kind, "connector": config.connector.kind, "text": config.text.kind}
    for part, kinds in expected.items():
        if found[part] not in kinds:
            raise ValueError(
                f"the {family_name} format has no {part} of kind {found[part]!r} (it holds {', '.join(kinds)}); "
                f"set model.family to a family that does, or train without converting"
            )
