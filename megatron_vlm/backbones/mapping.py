"""The machinery of the HF <-> Megatron mapping table; each backbone recipe writes its own rows.

A row maps a Megatron parameter (canonical name: the local-spec name, with the *global* layer index
in place of ``*``) to one or more transformers names, says how they fuse (QKV interleaved by query
group, gate/up concatenated) and how the full tensor splits over tensor-parallel ranks. A "full"
tensor is the one a TP=1 model holds; the vocabulary is padded to the TP multiple. Both conversion
directions and every tool read the same rows.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_vlm.config import ModelConfig


class Split(enum.Enum):
    REPLICATED = "replicated"
    COLUMN = "column"  # output features (dim 0) split over TP ranks
    ROW = "row"  # input features (dim 1) split over TP ranks
    GATED_COLUMN = "gated_column"  # [gate; up] each split on dim 0, rank r holds [gate_r; up_r]
    VOCAB = "vocab"  # dim 0, padded to the TP vocabulary multiple


class Fuse(enum.Enum):
    NONE = "none"
    QKV = "qkv"  # q, k, v -> Megatron's [groups, (q per group, k, v), head_dim, ...]
    GATE_UP = "gate_up"  # gate, up -> [gate; up]
    # base, additional vocabulary rows -> one table (Idefics1's decoupled embedding / LM head; with Split.VOCAB)
    VOCAB_CONCAT = "vocab_concat"


@dataclass(frozen=True)
class Attention:
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Mapping:
    megatron: str
    hf: tuple[str, ...]
    split: Split = Split.REPLICATED
    fuse: Fuse = Fuse.NONE
    attention: Attention | None = None  # the head layout a QKV fusion uses
    layers: int = 0  # how many layers ``*`` stands for (0: the name has no ``*``)

    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.escape(self.megatron).replace(r"\*", r"(\d+)") + "$")

    def hf_names(self, layer: str | None) -> tuple[str, ...]:
        return tuple(name.replace("*", layer) if layer is not None else name for name in self.hf)

    def prefixed(self, megatron: str, hf: str) -> Mapping:
        """The row under a parent module: ``megatron`` before the Megatron name, ``hf`` before
        every HF name that is not absolute (``/name`` marks a name from the checkpoint's root)."""
        names = tuple(n[1:] if n.startswith("/") else hf + n for n in self.hf)
        return dataclasses.replace(self, megatron=megatron + self.megatron, hf=names)


def layer_rows(layers: int, rows: Sequence[Mapping]) -> list[Mapping]:
    """Rows of a stack of ``layers`` identical layers (their names hold ``*``)."""
    return [dataclasses.replace(row, layers=layers) for row in rows]


def lookup(name: str, mappings: Sequence[Mapping]) -> tuple[Mapping, str | None]:
    """Find the row of a canonical Megatron name; returns it with the layer index (or None)."""
    for mapping in mappings:
        match = mapping.pattern().match(name)
        if match:
            return mapping, (match.group(1) if match.groups() else None)
    raise KeyError(f"no HF mapping for Megatron parameter {name!r}")


def expand(mappings: Sequence[Mapping]) -> list[tuple[str, Mapping, str | None]]:
    """Every concrete (Megatron name, row, layer) of a table."""
    concrete = []
    for mapping in mappings:
        if "*" not in mapping.megatron:
            concrete.append((mapping.megatron, mapping, None))
            continue
        for layer in range(mapping.layers):
            concrete.append((mapping.megatron.replace("*", str(layer)), mapping, str(layer)))
    return concrete


# --------------------------------------------------------------------------------------------
# Tensor transforms: fusion (HF -> full Megatron) and tensor-parallel split (full -> shard)
# --------------------------------------------------------------------------------------------


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, att: Attention) -> torch.Tensor:
    per_group = att.heads // att.kv_heads
    rest = q.shape[1:]
    q = q.reshape(att.kv_heads, per_group * att.head_dim, *rest)
    k = k.reshape(att.kv_heads, att.head_dim, *rest)
    v = v.reshape(att.kv_heads, att.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _split_qkv(fused: torch.Tensor, att: Attention) -> list[torch.Tensor]:
    per_group = att.heads // att.kv_heads
    rest = fused.shape[1:]
    grouped = fused.reshape(att.kv_heads, (per_group + 2) * att.head_dim, *rest)
    q, k, v = grouped.split([per_group * att.head_dim, att.head_dim, att.head_dim], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def hf_to_megatron(mapping: Mapping, hf_tensors: Sequence[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """HF tensor(s) of one row -> the full (TP=1) Megatron tensor."""
    if mapping.fuse is Fuse.QKV:
        return _fuse_qkv(*hf_tensors, mapping.attention)
    if mapping.fuse is Fuse.GATE_UP:
        return torch.cat(list(hf_tensors), dim=0)
    if mapping.fuse is Fuse.VOCAB_CONCAT:
        hf_tensors = [torch.cat(list(hf_tensors), dim=0)]
    (tensor,) = hf_tensors
    if mapping.split is Split.VOCAB and tensor.shape[0] < config.padded_vocab_size:
        padding = tensor.new_zeros(config.padded_vocab_size - tensor.shape[0], *tensor.shape[1:])
        tensor = torch.cat([tensor, padding], dim=0)
    return tensor


def megatron_to_hf(mapping: Mapping, full: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
    """The full Megatron tensor of one row -> its HF tensor(s), in the order of ``mapping.hf``."""
    if mapping.fuse is Fuse.QKV:
        return _split_qkv(full, mapping.attention)
    if mapping.fuse is Fuse.GATE_UP:
        return list(full.chunk(2, dim=0))
    if mapping.fuse is Fuse.VOCAB_CONCAT:
        additional = config.text.additional_vocab_size
        return list(full[: config.text.vocab_size].split([config.text.vocab_size - additional, additional]))
    if mapping.split is Split.VOCAB:
        return [full[: config.text.vocab_size]]
    return [full]


def shard(mapping: Mapping, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The piece of a full tensor that tensor-parallel rank ``rank`` of ``size`` holds."""
    if mapping.split in (Split.COLUMN, Split.VOCAB):
        return full.chunk(size, dim=0)[rank]
    if mapping.split is Split.ROW:
        return full.chunk(size, dim=1)[rank]
    if mapping.split is Split.GATED_COLUMN:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return full


def unshard(mapping: Mapping, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``shard``: the full tensor from every rank's piece (rank order)."""
    if mapping.split in (Split.COLUMN, Split.VOCAB):
        return torch.cat(list(shards), dim=0)
    if mapping.split is Split.ROW:
        return torch.cat(list(shards), dim=1)
    if mapping.split is Split.GATED_COLUMN:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return shards[0]
