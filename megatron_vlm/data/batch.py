"""The micro-batch format, built in one place for every caller: the loader's packed sequences
(``packing.collate``), the synthetic batches of the parity tests, the verify tool, the memory checks
and the GPU benchmark (``perf/workload``), and transformers' processor output (``conversion/verify``).

A micro-batch is rows of tokens, each token belonging to a document of its row (``document_ids``,
-1 for padding). Attention is causal within a document (and within Mistral's sliding window);
positions restart at every document; a token's label is the next token of its document, never an
``<image>`` placeholder. A right-padded batch is the case of one document per row
(``one_document_per_row``).

No attention mask travels with a micro-batch: the model reads the documents from ``document_ids``
and runs them as packed variable-length sequences (``backbones.attention``), padding dropped
(tests/test_sliding_window.py probes which keys its attention sees against transformers' rule).

Keys (``MODEL_INPUTS``): input_ids [b, s], position_ids [b, s], document_ids [b, s] (-1 padding),
labels [b, s], loss_mask [b, s] float, pixel_values [images, 3, H, W] (batch-major, zero padded
bottom/right) and pixel_attention_mask [images, H, W] (True on real pixels).
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_vlm.config import ModelConfig
from megatron_vlm.data.images import pad_images

MicroBatch = dict[str, torch.Tensor]

# What the model's forward takes, then what its loss takes: the keys a trainer moves to the device.
FORWARD_INPUTS = ("input_ids", "position_ids", "document_ids", "pixel_values", "pixel_attention_mask")
MODEL_INPUTS = (*FORWARD_INPUTS, "labels", "loss_mask")


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] True where a document (or a padding run) starts: at each row's first token and where
    the id changes."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def document_lengths_per_token(document_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] the length of each token's document (0 at padding)."""
    run = document_starts(document_ids).flatten().cumsum(0) - 1  # every token's run, numbered across rows
    lengths = torch.bincount(run)[run].view_as(document_ids)
    return torch.where(document_ids >= 0, lengths, torch.zeros_like(lengths))


def position_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] positions restarting at 0 at every document; 0 on padding."""
    batch, seq_len = document_ids.shape
    real = document_ids >= 0
    starts = document_starts(document_ids)
    index = torch.arange(seq_len, device=document_ids.device).expand(batch, -1)
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return torch.where(real, index - last_start, torch.zeros_like(index))


def labels_and_loss_mask(
    input_ids: torch.Tensor, document_ids: torch.Tensor, image_token_id: int, trained: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token labels [b, s] (0 where they do not count) and the float loss mask: a position
    counts when it and the next token are in the same document and the next token is not an
    <image> placeholder (its embedding is replaced by image features: nothing to predict); with
    ``trained`` [b, s] bool (conversations: the answer tokens) also only when the next token is
    one to train on."""
    labels = torch.roll(input_ids, shifts=-1, dims=1)
    next_same = torch.roll(document_ids, shifts=-1, dims=1) == document_ids
    next_same[:, -1] = False
    loss_mask = (document_ids >= 0) & next_same & (labels != image_token_id)
    if trained is not None:
        loss_mask &= torch.roll(trained.bool(), shifts=-1, dims=1)
    return labels.masked_fill(~loss_mask, 0), loss_mask.float()


def micro_batch(
    input_ids: torch.Tensor,
    document_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    pixel_attention_mask: torch.Tensor,
    image_token_id: int,
    trained: torch.Tensor | None = None,
) -> MicroBatch:
    """Tokens [b, s] and their document ids [b, s] (-1 padding), with the batch's images already
    padded (``images.pad_images``) -> the micro-batch every model input, label and mask comes from.
    ``trained`` [b, s]: the tokens whose prediction is trained on (None: every token; conversations
    mark their answers). (The decoder's sliding window is the model's: ``TextConfig.sliding_window``.)"""
    if input_ids.shape != document_ids.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and document_ids {tuple(document_ids.shape)} must be one [b, s] shape"
        )
    if trained is not None and trained.shape != input_ids.shape:
        raise ValueError(f"trained {tuple(trained.shape)} must have the tokens' shape {tuple(input_ids.shape)}")
    labels, loss_mask = labels_and_loss_mask(input_ids, document_ids, image_token_id, trained)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids(document_ids),
        "document_ids": document_ids,
        "labels": labels,
        "loss_mask": loss_mask,
        "pixel_values": pixel_values,
        "pixel_attention_mask": pixel_attention_mask,
    }


def attended_images(input_ids: torch.Tensor, document_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Cross-attention (Idefics1): [b, s] -> the index, among its row's images, of the image each token
    attends: the latest ``<image>`` at or before it in its own document; -1 for none (its
    cross-attention output is zeroed). transformers' processor rule
    (``image_attention_mask_for_packed_input_ids``), with documents in place of its end-of-document token."""
    is_image = input_ids == image_token_id
    index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    latest = torch.where(is_image, index, torch.full_like(index, -1)).cummax(dim=1).values
    starts = torch.ones_like(is_image)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    document_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    seen = (latest >= document_start) & (document_ids >= 0)
    return torch.where(seen, is_image.long().cumsum(dim=1) - 1, torch.full_like(index, -1))


def forward_inputs(batch: MicroBatch) -> MicroBatch:
    """The keys the model's forward takes (no labels: it then returns logits, not a loss)."""
    return {name: batch[name] for name in FORWARD_INPUTS}


def one_document_per_row(padding: torch.Tensor) -> torch.Tensor:
    """[b, s] padding (1 real, 0 padded at the end of a row) -> document ids: 0 real, -1 padding."""
    real = padding.bool()
    if (real[:, 1:] & ~real[:, :-1]).any():
        raise ValueError("padding must come after a row's real tokens (right padding)")
    return torch.where(real, 0, -1)


# --------------------------------------------------------------------------------------------
# Synthetic batches: parity tests, the verify tool, memory checks and the GPU benchmark
# --------------------------------------------------------------------------------------------

IMAGE_SIZES = [(56, 98), (98, 42), (60, 90), (84, 84)]  # (h, w): wide, tall, non-multiple of 14, square


@dataclasses.dataclass
class Batch:
    """A right-padded synthetic batch, as transformers sees it (``conversion.verify.hf_inputs``)."""

    input_ids: torch.Tensor  # [b, s]
    padding: torch.Tensor  # [b, s] 1 real, 0 padded
    images_per_row: list[list[tuple[int, int]]]
    pixel_values: torch.Tensor  # [images, 3, H, W] batch-major
    pixel_mask: torch.Tensor  # [images, H, W]
    image_token_id: int


def make_batch(
    config: ModelConfig,
    seed: int = 0,
    images_per_row: list[list[tuple[int, int]]] | None = None,
    seq_len: int = 48,
    image_seq_len: int | None = None,
) -> Batch:
    """Rows mixing images of several aspect ratios, a text-only row and right padding.
    ``image_seq_len``: <image> tokens per image (the connector's ``tokens_per_image``; None: the
    resampler's latents)."""
    generator = torch.Generator().manual_seed(seed)
    if images_per_row is None:
        images_per_row = [[IMAGE_SIZES[0]], [], [IMAGE_SIZES[1], IMAGE_SIZES[2]], [IMAGE_SIZES[3]]]
    latents = config.connector.num_latents if image_seq_len is None else image_seq_len
    input_ids = torch.randint(1, 250, (len(images_per_row), seq_len), generator=generator)
    padding = torch.ones_like(input_ids)
    for row, images in enumerate(images_per_row):
        position = 3
        for _ in images:
            span = [config.fake_image_token_id] + [config.image_token_id] * latents + [config.fake_image_token_id]
            input_ids[row, position : position + len(span)] = torch.tensor(span)
            position += len(span) + 2
        if position > seq_len:
            raise ValueError(f"seq_len {seq_len} too short for {len(images)} images")
    padded_row = next((r for r, images in enumerate(images_per_row) if not images), None)
    if padded_row is not None:  # the text-only row ends with padding
        padding[padded_row, -5:] = 0
        input_ids[padded_row, -5:] = 0
    sizes = [size for images in images_per_row for size in images]
    pixel_values, pixel_mask = pad_images([torch.randn(3, h, w, generator=generator) for h, w in sizes])
    return Batch(input_ids, padding, images_per_row, pixel_values, pixel_mask, config.image_token_id)


def training_inputs(batch: Batch) -> MicroBatch:
    """A synthetic batch -> its micro-batch (model inputs, labels and loss mask)."""
    return micro_batch(
        batch.input_ids, one_document_per_row(batch.padding), batch.pixel_values, batch.pixel_mask, batch.image_token_id
    )


def megatron_inputs(batch: Batch) -> MicroBatch:
    """A synthetic batch -> what the model's forward takes (it returns logits)."""
    return forward_inputs(training_inputs(batch))
