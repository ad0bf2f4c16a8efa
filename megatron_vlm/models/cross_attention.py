"""The cross-attention architecture (Flamingo / Idefics1) on Megatron-Core: vision encoder ->
connector (a resampler at the vision width) -> a decoder with gated cross-attention blocks.

The decoder is the text recipe's GPTModel whose layers are ``CrossAttentionTransformerLayer``: the
layers whose global index is a multiple of ``cross_attention.interval`` run a gated cross-attention
block (transformers' IdeficsGatedCrossAttentionLayer) before themselves. The image tokens reach
them as TransformerBlock's ``context`` [c, 1, width] and ``context_mask`` [1, 1, t, c] (True where
a token may not attend a key, Megatron's convention), the text being the decoder's packed sequence
of ``t`` tokens (``attention.DocumentLayout``, as the fully autoregressive model's). The context holds
the rows' images one row after another (``slots`` images of ``latents`` tokens per row,
zero-padded); a token attends the image of its row that ``data.batch.attended_images`` names (the
latest ``<image>`` at or before it in its document), and a token attending none gets no
cross-attention output (transformers' ``cross_attention_gate``).

Pipeline parallelism: vision + connector run on the first stage. Every stage holding
cross-attention blocks needs the image tokens, so they travel with the hidden states: a stage's
output is ``[t + c, 1, h]`` (hidden states, then the context zero-padded from the vision width to
the text width), and the next stage splits what it receives (the pipeline sends each micro-batch's
shape). Under pipeline parallelism every row's context holds ``cross_attention.max_images_per_row``
images, so the split point does not depend on the images. The gradient of the context flows back
through the same tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import nn

from megatron_vlm.backbones import ParameterCount, recipes_of
from megatron_vlm.backbones.attention import KVCache
from megatron_vlm.backbones.perceiver import RMSNorm, swiglu_mlp
from megatron_vlm.config import CrossAttentionConfig, ModelConfig, ParallelConfig, PrecisionConfig
from megatron_vlm.data.batch import attended_images
from megatron_vlm.models.idefics2 import Idefics2Model, stand_in_image

ALPHA_TYPES = ("float", "vector")


class HeadRMSNorm(RMSNorm):
    """RMSNorm over ``head_dim`` shared by every head (Idefics' q/k layer norms). A tensor-parallel
    rank holds some heads only, so its weight gradient is partial: ``copy_to_tensor_model_parallel_region``
    (identity forward, all-reduce backward) makes it the full sum on every rank."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        hidden = hidden.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return tensor_parallel.copy_to_tensor_model_parallel_region(self.weight) * hidden.to(dtype)


class GatedCrossAttention(MegatronModule):
    """transformers' IdeficsGatedCrossAttentionLayer: text queries attend the image tokens; the
    attention and MLP outputs are added through tanh(alpha) gates (zero at initialisation, so a
    pretrained decoder starts unchanged). Heads and the MLP width are split over tensor parallelism."""

    def __init__(self, config: TransformerConfig, cross: CrossAttentionConfig, vision_width: int) -> None:
        super().__init__(config=config)
        if cross.alpha_type not in ALPHA_TYPES:
            raise ValueError(f"cross_attention.alpha_type={cross.alpha_type!r}: use one of {ALPHA_TYPES}")
        tp = config.tensor_model_parallel_size
        if config.num_attention_heads % tp:
            raise ValueError(f"cross-attention heads ({config.num_attention_heads}) must be divisible by TP {tp}")
        hidden, eps, dtype = config.hidden_size, config.layernorm_epsilon, config.params_dtype
        self.heads = config.num_attention_heads // tp
        self.head_dim = config.kv_channels
        self.vision_width = vision_width
        inner = config.num_attention_heads * self.head_dim
        self.input_norm = RMSNorm(hidden, eps, dtype)

        def column(width: int) -> tensor_parallel.ColumnParallelLinear:
            return tensor_parallel.ColumnParallelLinear(
                width, inner, config=config, init_method=config.init_method, bias=False, gather_output=False
            )

        self.linear_q = column(hidden)
        self.linear_k = column(vision_width)
        self.linear_v = column(vision_width)
        self.linear_proj = tensor_parallel.RowParallelLinear(
            inner,
            hidden,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
        )
        self.q_norm = HeadRMSNorm(self.head_dim, eps, dtype) if cross.qk_layer_norms else None
        self.k_norm = HeadRMSNorm(self.head_dim, eps, dtype) if cross.qk_layer_norms else None
        shape = (1,) if cross.alpha_type == "float" else (1, 1, hidden)
        self.alpha_cross_attn = nn.Parameter(torch.zeros(shape, dtype=dtype))
        self.alpha_dense = nn.Parameter(torch.zeros(shape, dtype=dtype))
        self.post_attention_norm = RMSNorm(hidden, eps, dtype)
        self.mlp = swiglu_mlp(config, hidden, config.ffn_hidden_size)

    def _heads(self, projected: torch.Tensor) -> torch.Tensor:
        tokens, batch, _ = projected.shape  # -> [b, heads, tokens, head_dim]
        return projected.view(tokens, batch, self.heads, self.head_dim).permute(1, 2, 0, 3)

    def forward(
        self,
        hidden: torch.Tensor,
        context: torch.Tensor | None,
        context_mask: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """hidden [s, b, h], context [c, b, >= vision width], context_mask [b, 1, s, c] True where
        not allowed -> [s, b, h]. Generating, the image keys and values are computed from the
        prompt's context once and kept in ``cache`` (under this block's decoder ``layer``)."""
        query = self._heads(self.linear_q(self.input_norm(hidden))[0])
        if self.q_norm is not None:
            query = self.q_norm(query)
        if cache is not None and cache.decoding:
            key, value = cache.cross[layer]
        else:
            image = context[..., : self.vision_width]
            key = self._heads(self.linear_k(image)[0])
            value = self._heads(self.linear_v(image)[0])
            if self.k_norm is not None:
                key = self.k_norm(key)
            if cache is not None:
                cache.cross[layer] = (key, value)
        # A token attending no image would have no key at all (NaN): it attends every key, and its
        # output is zeroed below, as transformers' cross_attention_gate.
        no_image = context_mask.all(dim=-1, keepdim=True)
        dropout = self.config.attention_dropout if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork():  # dropout differs per TP rank's heads
            attended = F.scaled_dot_product_attention(
                query, key, value, attn_mask=~context_mask | no_image, dropout_p=dropout
            )
        attended = attended.permute(2, 0, 1, 3).reshape(hidden.shape[0], hidden.shape[1], -1)
        output = self.linear_proj(attended)[0]
        output = output.masked_fill(no_image[:, 0].transpose(0, 1), 0.0)  # [s, b, 1]
        hidden = hidden + torch.tanh(self.alpha_cross_attn) * output
        return hidden + torch.tanh(self.alpha_dense) * self.mlp(self.post_attention_norm(hidden))[0]


class CrossAttentionTransformerLayer(TransformerLayer):
    """A decoder layer, preceded by a gated cross-attention block when its global index is a
    multiple of ``cross_attention.interval`` (transformers: block ``idx // interval`` before decoder
    layer ``idx``). The block reads TransformerBlock's ``context`` and ``context_mask``; the
    layer's own attention is self-attention only."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Any,
        layer_number: int = 1,
        *,
        cross_attention: CrossAttentionConfig,
        vision_width: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(config, submodules, layer_number, **kwargs)
        self.gated_cross_attention: GatedCrossAttention | None = None
        self.interval = cross_attention.interval
        if (self.layer_number - 1) % cross_attention.interval == 0:  # layer_number: global, from 1
            self.gated_cross_attention = GatedCrossAttention(config, cross_attention, vision_width)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict[str, Any]:
        """The layer's entries, and its block's stacked over the blocks: Megatron stacks a layer's
        tensors along the decoder's layers (offset ``(0, layer, layers)``), which only every
        ``interval``-th layer has for the block, so the block's go along the blocks instead."""
        own = f"{prefix}gated_cross_attention."
        entries = {
            k: v
            for k, v in super().sharded_state_dict(prefix, sharded_offsets, metadata).items()
            if not k.startswith(own)
        }
        if self.gated_cross_attention is None:
            return entries
        offsets = tuple(sharded_offsets)
        if offsets:  # homogeneous layers: the last offset is the layer stacking (axis, layer, layers)
            axis, layer, layers = offsets[-1]
            offsets = (*offsets[:-1], (axis, layer // self.interval, layers // self.interval))
        entries.update(self.gated_cross_attention.sharded_state_dict(own, offsets, metadata))
        return entries

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        context = kwargs.pop("context", None)
        context_mask = kwargs.pop("context_mask", None)
        if self.gated_cross_attention is not None:
            cache = getattr(kwargs.get("packed_seq_params"), "cache", None)
            decoding = cache is not None and cache.decoding  # the image keys and values are cached
            if (context is None and not decoding) or context_mask is None:
                raise ValueError(f"decoder layer {self.layer_number - 1} has cross-attention but got no image context")
            kwargs["hidden_states"] = self.gated_cross_attention(
                kwargs["hidden_states"], context, context_mask, cache, self.layer_number
            )
        output, _ = super().forward(*args, **kwargs)
        return output, context


def check_cross_attention(model_config: ModelConfig, parallel: ParallelConfig) -> None:
    """Refuse, by name, a cross-attention model or layout this implementation does not run."""
    cross, text = model_config.cross_attention, model_config.text
    if cross.interval < 1 or text.num_layers % cross.interval:
        raise ValueError(
            f"cross_attention.interval={cross.interval} must divide text.num_layers={text.num_layers} "
            "(transformers' Idefics builds num_layers // interval blocks)"
        )
    if cross.max_images_per_row < 1:
        raise ValueError(f"cross_attention.max_images_per_row={cross.max_images_per_row} must be at least 1")
    if parallel.sequence_parallel:
        raise ValueError(
            "parallel.sequence_parallel is not implemented for model.architecture=cross_attention "
            "(the image tokens travel with the hidden states, which sequence parallelism would split)"
        )
    if parallel.pipeline_parallel > 1 and model_config.vision.hidden_size > text.hidden_size:
        raise ValueError(
            f"vision.hidden_size={model_config.vision.hidden_size} exceeds text.hidden_size={text.hidden_size}: "
            "under pipeline parallelism the image tokens travel in the text-width hidden states"
        )


def gated_block_parameters(model_config: ModelConfig) -> ParameterCount:
    """One gated cross-attention block: q / k / v / output projections and the SwiGLU MLP split over
    tensor parallelism; its norms, q/k norms and gates whole on every rank."""
    text, cross = model_config.text, model_config.cross_attention
    h, f, width, inner = (
        text.hidden_size,
        text.intermediate_size,
        model_config.vision.hidden_size,
        text.num_heads * text.head_dim,
    )
    gates = 2 * (1 if cross.alpha_type == "float" else h)
    qk_norms = 2 * text.head_dim if cross.qk_layer_norms else 0
    return ParameterCount(sharded=2 * h * inner + 2 * width * inner + 3 * h * f, replicated=2 * h + qk_norms + gates)


def gated_blocks_in(model_config: ModelConfig, first_layer: int, layers: int) -> int:
    """Gated blocks among decoder layers first_layer .. first_layer + layers - 1 (global indices):
    one before every layer whose index is a multiple of the interval."""
    if model_config.architecture != "cross_attention" or layers <= 0:
        return 0
    interval = model_config.cross_attention.interval
    return (first_layer + layers - 1) // interval - (first_layer - 1) // interval


def gated_block_forward_flops(model_config: ModelConfig, tokens: int, context: int, attended: int) -> float:
    """One gated cross-attention block, forward: ``tokens`` text positions, ``context`` image tokens
    (keys and values are projected for each), ``attended`` the sum over positions of the image
    tokens each attends to (its latest image's; none before the first)."""
    text = model_config.text
    h, f, width = text.hidden_size, text.intermediate_size, model_config.vision.hidden_size
    return (
        2 * tokens * h * h * 2  # queries and the output projection
        + 2 * context * width * h * 2  # keys and values, from the vision width
        + 4 * attended * h  # scores and the weighted sum
        + 2 * tokens * 3 * h * f  # the SwiGLU MLP
    )


class CrossAttentionModel(Idefics2Model):
    """One pipeline chunk of the cross-attention model. ``pre_process`` chunks own vision +
    connector + embeddings (as Idefics2's); every chunk's decoder layers may hold cross-attention
    blocks, and its forward gives them the image tokens instead of splicing them into the text."""

    def __init__(
        self,
        model_config: ModelConfig,
        parallel: ParallelConfig,
        precision: PrecisionConfig,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
        initialize_weights: bool = True,
    ) -> None:
        check_cross_attention(model_config, parallel)
        super().__init__(model_config, parallel, precision, pre_process, post_process, vp_stage, initialize_weights)
        self.image_tokens = recipes_of(model_config)[1].tokens_per_image(model_config)
        self.input_tensor: torch.Tensor | None = None

    def build_language_model(self, language_config: Any, use_te: bool, vp_stage: int | None) -> MegatronModule:
        """The text recipe's decoder whose layers are ``CrossAttentionTransformerLayer``."""
        text = recipes_of(self.model_config)[2]
        return text.build(
            self.model_config,
            language_config,
            use_te,
            self.pre_process,
            self.post_process,
            vp_stage,
            layer_module=CrossAttentionTransformerLayer,
            layer_params={
                "cross_attention": self.model_config.cross_attention,
                "vision_width": self.model_config.vision.hidden_size,
            },
        )

    def pipeline_shape(
        self, micro_batch_size: int, seq_length: int, packed_length: int | None = None
    ) -> tuple[int, int]:
        """The packed text and, under pipeline parallelism, every row's image context slots."""
        tokens, rows = super().pipeline_shape(micro_batch_size, seq_length, packed_length)
        most = self.model_config.cross_attention.max_images_per_row
        return tokens + (micro_batch_size * most * self.image_tokens if self.pipelined else 0), rows

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor]) -> None:
        if isinstance(input_tensor, list):
            (input_tensor,) = input_tensor
        self.input_tensor = input_tensor

    # -- images -----------------------------------------------------------------------------

    def image_context(
        self,
        pixel_values: torch.Tensor | None,
        pixel_attention_mask: torch.Tensor | None,
        images_per_row: torch.Tensor,
        slots: int,
        like: torch.Tensor,
    ) -> torch.Tensor:
        """The rows' images as cross-attention keys: [rows x slots x tokens, 1, vision width], each
        row's images in order, then zeros."""
        rows, width = images_per_row.numel(), self.model_config.vision.hidden_size
        context = like.new_zeros(rows, slots, self.image_tokens, width)
        images = 0 if pixel_values is None else pixel_values.shape[0]
        if images != int(images_per_row.sum()):
            raise ValueError(
                f"{int(images_per_row.sum())} <image> tokens in the batch but {images} images "
                "(cross-attention: one <image> token per image)"
            )
        if images:
            if pixel_attention_mask is None:
                pixel_attention_mask = torch.ones_like(pixel_values[:, 0], dtype=torch.bool)
            tokens = self.encode_images(pixel_values, pixel_attention_mask).to(like.dtype)
            row = torch.repeat_interleave(torch.arange(rows, device=like.device), images_per_row)
            first = torch.cumsum(images_per_row, 0) - images_per_row
            slot = torch.arange(images, device=like.device) - first[row]
            context = context.index_put((row, slot), tokens)
        elif torch.is_grad_enabled():
            # Every trainable parameter gets a (zero) gradient on every data-parallel rank, so
            # overlapped gradient reduction never waits on a bucket this rank would not fill.
            context = context + 0.0 * self.encode_images(*stand_in_image(self.model_config, like)).sum().to(like.dtype)
        return context.view(rows * slots * self.image_tokens, 1, width)

    def _transport(self, context: torch.Tensor) -> torch.Tensor:
        """The context at the text width (zero-padded), to travel in the hidden states."""
        return F.pad(context, (0, self.config.hidden_size - context.shape[-1]))

    # -- forward ----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        document_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        packed_length: int | None = None,
        noise_seed: int | None = None,
    ) -> torch.Tensor:
        """As ``Idefics2Model.forward``; the text holds one ``<image>`` token per image. Non-last
        stages return [t + c, 1, h]: packed hidden states, then the image context.

        Generating (``cache``): the prompt's forward keeps each gated block's image keys and values
        and each row's latest image in the cache; a new token's forward attends them (the latest
        image of its row's prompt, as transformers extends the image attention mask), so the image
        context is neither recomputed nor sent between stages then."""
        layout = self.decoder_layout(document_ids, position_ids, cache, packed_length)
        decoding = cache is not None and cache.decoding
        rows = input_ids.shape[0]
        if decoding:
            slots, row_image = cache.state["slots"], cache.state["row_image"]
            attended = row_image[:, None].expand_as(input_ids)
        else:
            image_token = self.model_config.image_token_id
            images_per_row = (input_ids == image_token).sum(dim=1)
            most = self.model_config.cross_attention.max_images_per_row
            if int(images_per_row.max()) > most:
                raise ValueError(
                    f"a row holds {int(images_per_row.max())} images, above cross_attention.max_images_per_row={most}"
                )
            slots = most if self.pipelined else max(1, int(images_per_row.max()))
            attended = attended_images(input_ids, document_ids, image_token)
            if cache is not None:  # what each row's next tokens attend: its prompt's last token's image
                last = (document_ids >= 0).sum(dim=1) - 1
                cache.state.update(slots=slots, row_image=attended[torch.arange(rows), last])
        row = torch.arange(rows, device=input_ids.device)[:, None]
        # Each packed token's image among all the context's (-1: none; the filler attends none).
        token_image = layout.pack(torch.where(attended >= 0, row * slots + attended + 1, 0)) - 1
        key_image = torch.arange(rows * slots * self.image_tokens, device=input_ids.device) // self.image_tokens
        context_mask = (key_image[None, :] != token_image[:, None])[None, None]  # [1, 1, t, c]
        decoder_input, context = None, None
        if self.pre_process:
            embeddings = self.text_embeddings(input_ids, position_ids, document_ids, noise_seed)
            if not decoding:
                context = self.image_context(pixel_values, pixel_attention_mask, images_per_row, slots, embeddings)
                if self.pipelined:
                    context = self._transport(context)
            decoder_input = self.pack(layout, embeddings)
        else:
            received = self.input_tensor
            expected = layout.total + (0 if decoding else key_image.numel())
            if received.shape[0] != expected:
                raise ValueError(
                    f"received {received.shape[0]} positions from the previous stage; expected {layout.total} packed "
                    f"tokens + {expected - layout.total} image tokens"
                )
            self.language_model.set_input_tensor(received[: layout.total])
            context = None if decoding else received[layout.total :]
        output = self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=None,
            decoder_input=decoder_input,
            packed_seq_params=layout.params,
            extra_block_kwargs={"context": context, "context_mask": context_mask},
        )
        if not self.post_process:
            return output if decoding else torch.cat([output, context], dim=0)
        return self.finish(layout, output, labels)

    def stage_tokens(self, micro_batch_size: int, seq_length: int, cache: KVCache | None = None) -> int:
        """``pipeline_shape``'s packed tokens and every row's image context slots, except while
        decoding with a cache (the context is not sent then)."""
        tokens = super().stage_tokens(micro_batch_size, seq_length, cache)
        if cache is not None and cache.decoding:
            tokens -= micro_batch_size * self.model_config.cross_attention.max_images_per_row * self.image_tokens
        return tokens
