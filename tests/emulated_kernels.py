"""CPU emulations of the rules GPU kernels obey, written from the libraries' own source.

These let CPU tests check the branches only GPUs take. Each emulation states where its rule comes
from; none stands in for a library in production code.

* ``TeAttentionRules``: what Transformer Engine's ``DotProductAttention`` (behind Megatron-Core's
  ``TEDotProductAttention``) computes with its fused (cuDNN) and flash backends, which TE prefers
  on Hopper. For ``sbhd``/``bshd`` input with a ``padding`` mask ``[b, 1, 1, s]`` it derives
  per-row sequence lengths, ``get_cu_seqlens``: ``(~mask.squeeze(1).squeeze(1)).sum(dim=1)``
  (transformer_engine/pytorch/attention/dot_product_attention/utils.py), and these backends then
  treat the first n tokens of each row as the real ones. With ``thd`` input it attends within
  ``cu_seqlens``; Megatron's ``TEDotProductAttention`` turns ``no_mask`` into ``padding`` and
  ``causal`` into ``padding_causal`` there (megatron/core/extensions/transformer_engine.py). An
  explicit mask is applied as given only with the ``arbitrary`` type.
* ``fused_softmax_kernels``: Megatron-Core's ``FusedScaleMaskSoftmax`` with its CUDA extensions
  present. ``is_kernel_available`` (megatron/core/fusions/fused_softmax.py) asks the extension for
  ``get_batch_per_block``, whose formula is in scaled_masked_softmax.h; ``causal`` runs
  ``ScaledUpperTriangMaskedSoftmax``, which takes no mask at all; ``padding`` runs
  ``ScaledMaskedSoftmax`` (mask ``[1 or b, 1, sq, sk]``, checked by the kernel, masked scores set
  to -10000) or ``ScaledSoftmax`` without a mask.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """q [n, h, d], k/v [m, h, d], allowed [n, m] -> [n, h, d] (float64 for a clean reference)."""
    scores = torch.einsum("nhd,mhd->hnm", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("hnm,mhd->nhd", probs, v.double()).to(q.dtype)


class TeAttentionRules(MegatronModule):
    """Stands in for TE's core attention in a CPU model, computing what its fused/flash backends
    compute for the inputs Megatron hands them."""

    def __init__(self, config: object, attn_mask_type: AttnMaskType) -> None:
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.calls: list[str] = []

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: object | None = None,
    ) -> torch.Tensor:
        mask_type = attn_mask_type or self.attn_mask_type
        groups = query.shape[-2] // key.shape[-2]
        key, value = key.repeat_interleave(groups, dim=-2), value.repeat_interleave(groups, dim=-2)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            self.calls.append("thd")
            causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
            bounds = packed_seq_params.cu_seqlens_q.tolist()
            out = torch.zeros_like(query)
            for start, end in zip(bounds[:-1], bounds[1:], strict=True):
                n = end - start
                allowed = torch.ones(n, n, dtype=torch.bool).tril() if causal else None
                out[start:end] = _attend(query[start:end], key[start:end], value[start:end], allowed)
            return out.reshape(query.shape[0], -1)
        # sbhd: [s, b, h, d]
        seq, batch = query.shape[:2]
        out = torch.zeros_like(query)
        for row in range(batch):
            q, k, v = query[:, row], key[:, row], value[:, row]
            if mask_type == AttnMaskType.padding:
                self.calls.append("padding->seqlens")
                real = int((~attention_mask[row].reshape(-1)).sum())  # get_cu_seqlens
                out[:real, row] = _attend(q[:real], k[:real], v[:real], None)  # the first n are real
            elif mask_type == AttnMaskType.arbitrary:
                self.calls.append("arbitrary")
                allowed = ~attention_mask[row if attention_mask.shape[0] > 1 else 0, 0].bool()
                out[:, row] = _attend(q, k, v, allowed)
            elif mask_type == AttnMaskType.causal:
                self.calls.append("causal")
                out[:, row] = _attend(q, k, v, torch.ones(seq, seq, dtype=torch.bool).tril())
            else:
                self.calls.append("no_mask")
                out[:, row] = _attend(q, k, v, None)
        return out.reshape(seq, batch, -1)


def batch_per_block(sq: int, sk: int, b: int, np: int) -> int:
    """``get_batch_per_block`` of scaled_masked_softmax.h: 128 threads per block, warps of
    min(32, next power of two >= sk) threads, 2 rows per warp up to 128 keys."""
    next_power_of_two = 1 << max(0, math.ceil(math.log2(sk)))
    warp_size = min(next_power_of_two, 32)
    batches_per_warp = 2 if next_power_of_two <= 128 else 1
    return (128 // warp_size) * batches_per_warp


def _masked_softmax_kernel(scores: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    b, _, sq, sk = scores.shape
    # The kernel's own shape checks (TORCH_CHECK in scaled_masked_softmax.cpp).
    if not (mask.dim() == 4 and mask.shape[0] in (1, b) and mask.shape[1] == 1):
        raise RuntimeError(f"ScaledMaskedSoftmax: mask of shape {tuple(mask.shape)} for scores {tuple(scores.shape)}")
    if mask.shape[2] != sq or mask.shape[3] != sk:
        raise RuntimeError(f"ScaledMaskedSoftmax: mask of shape {tuple(mask.shape)} for scores {tuple(scores.shape)}")
    filled = (scores.float() * scale).masked_fill(mask.bool(), -10000.0)
    return torch.softmax(filled, dim=-1).to(scores.dtype)


def _upper_triangular_kernel(scores: torch.Tensor, scale: float) -> torch.Tensor:
    sq, sk = scores.shape[-2:]
    if sq != sk:
        raise RuntimeError("causal mask is only for self attention")
    future = torch.ones(sq, sk, dtype=torch.bool).triu(1)
    return torch.softmax((scores.float() * scale).masked_fill(future, float("-inf")), dim=-1).to(scores.dtype)


@contextlib.contextmanager
def fused_softmax_kernels(record: list[str]) -> Iterator[None]:
    """Within the block, ``FusedScaleMaskSoftmax`` behaves as with its CUDA extensions installed:
    the same dispatch (its own ``is_kernel_available``), with the kernels emulated on CPU. Which
    kernel ran is appended to ``record``."""
    from megatron.core.fusions import fused_softmax

    cls = fused_softmax.FusedScaleMaskSoftmax
    saved = cls.get_batch_per_block, cls.forward_fused_softmax

    def forward_fused_softmax(self: object, input: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        scale = self.scale if self.scale is not None else 1.0
        if self.attn_mask_type == AttnMaskType.causal:
            record.append("upper_triangular(mask ignored)")
            return _upper_triangular_kernel(input, scale)
        if mask is not None:
            record.append("masked")
            return _masked_softmax_kernel(input, mask, scale)
        record.append("unmasked")
        return torch.softmax(input.float() * scale, dim=-1).to(input.dtype)

    cls.get_batch_per_block = staticmethod(batch_per_block)
    cls.forward_fused_softmax = forward_fused_softmax
    try:
        yield
    finally:
        cls.get_batch_per_block = staticmethod(saved[0])
        cls.forward_fused_softmax = saved[1]
