"""Mistral's sliding window in every mask we build, against transformers' own rule
(``masking_utils.sliding_window_causal_mask_function``); logits parity is in test_model_parity."""

import pytest
import torch
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

from megatron_vlm.data.batch import attention_mask, one_document_per_row
from megatron_vlm.data.packing import Document, Packer, PackingConfig, collate

IMAGE_TOKEN = 32001


def transformers_allowed(length: int, window: int | None) -> torch.Tensor:
    """[q, kv] True where transformers lets query q see key kv, in one unpadded sequence."""
    rule = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    q, kv = torch.arange(length)[:, None], torch.arange(length)[None, :]
    return rule(torch.tensor(0), torch.tensor(0), q, kv).expand(length, length)


@pytest.mark.parametrize("window", [None, 1, 3, 8, 100])
def test_padded_batch_mask_follows_transformers(window):
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[1, 9:] = 0
    blocked = attention_mask(one_document_per_row(padding), window)
    assert blocked.shape == (2, 1, 12, 12)
    expected = transformers_allowed(12, window)
    assert torch.equal(~blocked[0, 0], expected)
    assert torch.equal(~blocked[1, 0, :9], (expected & padding[1].bool()[None, :])[:9])
    # A padded query sees itself only (never a fully masked row); its output counts nowhere.
    assert torch.equal(~blocked[1, 0, 9:], torch.eye(12, dtype=torch.bool)[9:])


def test_attention_mask_refuses_a_non_positive_window():
    with pytest.raises(ValueError, match="sliding_window must be a positive"):
        attention_mask(one_document_per_row(torch.ones(1, 4)), 0)


def document(position: int, length: int) -> Document:
    return Document([1] + [10 + position] * (length - 2) + [2], [], "s", position)


@pytest.mark.parametrize("window", [None, 3])
def test_collate_masks_each_document_with_the_window(window):
    config = PackingConfig(seq_len=32, image_token_id=IMAGE_TOKEN, image_seq_len=4)
    packer = Packer(config)
    for position, length in enumerate([7, 5, 9, 40]):
        packer.add(document(position, length))
    sequence = packer.pop()
    assert len(sequence.positions) == 3
    mask = attention_mask(collate([sequence], config)["document_ids"], window)[0, 0]
    start = 0
    for length in (7, 5, 9):  # each document as transformers would see it alone
        end = start + length
        assert torch.equal(~mask[start:end, start:end], transformers_allowed(length, window))
        assert mask[start:end, :start].all() and mask[start:end, end:].all()
        start = end
