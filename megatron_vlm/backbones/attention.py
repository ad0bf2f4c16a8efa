"""Attention over packed variable-length sequences (THD), for Megatron-Core's local spec, and the
decoder's packed layout of a micro-batch.

The vision encoder runs every image as its own sequence, and the decoder every document as its own
causal sequence, packed one after another with ``cu_seqlens`` (Megatron's ``PackedSeqParams``,
``qkv_format="thd"``): no padding and no dense mask, so the result is exact on every attention
backend and no FLOP is spent on padded patches or tokens. Transformer Engine's
``DotProductAttention`` takes that layout natively (causal becomes its ``padding_causal`` type, the
sliding window its ``window_size``); Megatron-Core's local ``DotProductAttention`` refuses it
(``assert packed_seq_params is None``), so the local spec uses ``PackedSequenceAttention``:
torch's variable-length flash attention on GPUs where it exists, else ``scaled_dot_product_attention``
per sequence (flash / memory-efficient kernels on GPUs, the math kernel on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


@dataclasses.dataclass
class HostPackedSeqParams(PackedSeqParams):
    """``PackedSeqParams`` that also keep the boundaries on the host (``bounds`` = ``cu_seqlens``
    as ints), so the local attention does not copy them back from the GPU in every layer.

    The decoder's also carry, as plain attributes (not dataclass fields: Transformer Engine reads
    the fields it knows and nothing else), each packed token's rotary frequencies (``rotary``,
    ``rotary_embedding``) and, while generating, the ``KVCache``."""

    bounds: tuple[int, ...] = ()
    rotary = None  # [tokens, 1, 1, head_dim] float32, or None (no RoPE: the vision encoder)
    cache = None  # KVCache while generating


def packed_seq_params(lengths: torch.Tensor, device: torch.device | None = None) -> HostPackedSeqParams:
    """``PackedSeqParams`` for sequences of ``lengths`` tokens laid end to end (THD layout).

    ``cu_seqlens`` are int32 on ``device`` (default: the lengths'), as TE's fused attention wants them."""
    cu_seqlens = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.detach().cpu().cumsum(0)
    bounds = tuple(cu_seqlens.tolist())
    longest = max((b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)), default=0)
    cu_seqlens = cu_seqlens.to(device or lengths.device, non_blocking=True)
    return HostPackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
        bounds=bounds,
    )


@dataclasses.dataclass
class DocumentLayout:
    """A micro-batch's tokens [b, s] as the decoder's packed sequence: the real tokens row by row,
    each document its own causal sequence, padding dropped, then (when the packed length must be a
    multiple of something: sequence parallelism splits it over TP ranks, FP8 GEMMs want aligned
    rows) one filler sequence of zeros that attends only to itself and is dropped at the end."""

    shape: tuple[int, int]  # (b, s)
    index: torch.Tensor  # [real tokens] their flat positions in [b * s], in order
    params: HostPackedSeqParams  # the documents' boundaries, then the filler's
    total: int  # packed length, filler included

    @classmethod
    def of(
        cls, document_ids: torch.Tensor, multiple: int = 1, fixed: bool = False, length: int | None = None
    ) -> DocumentLayout:
        """``document_ids`` [b, s] (-1 padding; a row's documents contiguous) -> its layout. Reads
        the ids on the host once (one device sync per micro-batch and model chunk).

        The packed length is the real tokens (rounded up to the multiple), or ``length`` (the
        pipeline's one length for every micro-batch of a training step), or with ``fixed`` ``b x s``
        whatever the padding; the filler of the last two is cut in sequences of at most ``s``
        tokens, so its attention costs no more than a padded row's."""
        ids = document_ids.detach().cpu().reshape(-1)
        batch, seq = document_ids.shape
        real = ids >= 0
        index = real.nonzero().squeeze(1)
        starts = real.clone()
        starts[1:] &= (ids[1:] != ids[:-1]) | (torch.arange(1, ids.numel()) % seq == 0)
        first = starts[index].nonzero().squeeze(1)  # document starts, counted in real tokens
        lengths = torch.diff(first, append=torch.tensor([index.numel()]))
        wanted = batch * seq if fixed else index.numel()
        if length is not None:
            if length < index.numel():
                raise ValueError(f"a packed length of {length} cannot hold the micro-batch's {index.numel()} tokens")
            wanted = length
        total = max(-(-wanted // multiple) * multiple, multiple)
        filler = total - index.numel()
        if filler:
            cut = fixed or length is not None
            pieces = [seq] * (filler // seq) + ([filler % seq] if filler % seq else []) if cut else [filler]
            lengths = torch.cat([lengths, torch.tensor(pieces, dtype=lengths.dtype)])
        device = document_ids.device
        return cls((batch, seq), index.to(device, non_blocking=True), packed_seq_params(lengths, device), total)

    @property
    def real_tokens(self) -> int:
        return self.index.numel()

    def pack(self, values: torch.Tensor) -> torch.Tensor:
        """Batch-major [b, s, ...] -> packed [total, ...] (filler zeros)."""
        flat = values.reshape(self.shape[0] * self.shape[1], *values.shape[2:])[self.index]
        filler = self.total - self.real_tokens
        if filler:
            flat = torch.cat([flat, flat.new_zeros(filler, *flat.shape[1:])])
        return flat

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """Packed [total, ...] -> batch-major [b, s, ...], zeros at padding."""
        batch, seq = self.shape
        out = values.new_zeros(batch * seq, *values.shape[1:])
        out = out.index_copy(0, self.index, values[: self.real_tokens])
        return out.reshape(batch, seq, *values.shape[1:])


@functools.cache
def _varlen_attention() -> tuple[Any, frozenset[str]] | None:
    """torch's variable-length flash attention (``torch.nn.attention.varlen.varlen_attn``, CUDA
    only) and its keyword arguments, where this torch has it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def use_varlen_kernel(query: torch.Tensor, dropout: float, window: int | None) -> bool:
    """Whether this call can run torch's varlen flash kernel: CUDA, 16-bit, no dropout (it has
    none), and a sliding window only where the installed signature takes one."""
    found = _varlen_attention()
    if found is None or not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16) or dropout:
        return False
    return window is None or "window_size" in found[1]


class PackedSequenceAttention(MegatronModule):
    """Attention within each packed sequence: query/key/value ``[t, heads, head_dim]`` (Megatron
    squeezes the batch dimension for THD) -> ``[t, heads * head_dim]``. Non-causal (``no_mask`` /
    ``padding``: the vision encoder) or causal (the decoder's documents), with the config's
    ``window_size`` (left, 0) as a sliding window: a query sees itself and ``left`` keys before it."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        **_: Any,  # cp_comm_type, pg_collection: no context parallelism here
    ) -> None:
        super().__init__(config=config)
        self.layer_number = layer_number
        if attn_mask_type not in (AttnMaskType.no_mask, AttnMaskType.padding, AttnMaskType.causal):
            raise ValueError(f"packed sequence attention is causal or not; got attn_mask_type={attn_mask_type}")
        self.attn_mask_type = attn_mask_type
        self.causal = attn_mask_type == AttnMaskType.causal
        self.window: int | None = None  # keys before the query it still sees
        if config.window_size is not None:
            left, right = config.window_size
            if not self.causal or right != 0 or left < 0:
                raise ValueError(f"window_size={config.window_size}: only a causal (left, 0) window is implemented")
            self.window = left
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp if config.num_query_groups else self.heads
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            raise ValueError("PackedSequenceAttention needs PackedSeqParams with qkv_format='thd'")
        if attention_mask is not None or attention_bias is not None:
            raise ValueError("packed sequences carry their boundaries in cu_seqlens: no mask or bias")
        dropout = self.dropout if self.training else 0.0
        if use_varlen_kernel(query, dropout, self.window):
            return self._varlen(query, key, value, packed_seq_params)
        bounds = getattr(packed_seq_params, "bounds", ()) or tuple(packed_seq_params.cu_seqlens_q.tolist())
        outputs = []
        with tensor_parallel.get_cuda_rng_tracker().fork():  # dropout differs per TP rank's heads
            for start, end in zip(bounds[:-1], bounds[1:], strict=True):
                # [n, heads, d] -> [1, heads, n, d]
                q = query[start:end].transpose(0, 1)[None]
                k = key[start:end].transpose(0, 1)[None]
                v = value[start:end].transpose(0, 1)[None]
                if self.groups != self.heads:
                    k = k.repeat_interleave(self.heads // self.groups, dim=1)
                    v = v.repeat_interleave(self.heads // self.groups, dim=1)
                outputs.append(self._attend(q, k, v, dropout)[0].transpose(0, 1))
        return torch.cat(outputs, dim=0).reshape(query.shape[0], self.heads * self.head_dim)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        """One sequence [1, heads, n, d]. Causal without a binding window is ``is_causal`` (flash
        kernels on GPUs); a window shorter than the sequence needs its band as a mask."""
        n = q.shape[2]
        if not self.causal:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.softmax_scale)
        if self.window is None or n <= self.window + 1:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale)
        position = torch.arange(n, device=q.device)
        behind = position[:, None] - position[None, :]
        band = (behind >= 0) & (behind <= self.window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=dropout, scale=self.softmax_scale)

    def _varlen(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params: PackedSeqParams
    ) -> torch.Tensor:
        """All sequences in one flash-attention call (torch's varlen kernel): causal (and windowed) or
        not. Its keyword arguments differ by torch version (2.10: ``is_causal`` only; 2.11: ``scale``
        and ``window_size``; 2.13: also ``enable_gqa``), so each is passed only where the installed
        signature takes it: a scale it cannot take is folded into the queries (its default is
        1/sqrt(head_dim)), grouped keys it cannot take are repeated to every query head."""
        varlen_attn, accepts = _varlen_attention()  # type: ignore[misc]
        kwargs: dict[str, Any] = {}
        if "scale" in accepts:
            kwargs["scale"] = self.softmax_scale
        elif self.softmax_scale != 1.0 / math.sqrt(self.head_dim):
            query = query * (self.softmax_scale * math.sqrt(self.head_dim))
        if self.groups != self.heads:
            if "enable_gqa" in accepts:
                kwargs["enable_gqa"] = True
            else:
                key = key.repeat_interleave(self.heads // self.groups, dim=1)
                value = value.repeat_interleave(self.heads // self.groups, dim=1)
        if "window_size" in accepts:  # (left, right): (-1, 0) is plain causal, (-1, -1) no mask
            kwargs["window_size"] = (-1 if self.window is None else self.window, 0 if self.causal else -1)
        else:  # causal by flag (use_varlen_kernel refused a window)
            kwargs["is_causal"] = self.causal
        cu = params.cu_seqlens_q.to(torch.int32)
        longest = int(params.max_seqlen_q)
        attended = varlen_attn(query, key, value, cu, cu, longest, longest, **kwargs)
        return attended.reshape(query.shape[0], self.heads * self.head_dim)


# --------------------------------------------------------------------------------------------
# The decoder's attention: RoPE per packed token, and the key/value cache of generation
# --------------------------------------------------------------------------------------------


def rotary_embedding(positions: torch.Tensor, inverse_frequencies: torch.Tensor) -> torch.Tensor:
    """Each packed token's rotary angles [tokens, 1, 1, head_dim] (float32) from its position in its
    document, as Megatron's ``RotaryEmbedding`` computes them for positions 0..n (outer product of
    positions and inverse frequencies, the half repeated: not interleaved). Computed from the
    positions on the device, so no layer reads sequence boundaries back on the host, and a token
    generated at position p gets p's angles whatever else its micro-batch holds."""
    inverse = inverse_frequencies.to(device=positions.device, dtype=torch.float32)
    angles = positions.to(torch.float32)[:, None] * inverse[None, :]
    return torch.cat((angles, angles), dim=-1)[:, None, None, :]


def apply_rotary(tensor: torch.Tensor, rotary: torch.Tensor, config: TransformerConfig) -> torch.Tensor:
    """RoPE on packed queries or keys [tokens, heads, head_dim] with per-token angles
    ``rotary_embedding``: Megatron's own (unfused, or TE's fused kernel with ``apply_rope_fusion``)
    on the packed tokens laid out as one [tokens, 1, heads, head_dim] sequence."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    return apply_rotary_pos_emb(tensor[:, None], rotary, config=config)[:, 0]


class KVCache:
    """Keys and values of the sequences being generated, per decoder layer, so that the prompt is
    processed once and each new token costs one token's forward.

    Rows are the batch's sequences; a token's place in the cache is (its row, its position in its
    row's sequence). The generator ``begin``s each forward (prompt or one new token per row, and
    the longest row it reaches); the model ``place``s its real packed tokens (from its layout);
    every decoder layer's core attention then ``store``s their keys and values (after RoPE, grouped
    heads as computed) and, when ``decoding``, attends its queries to its row's cached keys up to
    its own position (and within the sliding window) instead of to the packed sequence. The
    prompt's forward (prefill) attends as in training, over the packed prompts. Gated
    cross-attention blocks keep their image keys and values here too (``cross``), computed once.
    """

    def __init__(self, rows: int, capacity: int) -> None:
        self.rows = rows
        self.capacity = capacity  # positions per row: the longest prompt + the new tokens
        self.keys: dict[int, torch.Tensor] = {}  # decoder layer number -> [rows, capacity, groups, d]
        self.values: dict[int, torch.Tensor] = {}
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # gated block -> (keys, values)
        self.state: dict[str, Any] = {}  # what a model keeps per sequence (cross-attention: images)
        self.decoding = False
        self._rows: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._span = 0

    def begin(self, decoding: bool, span: int) -> None:
        """The next forward: the prompts (``decoding`` False) or one new token per row; ``span`` =
        the largest position it holds + 1 (the generator knows it on the host: no device sync)."""
        if span > self.capacity:
            raise ValueError(f"position {span - 1} exceeds the cache's capacity of {self.capacity} tokens per row")
        self.decoding, self._span = decoding, span

    def place(self, rows: torch.Tensor, positions: torch.Tensor) -> None:
        """This forward's real packed tokens: their rows and positions (device tensors, in packed order)."""
        self._rows, self._positions = rows, positions

    @property
    def tokens(self) -> int:
        return 0 if self._rows is None else self._rows.numel()

    def store(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write this forward's keys and values [packed tokens, groups, d] of one layer (filler dropped)."""
        count = self.tokens
        if layer not in self.keys:
            shape = (self.rows, self.capacity, *key.shape[1:])
            self.keys[layer] = key.new_zeros(shape)
            self.values[layer] = value.new_zeros(shape)
        index = (self._rows, self._positions)
        self.keys[layer].index_put_(index, key[:count])
        self.values[layer].index_put_(index, value[:count])

    def attend(self, layer: int, query: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
        """Queries [packed tokens, heads, d] of one layer attend their rows' cached keys at or before
        their positions (and at most ``window`` before) -> [packed tokens, heads * d] (filler zero)."""
        count, heads, dim = self.tokens, query.shape[1], query.shape[2]
        keys = self.keys[layer][self._rows, : self._span]  # [count, span, groups, d]
        values = self.values[layer][self._rows, : self._span]
        groups = keys.shape[2]
        if groups != heads:
            keys = keys.repeat_interleave(heads // groups, dim=2)
            values = values.repeat_interleave(heads // groups, dim=2)
        key_position = torch.arange(self._span, device=query.device)
        behind = self._positions[:, None] - key_position[None, :]
        allowed = behind >= 0
        if window is not None:
            allowed &= behind <= window
        attended = F.scaled_dot_product_attention(
            query[:count, :, None],  # [count, heads, 1, d]
            keys.transpose(1, 2),  # [count, heads, span, d]
            values.transpose(1, 2),
            attn_mask=allowed[:, None, None, :],
            scale=scale,
        )
        out = query.new_zeros(query.shape[0], heads * dim)
        out[:count] = attended.reshape(count, heads * dim)
        return out


class DecoderAttentionMixin:
    """What the decoder's core attention adds to a packed-sequence attention (ours, or Transformer
    Engine's): RoPE from each packed token's angles (``HostPackedSeqParams.rotary``; the decoder's
    GPTModel has no rotary embedding of its own, see ``backbones/mistral.py``), and, while
    generating, the ``KVCache``."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        config = self.config  # type: ignore[attr-defined]
        rotary = getattr(packed_seq_params, "rotary", None)
        if rotary is not None:
            query, key = apply_rotary(query, rotary, config), apply_rotary(key, rotary, config)
        cache = getattr(packed_seq_params, "cache", None)
        if cache is not None:
            layer = self.layer_number  # type: ignore[attr-defined]
            cache.store(layer, key, value)
            if cache.decoding:
                scale = getattr(self, "softmax_scale", None) or 1.0 / math.sqrt(config.kv_channels)
                window = None if config.window_size is None else config.window_size[0]
                return cache.attend(layer, query, scale, window)
        return super().forward(  # type: ignore[misc]
            query,
            key,
            value,
            attention_mask,
            attn_mask_type=attn_mask_type,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            **kwargs,
        )


class DecoderAttention(DecoderAttentionMixin, PackedSequenceAttention):
    """The decoder's core attention on Megatron-Core's local spec."""


@functools.cache
def te_decoder_attention() -> type:
    """The decoder's core attention on Transformer Engine's spec (TE's ``DotProductAttention`` with
    RoPE and the cache); built on first use, where TE imports."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    return type("TEDecoderAttention", (DecoderAttentionMixin, TEDotProductAttention), {})
