"""The one HF <-> Megatron table for Idefics2. Both directions and every tool read this table.

Each row maps a Megatron parameter (canonical name: the local-spec name, with the *global* layer
index in place of ``*``) to one or more transformers names, says how they fuse (QKV interleaved by
query group, gate/up concatenated) and how the full tensor splits over tensor-parallel ranks.
A "full" tensor is the one a TP=1 model holds; the vocabulary is padded to the TP multiple.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    attention: str | None = None  # "vision" | "text": which head layout a QKV fusion uses

    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.escape(self.megatron).replace(r"\*", r"(\d+)") + "$")

    def hf_names(self, layer: str | None) -> tuple[str, ...]:
        return tuple(name.replace("*", layer) if layer is not None else name for name in self.hf)


def _vision(name: str) -> str:
    return f"model.vision_model.{name}"


def _connector(name: str) -> str:
    return f"model.connector.{name}"


def _text(name: str) -> str:
    return f"model.text_model.{name}"


def _siglip_layer(prefix: str, hf: str) -> list[Mapping]:
    return [
        Mapping(f"vision.encoder.layers.*.{prefix}.weight", (_vision(f"encoder.layers.*.{hf}.weight"),)),
        Mapping(f"vision.encoder.layers.*.{prefix}.bias", (_vision(f"encoder.layers.*.{hf}.bias"),)),
    ]


_QKV_VISION = tuple(_vision(f"encoder.layers.*.self_attn.{p}_proj") for p in "qkv")
_QKV_TEXT = tuple(_text(f"layers.*.self_attn.{p}_proj.weight") for p in "qkv")
_GATE_UP_TEXT = (_text("layers.*.mlp.gate_proj.weight"), _text("layers.*.mlp.up_proj.weight"))
_RESAMPLER = "connector.perceiver_resampler"

IDEFICS2_MAPPINGS: tuple[Mapping, ...] = (
    # --- SigLIP vision encoder
    Mapping("vision.patch_embedding.weight", (_vision("embeddings.patch_embedding.weight"),)),
    Mapping("vision.patch_embedding.bias", (_vision("embeddings.patch_embedding.bias"),)),
    Mapping("vision.position_embedding.weight", (_vision("embeddings.position_embedding.weight"),)),
    *_siglip_layer("input_layernorm", "layer_norm1"),
    Mapping(
        "vision.encoder.layers.*.self_attention.linear_qkv.weight",
        tuple(f"{n}.weight" for n in _QKV_VISION),
        Split.COLUMN,
        Fuse.QKV,
        "vision",
    ),
    Mapping(
        "vision.encoder.layers.*.self_attention.linear_qkv.bias",
        tuple(f"{n}.bias" for n in _QKV_VISION),
        Split.COLUMN,
        Fuse.QKV,
        "vision",
    ),
    Mapping(
        "vision.encoder.layers.*.self_attention.linear_proj.weight",
        (_vision("encoder.layers.*.self_attn.out_proj.weight"),),
        Split.ROW,
    ),
    Mapping(
        "vision.encoder.layers.*.self_attention.linear_proj.bias",
        (_vision("encoder.layers.*.self_attn.out_proj.bias"),),
    ),
    *_siglip_layer("pre_mlp_layernorm", "layer_norm2"),
    Mapping(
        "vision.encoder.layers.*.mlp.linear_fc1.weight", (_vision("encoder.layers.*.mlp.fc1.weight"),), Split.COLUMN
    ),
    Mapping("vision.encoder.layers.*.mlp.linear_fc1.bias", (_vision("encoder.layers.*.mlp.fc1.bias"),), Split.COLUMN),
    Mapping("vision.encoder.layers.*.mlp.linear_fc2.weight", (_vision("encoder.layers.*.mlp.fc2.weight"),), Split.ROW),
    Mapping("vision.encoder.layers.*.mlp.linear_fc2.bias", (_vision("encoder.layers.*.mlp.fc2.bias"),)),
    Mapping("vision.encoder.final_layernorm.weight", (_vision("post_layernorm.weight"),)),
    Mapping("vision.encoder.final_layernorm.bias", (_vision("post_layernorm.bias"),)),
    # --- connector: SwiGLU projection + Perceiver resampler
    Mapping(
        "connector.projection.linear_fc1.weight",
        (_connector("modality_projection.gate_proj.weight"), _connector("modality_projection.up_proj.weight")),
        Split.GATED_COLUMN,
        Fuse.GATE_UP,
    ),
    Mapping("connector.projection.linear_fc2.weight", (_connector("modality_projection.down_proj.weight"),), Split.ROW),
    Mapping("connector.latents", (f"model.{_RESAMPLER}.latents",)),
    Mapping(
        "connector.layers.*.input_latents_norm.weight", (f"model.{_RESAMPLER}.layers.*.input_latents_norm.weight",)
    ),
    Mapping(
        "connector.layers.*.input_context_norm.weight", (f"model.{_RESAMPLER}.layers.*.input_context_norm.weight",)
    ),
    Mapping(
        "connector.layers.*.attention.linear_q.weight",
        (f"model.{_RESAMPLER}.layers.*.self_attn.q_proj.weight",),
        Split.COLUMN,
    ),
    Mapping(
        "connector.layers.*.attention.linear_k.weight",
        (f"model.{_RESAMPLER}.layers.*.self_attn.k_proj.weight",),
        Split.COLUMN,
    ),
    Mapping(
        "connector.layers.*.attention.linear_v.weight",
        (f"model.{_RESAMPLER}.layers.*.self_attn.v_proj.weight",),
        Split.COLUMN,
    ),
    Mapping(
        "connector.layers.*.attention.linear_proj.weight",
        (f"model.{_RESAMPLER}.layers.*.self_attn.o_proj.weight",),
        Split.ROW,
    ),
    Mapping(
        "connector.layers.*.pre_mlp_norm.weight", (f"model.{_RESAMPLER}.layers.*.post_attention_layernorm.weight",)
    ),
    Mapping(
        "connector.layers.*.mlp.linear_fc1.weight",
        (f"model.{_RESAMPLER}.layers.*.mlp.gate_proj.weight", f"model.{_RESAMPLER}.layers.*.mlp.up_proj.weight"),
        Split.GATED_COLUMN,
        Fuse.GATE_UP,
    ),
    Mapping(
        "connector.layers.*.mlp.linear_fc2.weight", (f"model.{_RESAMPLER}.layers.*.mlp.down_proj.weight",), Split.ROW
    ),
    Mapping("connector.final_norm.weight", (f"model.{_RESAMPLER}.norm.weight",)),
    # --- Mistral decoder
    Mapping("language_model.embedding.word_embeddings.weight", (_text("embed_tokens.weight"),), Split.VOCAB),
    Mapping("language_model.decoder.layers.*.input_layernorm.weight", (_text("layers.*.input_layernorm.weight"),)),
    Mapping(
        "language_model.decoder.layers.*.self_attention.linear_qkv.weight", _QKV_TEXT, Split.COLUMN, Fuse.QKV, "text"
    ),
    Mapping(
        "language_model.decoder.layers.*.self_attention.linear_proj.weight",
        (_text("layers.*.self_attn.o_proj.weight"),),
        Split.ROW,
    ),
    Mapping(
        "language_model.decoder.layers.*.pre_mlp_layernorm.weight", (_text("layers.*.post_attention_layernorm.weight"),)
    ),
    Mapping("language_model.decoder.layers.*.mlp.linear_fc1.weight", _GATE_UP_TEXT, Split.GATED_COLUMN, Fuse.GATE_UP),
    Mapping(
        "language_model.decoder.layers.*.mlp.linear_fc2.weight", (_text("layers.*.mlp.down_proj.weight"),), Split.ROW
    ),
    Mapping("language_model.decoder.final_layernorm.weight", (_text("norm.weight"),)),
    Mapping("language_model.output_layer.weight", ("lm_head.weight",), Split.VOCAB),
)

# Transformer Engine fuses the pre-norms into the following linear; same tensors, other names.
_TE_NAMES = (
    (".self_attention.linear_qkv.layer_norm_", ".input_layernorm."),
    (".mlp.linear_fc1.layer_norm_", ".pre_mlp_layernorm."),
)


def canonical_name(name: str) -> str:
    """TE-spec parameter name -> local-spec name (the table's); other names unchanged."""
    for te, local in _TE_NAMES:
        if te in name:
            return name.replace(te, local)
    return name


def lookup(name: str, mappings: Sequence[Mapping] = IDEFICS2_MAPPINGS) -> tuple[Mapping, str | None]:
    """Find the row of a canonical Megatron name; returns it with the layer index (or None)."""
    for mapping in mappings:
        match = mapping.pattern().match(canonical_name(name))
        if match:
            return mapping, (match.group(1) if match.groups() else None)
    raise KeyError(f"no HF mapping for Megatron parameter {name!r}")


def expand(
    config: ModelConfig, mappings: Sequence[Mapping] = IDEFICS2_MAPPINGS
) -> Iterator[tuple[str, Mapping, str | None]]:
    """Every concrete (Megatron name, row, layer) of a model with this config."""
    layers = {
        "vision.encoder.layers.": config.vision.num_layers,
        "connector.layers.": config.connector.depth,
        "language_model.decoder.layers.": config.text.num_layers,
    }
    for mapping in mappings:
        if "*" not in mapping.megatron:
            yield mapping.megatron, mapping, None
            continue
        count = next(n for prefix, n in layers.items() if mapping.megatron.startswith(prefix))
        for layer in range(count):
            yield mapping.megatron.replace("*", str(layer)), mapping, str(layer)


# --------------------------------------------------------------------------------------------
# Tensor transforms: fusion (HF -> full Megatron) and tensor-parallel split (full -> shard)
# --------------------------------------------------------------------------------------------


def _attention(mapping: Mapping, config: ModelConfig) -> Attention:
    if mapping.attention == "vision":
        v = config.vision
        return Attention(v.num_heads, v.num_heads, v.head_dim)
    t = config.text
    return Attention(t.num_heads, t.num_kv_heads, t.head_dim)


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
        return _fuse_qkv(*hf_tensors, _attention(mapping, config))
    if mapping.fuse is Fuse.GATE_UP:
        return torch.cat(list(hf_tensors), dim=0)
    (tensor,) = hf_tensors
    if mapping.split is Split.VOCAB and tensor.shape[0] < config.padded_vocab_size:
        padding = tensor.new_zeros(config.padded_vocab_size - tensor.shape[0], *tensor.shape[1:])
        tensor = torch.cat([tensor, padding], dim=0)
    return tensor


def megatron_to_hf(mapping: Mapping, full: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
    """The full Megatron tensor of one row -> its HF tensor(s), in the order of ``mapping.hf``."""
    if mapping.fuse is Fuse.QKV:
        return _split_qkv(full, _attention(mapping, config))
    if mapping.fuse is Fuse.GATE_UP:
        return list(full.chunk(2, dim=0))
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


# --------------------------------------------------------------------------------------------
# Loading HF weights into (a pipeline/tensor-parallel piece of) the Megatron model
# --------------------------------------------------------------------------------------------


def global_parameter_names(chunk: torch.nn.Module) -> dict[str, str]:
    """Local parameter name -> canonical name with global decoder-layer indices (PP/VPP offset)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    renames: dict[str, str] = {}
    for module_name, module in chunk.named_modules():
        if isinstance(module, TransformerLayer) and module_name.startswith("language_model.decoder.layers."):
            renames[module_name + "."] = f"language_model.decoder.layers.{module.layer_number - 1}."
    names = {}
    for name, _ in chunk.named_parameters():
        canonical = canonical_name(name)
        for local, global_ in renames.items():
            if canonical.startswith(local):
                canonical = global_ + canonical[len(local) :]
                break
        names[name] = canonical
    return names


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
    missing, wrong_shapes, used = [], [], set()
    parameters = {(id(chunk), name): param for chunk in chunks for name, param in chunk.named_parameters()}
    work = [(chunk, local, canonical) for chunk in chunks for local, canonical in global_parameter_names(chunk).items()]
    for chunk, local, canonical in progress(work):
        if ".lora." in canonical or keep_initialized(canonical):
            continue
        mapping, layer = lookup(canonical)
        names = mapping.hf_names(layer)
        absent = [n for n in names if n not in hf_names]
        if absent:
            missing.extend(absent)
            continue
        full = hf_to_megatron(mapping, [read_hf(n) for n in names], config)
        piece = shard(mapping, full, tp_rank, tp_size)
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
