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
    as ints), so the local attention does not copy them back from the GPU in every layer."""

    bounds: tuple[int, ...] = ()


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
    def of(cls, document_ids: torch.Tensor, multiple: int = 1, fixed: bool = False) -> DocumentLayout:
        """``document_ids`` [b, s] (-1 padding; a row's documents contiguous) -> its layout. Reads
        the ids on the host once (one device sync per micro-batch and model chunk).

        ``fixed``: the packed length is ``b x s`` (rounded up to the multiple) whatever the padding,
        for pipelines that need one shape per run; the filler is then cut in sequences of at most
        ``s`` tokens, so its attention costs no more than a padded row's."""
        ids = document_ids.detach().cpu().reshape(-1)
        batch, seq = document_ids.shape
        real = ids >= 0
        index = real.nonzero().squeeze(1)
        starts = real.clone()
        starts[1:] &= (ids[1:] != ids[:-1]) | (torch.arange(1, ids.numel()) % seq == 0)
        first = starts[index].nonzero().squeeze(1)  # document starts, counted in real tokens
        lengths = torch.diff(first, append=torch.tensor([index.numel()]))
        wanted = batch * seq if fixed else index.numel()
        total = max(-(-wanted // multiple) * multiple, multiple)
        filler = total - index.numel()
        if filler:
            pieces = [seq] * (filler // seq) + ([filler % seq] if filler % seq else []) if fixed else [filler]
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
        """All sequences in one flash-attention call (torch's varlen kernel): causal (and windowed) or not."""
        varlen_attn, accepts = _varlen_attention()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"scale": self.softmax_scale}
        if self.groups != self.heads:
            if "enable_gqa" in accepts:
                kwargs["enable_gqa"] = True
            else:
                key = key.repeat_interleave(self.heads // self.groups, dim=1)
                value = value.repeat_interleave(self.heads // self.groups, dim=1)
        if "window_size" in accepts:  # (left, right): (-1, 0) is plain causal, (-1, -1) no mask
            kwargs["window_size"] = (-1 if self.window is None else self.window, 0 if self.causal else -1)
        else:  # an older signature: causal by flag (use_varlen_kernel refused a window)
            kwargs["is_causal"] = self.causal
        cu = params.cu_seqlens_q.to(torch.int32)
        longest = int(params.max_seqlen_q)
        attended = varlen_attn(query, key, value, cu, cu, longest, longest, **kwargs)
        return attended.reshape(query.shape[0], self.heads * self.head_dim)
