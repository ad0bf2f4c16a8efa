"""Idefics2 on Megatron-Core: vision encoder -> connector -> decoder, fully autoregressive. Each part
is built by the recipe its config's ``kind`` names (``megatron_vlm/backbones``: SigLIP, Perceiver,
Mistral for the paper's model).

Pipeline placement: vision encoder and connector live on the first pipeline stage (the first
virtual chunk), before its share of decoder layers; ``ParallelConfig.decoder_layers_in_first_stage``
lightens that stage. Resampled image tokens replace the text embeddings at ``<image>`` positions
(batch-major order, as transformers' ``inputs_merger``); logits of the padded vocabulary are masked
so the loss is that of the real vocabulary.

The decoder sees a micro-batch [b, s] as one packed sequence of its real tokens (``DocumentLayout``:
each document its own causal sequence, RoPE positions restarting in each, padding dropped), so no
FLOP is spent on padding and no dense mask is built; the pipeline sends each micro-batch's own length.
Outputs come back batch-major [b, s, ...], zero at padding.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megatron_vlm import backend
from megatron_vlm.backbones import common, recipes_of
from megatron_vlm.backbones.attention import DocumentLayout, KVCache, rotary_embedding
from megatron_vlm.backbones.common import torch_dtype, use_transformer_engine
from megatron_vlm.config import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_vlm.models.fp8 import use_torch_fp8
from megatron_vlm.models.neftune import neftune_noise


class Idefics2Model(MegatronModule):
    """One pipeline chunk of Idefics2. ``pre_process`` chunks own vision + connector + embeddings."""

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
        vision, connector, text = recipes_of(model_config)
        language_config = text.transformer_config(model_config, parallel, precision, initialize_weights)
        super().__init__(config=language_config)
        use_te = use_transformer_engine(precision)
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's pipeline schedules
        self.share_embeddings_and_output_weights = False  # read by finalize_model_grads
        self.neftune_alpha = 0.0  # NEFTune's noise scale while training (the trainer sets it)
        self.model_config = model_config
        self.pre_process = pre_process
        self.post_process = post_process
        self.vocab_size = model_config.text.vocab_size
        self.padded_vocab_size = model_config.padded_vocab_size
        self.vision: MegatronModule | None = None
        self.connector: MegatronModule | None = None
        if pre_process:
            self.vision = vision.build(model_config.vision, parallel, precision, initialize_weights, use_te)
            self.connector = connector.build(model_config, parallel, precision, initialize_weights)
        self.language_model = self.build_language_model(language_config, use_te, vp_stage)
        # RoPE's inverse frequencies (a plain tensor, not a buffer: ``.to(dtype)`` must not round them).
        self.inverse_frequencies = text.inverse_frequencies(model_config.text)
        self.token_multiple = decoder_token_multiple(language_config)
        # Pipeline stages send tensors of one shape that every stage knows without an exchange
        # (the text recipe turns Megatron's variable_seq_lengths off): ``layout``.
        self.pipelined = parallel.pipeline_parallel > 1

    def layout(self, document_ids: torch.Tensor, packed_length: int | None = None) -> DocumentLayout:
        """How this micro-batch's tokens are packed for the decoder: its real tokens; or, under
        pipeline parallelism, ``packed_length`` (the training step's: every micro-batch of a step
        the same, computed by every stage from the token ids they all hold, ``training/step.py``),
        else the micro-batch's ``b x s``."""
        fixed = self.pipelined and packed_length is None
        return DocumentLayout.of(document_ids, self.token_multiple, fixed=fixed, length=packed_length)

    def decoder_layout(
        self,
        document_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache | None = None,
        packed_length: int | None = None,
    ) -> DocumentLayout:
        """``layout`` with what the decoder's attention reads from it: each packed token's RoPE
        angles (from its position in its document) and, while generating, the cache with this
        forward's tokens placed (row, position)."""
        layout = self.layout(document_ids, packed_length)
        positions = layout.pack(position_ids)
        layout.params.rotary = rotary_embedding(positions, self.inverse_frequencies)
        if cache is not None:
            rows = torch.div(layout.index, layout.shape[1], rounding_mode="floor")
            cache.place(rows, positions[: layout.real_tokens])
            layout.params.cache = cache
        return layout

    def stage_tokens(self, micro_batch_size: int, seq_length: int, cache: KVCache | None = None) -> int:
        """Positions in the tensor a pipeline stage sends for a micro-batch of this size packed to
        its fixed ``b x s`` layout (forward runs with no step length, generation's): ``pipeline_shape``'s,
        this rank's share under sequence parallelism. Known from the shape alone: no layout, no sync."""
        split = self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1
        return self.pipeline_shape(micro_batch_size, seq_length)[0] // split

    def pipeline_shape(
        self, micro_batch_size: int, seq_length: int, packed_length: int | None = None
    ) -> tuple[int, int]:
        """(seq_length, micro_batch_size) of the tensors the pipeline schedule sends between stages
        for micro-batches of this size (``layout``'s packed length: ``packed_length``, else
        ``b x s``), one row."""
        tokens = packed_length or micro_batch_size * seq_length
        return -(-tokens // self.token_multiple) * self.token_multiple, 1

    def build_language_model(self, language_config: Any, use_te: bool, vp_stage: int | None) -> MegatronModule:
        """The text recipe's decoder of this chunk (the cross-attention model gives its layers blocks)."""
        text = recipes_of(self.model_config)[2]
        return text.build(self.model_config, language_config, use_te, self.pre_process, self.post_process, vp_stage)

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor]) -> None:
        self.language_model.set_input_tensor(input_tensor)

    # -- images -----------------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> torch.Tensor:
        """[images, C, H, W] + [images, H, W] -> resampled tokens [images, latents, text hidden]."""
        features, lengths = self.vision(pixel_values, pixel_attention_mask)  # packed real patches
        tokens = self.connector(features, lengths)
        return tokens.transpose(0, 1)

    def _images_contribute_nothing(self, embeddings: torch.Tensor) -> torch.Tensor:
        """A batch without images still runs a blank image through vision + connector, times 0.

        Every trainable parameter then has a (zero) gradient on every data-parallel rank, so
        overlapped gradient reduction never waits on a bucket that this rank would not fill.
        """
        pixels, mask = stand_in_image(self.model_config, embeddings)
        return embeddings + 0.0 * self.encode_images(pixels, mask).sum().to(embeddings.dtype)

    def splice_images(
        self, embeddings: torch.Tensor, input_ids: torch.Tensor, image_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Replace embeddings [s, b, h] at <image> positions with image tokens, batch-major."""
        is_image = input_ids == self.model_config.image_token_id  # [b, s]
        expected = image_tokens.shape[0] * image_tokens.shape[1]
        found = int(is_image.sum())
        if found != expected:
            raise ValueError(
                f"{found} <image> tokens in the batch but {image_tokens.shape[0]} images x "
                f"{image_tokens.shape[1]} latents = {expected} image features"
            )
        batch_major = embeddings.transpose(0, 1)
        spliced = batch_major.masked_scatter(is_image[..., None], image_tokens.to(embeddings.dtype))
        return spliced.transpose(0, 1).contiguous()

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
        """input_ids [b, s]; document_ids [b, s] (-1 padding; ``data.batch``); pixel_values
        [images, C, H, W] padded with pixel_attention_mask [images, H, W]; ``cache`` while
        generating (``inference/generate.py``); ``packed_length``: the training step's under
        pipeline parallelism (``layout``); ``noise_seed``: NEFTune's noise for this micro-batch, added
        while training when ``neftune_alpha`` > 0 (``models/neftune.py``).

        Returns per-token loss [b, s] when labels are given on the last stage, the
        tensor-parallel logits shard [b, s, V/tp] otherwise (zeros at padding), and the packed
        hidden states [tokens, 1, h] on other stages.
        """
        layout = self.decoder_layout(document_ids, position_ids, cache, packed_length)
        decoder_input = None
        if self.pre_process:
            embeddings = self.text_embeddings(input_ids, position_ids, document_ids, noise_seed)
            has_images = pixel_values is not None and pixel_values.shape[0] > 0
            if has_images:
                if pixel_attention_mask is None:
                    pixel_attention_mask = torch.ones_like(pixel_values[:, 0], dtype=torch.bool)
                image_tokens = self.encode_images(pixel_values, pixel_attention_mask)
                embeddings = self.splice_images(embeddings, input_ids, image_tokens)
            elif torch.is_grad_enabled():
                embeddings = self._images_contribute_nothing(embeddings)
            decoder_input = self.pack(layout, embeddings)
        output = self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=None,
            decoder_input=decoder_input,
            packed_seq_params=layout.params,
        )
        return self.finish(layout, output, labels)

    def text_embeddings(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, document_ids: torch.Tensor, noise_seed: int | None
    ) -> torch.Tensor:
        """The tokens' embeddings [s, b, h]; while training with ``neftune_alpha`` > 0 and a
        micro-batch's ``noise_seed``, plus NEFTune's noise on the text tokens (``models/neftune.py``)."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)
        if self.training and self.neftune_alpha > 0 and noise_seed is not None:
            is_text = input_ids != self.model_config.image_token_id
            embeddings = embeddings + neftune_noise(embeddings, document_ids, is_text, self.neftune_alpha, noise_seed)
        return embeddings

    def pack(self, layout: DocumentLayout, embeddings: torch.Tensor) -> torch.Tensor:
        """Embeddings [s, b, h] -> the decoder's packed input [tokens, 1, h] (this TP rank's slice
        of it under sequence parallelism)."""
        packed = layout.pack(embeddings.transpose(0, 1))[:, None]
        if self.config.sequence_parallel:
            # Each TP rank keeps its slice of the sequence; backward all-gathers the
            # gradient, so the (replicated) vision tower gets the same gradient on every rank.
            packed = tensor_parallel.scatter_to_sequence_parallel_region(packed)
        return packed

    def finish(self, layout: DocumentLayout, output: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The decoder's output -> hidden states (not the last stage), or batch-major logits
        [b, s, V/tp] / per-token loss [b, s] (last stage)."""
        if not self.post_process:
            return output
        logits = self._mask_padded_vocab(output[0])  # GPTModel returns [1, tokens, V/tp] for THD
        if labels is None:
            return layout.unpack(logits)
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float()[:, None], layout.pack(labels)[:, None])
        return layout.unpack(loss[:, 0])

    def _mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return mask_padded_vocab(logits, self.vocab_size, self.padded_vocab_size)


def decoder_token_multiple(config: Any) -> int:
    """What the packed decoder sequence's length is padded up to: an even split over the TP ranks
    under sequence parallelism, and rows aligned for TE's FP8 GEMMs (``common.FP8_TOKEN_MULTIPLE``)
    in each rank's shard, which is what TE casts to FP8 before gathering it."""
    multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
    return multiple * common.FP8_TOKEN_MULTIPLE if config.fp8 else multiple


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, padded_vocab_size: int) -> torch.Tensor:
    """The tensor-parallel logits shard with the padded vocabulary's extra entries at -inf."""
    if padded_vocab_size == vocab_size:
        return logits
    shard = logits.shape[-1]
    first = parallel_state.get_tensor_model_parallel_rank() * shard
    vocab_index = torch.arange(first, first + shard, device=logits.device)
    return logits.masked_fill(vocab_index >= vocab_size, float("-inf"))


def stand_in_image(model_config: ModelConfig, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A blank image (pixels, mask) of the smallest size the encoder and connector take: one patch
    for SigLIP, the fixed square of CLIP or of the pixel shuffle's full grid."""
    vision, connector, _ = recipes_of(model_config)
    side = vision.smallest_image(model_config.vision)
    if hasattr(connector, "smallest_image"):  # a connector that needs more than any patch
        side = max(side, connector.smallest_image(model_config))
    pixels = like.new_zeros(1, model_config.vision.num_channels, side, side)
    return pixels, torch.ones(1, side, side, dtype=torch.bool, device=like.device)


def gather_logits(logits_shard: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Tensor-parallel logits shard [b, s, V/tp] -> full real-vocabulary logits [b, s, V]."""
    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits_shard)
    return full[..., :vocab_size]


def build_model_chunks(
    model_config: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, initialize_weights: bool = True
) -> list[Idefics2Model]:
    """This rank's model chunks: one, or one per virtual pipeline stage. Without
    ``initialize_weights`` parameters are left unset, for callers that load every weight next."""
    model_class: type = Idefics2Model
    if model_config.architecture == "cross_attention":
        from megatron_vlm.models.cross_attention import CrossAttentionModel  # it builds on this module

        model_class = CrossAttentionModel
    chunks = []
    for vp_stage in range(parallel.virtual_pipeline or 1):
        vp = vp_stage if parallel.virtual_pipeline else None
        chunks.append(
            model_class(
                model_config,
                parallel,
                precision,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                vp_stage=vp,
                initialize_weights=initialize_weights,
            )
        )
    # As Megatron-LM's Float16Module: every parameter in the training dtype (torch norms are
    # born fp32, and GPU kernels refuse a 16-bit input with fp32 weights), and on the GPU
    # (Megatron's layers are born there, our vision embeddings, norms and latents are not).
    dtype = torch_dtype(precision.params_dtype)
    device = torch.device("cuda", torch.cuda.current_device()) if backend.has_cuda() else None
    for chunk in chunks:
        chunk.to(device=device, dtype=dtype)
    if precision.fp8 and backend.fp8_backend(precision.fp8_backend) == "torch":
        use_torch_fp8(chunks, precision.fp8, compile=precision.compile)
    elif precision.compile:  # fp8_backend=auto chose Transformer Engine here
        raise ValueError(
            "precision.compile=true compiles the torch FP8 linears' casts; FP8 runs through Transformer Engine "
            "here: set precision.compile=false"
        )
    return chunks
