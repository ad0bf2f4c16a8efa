"""Core attention over packed variable-length sequences (THD), for Megatron-Core's local spec.

The vision encoder runs every image as its own sequence, packed one after another with
``cu_seqlens`` (Megatron's ``PackedSeqParams``, ``qkv_format="thd"``): no padding at all, so the
result is exact on every attention backend and no FLOP is spent on padded patches. Transformer
Engine's ``DotProductAttention`` takes that layout natively; Megatron-Core's local
``DotProductAttention`` refuses it (``assert packed_seq_params is None``), so the local spec uses
this module instead: ``scaled_dot_product_attention`` per sequence (flash / memory-efficient
kernels on GPUs, the math kernel on CPU), non-causal, grouped-query heads expanded.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def packed_seq_params(lengths: torch.Tensor) -> PackedSeqParams:
    """``PackedSeqParams`` for sequences of ``lengths`` tokens laid end to end (THD layout).

    ``cu_seqlens`` are int32 on the lengths' device, as TE's fused attention wants them."""
    cu_seqlens = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    longest = int(lengths.max()) if lengths.numel() else 0
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


class PackedSequenceAttention(MegatronModule):
    """Non-causal attention within each packed sequence: query/key/value ``[t, heads, head_dim]``
    (Megatron squeezes the batch dimension for THD) -> ``[t, heads * head_dim]``."""

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
        if attn_mask_type not in (AttnMaskType.no_mask, AttnMaskType.padding):
            raise ValueError(f"packed sequence attention is non-causal; got attn_mask_type={attn_mask_type}")
        self.attn_mask_type = attn_mask_type
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
        bounds = packed_seq_params.cu_seqlens_q.tolist()  # one host sync per layer, as TE's kernels
        dropout = self.dropout if self.training else 0.0
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
                attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.softmax_scale)
                outputs.append(attended[0].transpose(0, 1))
        return torch.cat(outputs, dim=0).reshape(query.shape[0], self.heads * self.head_dim)
