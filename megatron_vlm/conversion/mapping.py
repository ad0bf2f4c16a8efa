"""The HF <-> Megatron table of a model, assembled from its backbone recipes' rows placed where its
family's checkpoint keeps each part (plus the family's own rows), and the loading of HF weights into (a pipeline/tensor-parallel piece of) the Megatron model. Both
conversion directions and every tool read this table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from megatron_vlm.backbones import mapping as rows
from megatron_vlm.backbones import recipes_of
from megatron_vlm.backbones.mapping import Mapping
from megatron_vlm.config import ModelConfig
from megatron_vlm.conversion.families import family_of
from megatron_vlm.models.naming import canonical_name, global_parameter_names


def model_table(config: ModelConfig) -> tuple[Mapping, ...]:
    """Every row of this model's table, Megatron and HF names in full."""
    family = family_of(config)
    family.check(config)
    vision, connector, text = recipes_of(config)
    parts = {
        "vision": vision.rows(config.vision),
        "connector": connector.rows(config),
        "text": text.rows(config.text),
    }
    prefixes = family.part_prefixes
    placed = [row.prefixed(*prefixes[part]) for part, part_rows in parts.items() for row in part_rows]
    return (*placed, *family.extra_rows(config))


def lookup(name: str, config: ModelConfig) -> tuple[Mapping, str | None]:
    """The row of a Megatron parameter name (TE or local form, global layer index) and its layer."""
    return rows.lookup(canonical_name(name), model_table(config))


def expand(config: ModelConfig) -> list[tuple[str, Mapping, str | None]]:
    """Every concrete (Megatron name, row, layer) of a model with this config."""
    return rows.expand(model_table(config))


@torch.no_grad()
def load_hf_weights(
    chunks: Sequence[torch.nn.Module],
    read_hf: Callable[[str], torch.Tensor],
    hf_names: set[str],
    config: ModelConfig,
    tp_rank: int,
    tp_size: int,
    keep_initialized: Callable[[str], bool] = lambda name: False,
    progress: Callable[[Iterable], Iterable] = lambda items: items,
) -> set[str]:
    """Copy HF tensors into this rank's model chunks through the table.

    ``read_hf(name)`` returns one HF tensor (a safetensors reader or a state dict lookup), so only
    the tensors this rank holds are read, one at a time. Parameters for which
    ``keep_initialized(canonical name)`` holds keep their initial values. Raises naming every
    missing HF tensor and shape mismatch; returns the HF names used.
    """
    table = model_table(config)
    missing, wrong_shapes, used = [], [], set()
    parameters = {(id(chunk), name): param for chunk in chunks for name, param in chunk.named_parameters()}
    work = [(chunk, local, canonical) for chunk in chunks for local, canonical in global_parameter_names(chunk).items()]
    for chunk, local, canonical in progress(work):
        if ".lora." in canonical or keep_initialized(canonical):
            continue
        mapping, layer = rows.lookup(canonical, table)
        names = mapping.hf_names(layer)
        absent = [n for n in names if n not in hf_names]
        if absent:
            missing.extend(absent)
            continue
        full = rows.hf_to_megatron(mapping, [read_hf(n) for n in names], config)
        piece = rows.shard(mapping, full, tp_rank, tp_size)
        target = parameters[(id(chunk), local)]
        if piece.shape != target.shape:
            wrong_shapes.append(f"{canonical} <- {names}: {tuple(piece.shape)} vs model {tuple(target.shape)}")
            continue
        target.copy_(piece.to(target.dtype))
        used.update(names)
    if missing or wrong_shapes:
        raise ValueError(
            "HF checkpoint does not match the model config:"
            + "".join(f"\n  missing HF tensor: {n}" for n in missing)
            + "".join(f"\n  shape mismatch: {s}" for s in wrong_shapes)
        )
    return used
