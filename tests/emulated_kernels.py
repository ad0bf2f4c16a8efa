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
  With ``thd`` and a causal type, the config's ``window_size`` (left, right) keeps the keys
  ``i - left <= j <= i + right`` of query ``i`` (TE's sliding-window rule, ``get_full_mask`` /
  ``window_size`` in transformer_engine/pytorch/attention/dot_product_attention/utils.py).
* ``TeLayerNormLinearRules``: Transformer Engine's fused norm + column-parallel linear
  (``transformer_engine/pytorch/module/layernorm_linear.py``, ``_LayerNormLinear``) with
  ``return_layernorm_output``: forward gathers the normalised slice over the sequence under sequence
  parallelism for the GEMM and returns ln(x) gathered or as this rank's slice
  (``return_layernorm_output_gathered``); backward reduce-scatters (SP) or all-reduces (TP) the
  dgrad, and the gradient of the returned ln(x) is added: after the reduction when it was returned
  as a slice (every version), before it when returned gathered in TE 2.0-2.3 (so counted TP times),
  and not at all when returned gathered in TE 2.4+ (around lines 964-965 of 2.10's backward).
* ``te_fused_rope_rules``: Transformer Engine's fused RoPE in ``sbhd`` format (behind Megatron's
  ``fused_apply_rotary_pos_emb``; ``transformer_engine/pytorch/attention/rope.py``,
  ``apply_rotary_pos_emb(..., tensor_format="sbhd", fused=True)``): ``t`` [s, b, h, d] and ``freqs``
  [s2 >= s, 1, 1, d2] float32, position i rotated by ``freqs[i]`` (non-interleaved halves), computed
  in float32 and cast back.
* ``CudaArange``: ``torch.arange`` as CUDA computes it for a float range, ``start + i * step`` in
  float32 (ATen's CUDA range kernel), where the CPU kernel accumulates in double and rounds once.
* ``varlen_attention_rules``: torch's ``torch.nn.attention.varlen.varlen_attn`` (CUDA only): query,
  key, value ``[t, heads, d]`` attend within ``cu_seq_q`` / ``cu_seq_k`` (int32), ``window_size``
  (left, right) with -1 for unbounded ((-1, 0) is causal), ``enable_gqa`` for fewer key/value heads,
  ``scale`` (its docstring, torch/nn/attention/varlen.py).
* ``CudaQueue``: host timers around CUDA work: launches return at once, ``torch.cuda.synchronize``
  waits for what was launched (CUDA's asynchronous execution).
"""

from __future__ import annotations

import math

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
            window = getattr(self.config, "window_size", None) if causal else None
            bounds = packed_seq_params.cu_seqlens_q.tolist()
            out = torch.zeros_like(query)
            for start, end in zip(bounds[:-1], bounds[1:], strict=True):
                n = end - start
                allowed = _window(n, (-1, 0) if window is None else window) if causal else None
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


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class TeLayerNormLinearRules(torch.autograd.Function):
    """See the module docstring. ``te_version``: "2.3" (the 2.0-2.3 rule) or "2.10" (2.4+)."""

    @staticmethod
    def forward(ctx, x, ln_weight, weight, eps, sequence_parallel, gathered, te_version, group):  # noqa: ANN001, ANN205
        ln_local = _rms_norm(x, ln_weight, eps)
        ln_total = ln_local
        if sequence_parallel:
            parts = [torch.empty_like(ln_total) for _ in range(torch.distributed.get_world_size(group))]
            torch.distributed.all_gather(parts, ln_total.contiguous(), group=group)
            ln_total = torch.cat(parts, dim=0)
        ctx.save_for_backward(x, ln_weight, ln_total, weight)
        ctx.settings = (eps, sequence_parallel, gathered, te_version, group)
        returned = ln_total if sequence_parallel and gathered else ln_local
        return ln_total @ weight.t(), returned.clone()

    @staticmethod
    def backward(ctx, grad_out, grad_returned):  # noqa: ANN001, ANN205
        x, ln_weight, ln_total, weight = ctx.saved_tensors
        eps, sequence_parallel, gathered, te_version, group = ctx.settings
        grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).t() @ ln_total.reshape(-1, ln_total.shape[-1])
        dgrad = grad_out @ weight  # [total tokens, ..., in]
        returned_gathered = sequence_parallel and gathered
        old_rule = te_version.startswith("2.") and int(te_version.split(".")[1]) < 4
        if returned_gathered and old_rule and grad_returned is not None:
            dgrad = dgrad + grad_returned  # added before the reduction: every rank's copy summed
        if sequence_parallel:
            local = torch.empty_like(x)
            torch.distributed.reduce_scatter_tensor(local, dgrad.contiguous(), group=group)
        else:
            local = dgrad.contiguous()
            torch.distributed.all_reduce(local, group=group)
        if not returned_gathered and grad_returned is not None:
            local = local + grad_returned
        with torch.enable_grad():  # the norm's backward, by autograd on the recomputed norm
            leaf_x, leaf_w = x.detach().requires_grad_(), ln_weight.detach().requires_grad_()
            grad_x, grad_ln = torch.autograd.grad(_rms_norm(leaf_x, leaf_w, eps), (leaf_x, leaf_w), local)
        return grad_x, grad_ln, grad_weight.reshape(weight.shape), None, None, None, None, None


def te_fused_rope_rules(calls: list) -> object:
    """See the module docstring; each call's ``t`` shape is appended to ``calls``."""

    def fused_apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, *_: object, **__: object) -> torch.Tensor:
        calls.append(tuple(t.shape))
        if freqs.dtype != torch.float32 or freqs.shape[0] < t.shape[0] or freqs.shape[1:3] != (1, 1):
            raise RuntimeError(
                f"TE's fused RoPE wants float32 freqs [s2 >= {t.shape[0]}, 1, 1, d]; got {tuple(freqs.shape)}"
            )
        angles = freqs[: t.shape[0]]
        width = angles.shape[-1]
        x, rest = t[..., :width].float(), t[..., width:]
        first, second = x.chunk(2, dim=-1)
        rotated = x * angles.cos() + torch.cat((-second, first), dim=-1) * angles.sin()
        return torch.cat((rotated.to(t.dtype), rest), dim=-1)

    return fused_apply_rotary_pos_emb


class CudaArange:
    """``torch`` for a module under test, except that an ``arange`` made for a device (``device=``
    given) follows CUDA's float32 rule, as it would on a GPU."""

    def __getattr__(self, name: str) -> object:
        return getattr(torch, name)

    @staticmethod
    def arange(*args: float, device: object = None, dtype: torch.dtype | None = None, **kwargs: object) -> torch.Tensor:
        reference = torch.arange(*args, dtype=dtype, **kwargs)
        if device is None or not reference.is_floating_point() or len(args) != 3:
            return reference.to(device) if device is not None else reference
        start, step = (torch.tensor(value, dtype=reference.dtype) for value in (args[0], args[2]))
        return start + torch.arange(reference.numel(), dtype=reference.dtype) * step


class CudaQueue:
    """CUDA's rule for host timers (CUDA Programming Guide, "Asynchronous Concurrent Execution"): a
    kernel launch returns to the host at once and the device runs it later; ``torch.cuda.synchronize``
    returns once everything launched has run. ``launch(seconds)`` queues that much device work;
    ``synchronize`` (what torch.cuda.synchronize becomes under the test) waits for it."""

    def __init__(self) -> None:
        self.pending = 0.0
        self.synchronized = 0

    def launch(self, seconds: float) -> None:
        self.pending += seconds

    def synchronize(self, device: object = None) -> None:
        import time

        time.sleep(self.pending)
        self.pending = 0.0
        self.synchronized += 1


def te_decoder_attention_rules(config: object, layer_number: int) -> TeAttentionRules:
    """The decoder's core attention under TE (``attention.te_decoder_attention``: our RoPE and cache
    mixin over TE's ``DotProductAttention``) with TE's rules emulated by ``TeAttentionRules``."""
    from megatron_vlm.backbones.attention import DecoderAttentionMixin

    emulated = type("TeDecoderAttentionRules", (DecoderAttentionMixin, TeAttentionRules), {})(
        config, AttnMaskType.causal
    )
    emulated.layer_number = layer_number
    return emulated


def _window(n: int, window_size: tuple[int, int]) -> torch.Tensor:
    """[n, n] allowed: key j for query i when i - left <= j <= i + right (-1: unbounded)."""
    left, right = window_size
    behind = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    allowed = torch.ones(n, n, dtype=torch.bool)
    if left >= 0:
        allowed &= behind <= left
    if right >= 0:
        allowed &= -behind <= right
    return allowed


def varlen_attention_rules(calls: list[dict], torch_version: str = "2.13") -> object:
    """A CPU stand-in for ``torch.nn.attention.varlen.varlen_attn`` with its documented semantics and
    the signature of ``torch_version`` (each call's arguments are appended to ``calls``):

    * 2.10: ``(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None)``:
      no scale (1/sqrt(head_dim)), no window, no grouped keys;
    * 2.11: keyword-only ``return_aux``, ``scale``, ``window_size`` (no ``enable_gqa``);
    * 2.13: also ``enable_gqa`` (and paged-cache arguments the model does not use).
    A keyword the version lacks is a TypeError, as Python raises it."""

    def attend(query, key, value, cu_seq_q, cu_seq_k, max_q, scale, window_size, enable_gqa):
        calls.append({"cu_dtype": cu_seq_q.dtype, "max_q": max_q, "window_size": window_size, "gqa": enable_gqa})
        if cu_seq_q.dtype != torch.int32 or (cu_seq_k is not None and cu_seq_k.dtype != torch.int32):
            raise RuntimeError("cu_seq_q and cu_seq_k must be int32")
        if key.shape[1] != query.shape[1]:
            if not enable_gqa:
                raise RuntimeError("fewer key/value heads than query heads need enable_gqa=True")
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        bounds = cu_seq_q.tolist()
        if max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)) > max_q:
            raise RuntimeError("a sequence is longer than max_q")
        out = torch.zeros_like(query)
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            q = query[start:end] * (scale * math.sqrt(query.shape[-1]) if scale is not None else 1.0)
            out[start:end] = _attend(q, key[start:end], value[start:end], _window(end - start, window_size))
        return out

    if torch_version == "2.10":

        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):  # noqa: ANN001, ANN202
            return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, None, (-1, 0) if is_causal else (-1, -1), False)

    elif torch_version == "2.11":

        def varlen_attn(  # noqa: ANN202
            query,
            key,
            value,
            cu_seq_q,
            cu_seq_k,
            max_q,
            max_k,
            *,
            return_aux=None,
            scale=None,
            window_size=(-1, -1),  # noqa: ANN001
        ):
            return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, scale, window_size, False)

    else:

        def varlen_attn(  # noqa: ANN202
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            cu_seq_q: torch.Tensor,
            cu_seq_k: torch.Tensor | None,
            max_q: int,
            max_k: int,
            *,
            return_aux: object = None,
            scale: float | None = None,
            window_size: tuple[int, int] = (-1, -1),
            enable_gqa: bool = False,
        ) -> torch.Tensor:
            return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, scale, window_size, enable_gqa)

    return varlen_attn
