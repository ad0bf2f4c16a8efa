"""Mistral's sliding window as the decoder runs it, against transformers' own rule
(``masking_utils.sliding_window_causal_mask_function``): the packed attention the Mistral recipe
builds, probed for which keys each query sees, on documents packed as the loader packs them; logits
parity is in test_model_parity, the cached decoding's window in test_generation."""

import dataclasses

import pytest
import torch
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

from megatron_vlm.data.packing import Document, Packer, PackingConfig, collate

IMAGE_TOKEN = 32001


def transformers_allowed(length: int, window: int | None) -> torch.Tensor:
    """[q, kv] True where transformers lets query q see key kv, in one unpadded sequence."""
    rule = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    q, kv = torch.arange(length)[:, None], torch.arange(length)[None, :]
    return rule(torch.tensor(0), torch.tensor(0), q, kv).expand(length, length)


def document(position: int, length: int) -> Document:
    return Document([1] + [10 + position] * (length - 2) + [2], [], "s", position)


def seen_keys(window: int | None, document_ids: torch.Tensor) -> torch.Tensor:
    """Which keys each real token of ``document_ids`` [1, s] attends in the decoder's attention (the
    Mistral recipe's config, the batch's own document layout): queries and keys zero, so every key a
    query sees gets the same weight, and each value a one-hot of its key's index -> [t, t] bool."""
    from megatron.core.transformer.enums import AttnMaskType
    from parity import tiny_config

    from megatron_vlm.backbones import recipes_of
    from megatron_vlm.backbones.attention import DocumentLayout, PackedSequenceAttention
    from megatron_vlm.config import ParallelConfig, PrecisionConfig

    base = tiny_config()
    config = dataclasses.replace(base, text=dataclasses.replace(base.text, sliding_window=window))
    transformer = recipes_of(config)[2].transformer_config(config, ParallelConfig(), PrecisionConfig())
    attention = PackedSequenceAttention(transformer, 1, AttnMaskType.causal, "self").eval()
    layout = DocumentLayout.of(document_ids)
    tokens = layout.total
    query = torch.zeros(tokens, attention.heads, tokens)
    key = torch.zeros(tokens, attention.groups, tokens)
    value = torch.eye(tokens)[:, None, :].expand(tokens, attention.groups, tokens).contiguous()
    attention.head_dim = tokens  # the probe's width (the kernel reads it from the tensors' shapes)
    weights = attention(query, key, value, None, packed_seq_params=layout.params)
    weights = weights.reshape(tokens, attention.heads, tokens)[:, 0]
    seen = weights > 0
    # Every key a query sees gets 1/count: no key leaks in with another weight.
    assert torch.allclose(weights[seen], (1.0 / seen.sum(dim=1, keepdim=True)).expand_as(weights)[seen])
    return seen[: layout.real_tokens, : layout.real_tokens]


@pytest.mark.parametrize("window", [None, 1, 3, 8, 100])
def test_the_decoder_attends_each_packed_document_within_the_window(megatron_single_process, window):
    config = PackingConfig(seq_len=32, image_token_id=IMAGE_TOKEN, image_seq_len=4)
    packer = Packer(config)
    for position, length in enumerate([7, 5, 9, 40]):
        packer.add(document(position, length))
    sequence = packer.pop()
    assert len(sequence.positions) == 3  # the 40-token document does not fit beside them
    seen = seen_keys(window, collate([sequence], config)["document_ids"])
    start = 0
    for length in (7, 5, 9):  # each document as transformers would see it alone
        end = start + length
        assert torch.equal(seen[start:end, start:end], transformers_allowed(length, window))
        assert not seen[start:end, :start].any() and not seen[start:end, end:].any()
        start = end
    assert start == seen.shape[0]


def test_a_non_positive_window_is_refused_by_name():
    from megatron_vlm.config import TextConfig

    with pytest.raises(ValueError, match=r"text.sliding_window=0 must be a positive number of tokens"):
        TextConfig(sliding_window=0)
