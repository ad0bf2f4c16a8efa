"""Numerical parity with transformers' Idefics2ForConditionalGeneration (TP=PP=1, in process)."""

import dataclasses

import pytest
import torch
from parity import (
    IMAGE_SIZES,
    document_errors,
    hf_logits,
    hf_model,
    make_batch,
    megatron_inputs,
    packed_documents,
    tiny_config,
)

from megatron_vlm.config import ParallelConfig, PrecisionConfig
from megatron_vlm.conversion.mapping import load_hf_weights
from megatron_vlm.models.idefics2 import build_model_chunks, gather_logits

TOLERANCE = 1e-4


def megatron_model(config, hf):
    state = hf.state_dict()
    (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
    load_hf_weights([model], state.__getitem__, set(state), config, 0, 1)
    return model.eval()


@torch.no_grad()
def megatron_logits(model, batch, **overrides):
    inputs = {**megatron_inputs(batch), **overrides}
    return gather_logits(model(**inputs), model.vocab_size)


@pytest.fixture(scope="module")
def models(megatron_single_process):
    config = tiny_config()
    hf = hf_model(config)
    return config, hf, megatron_model(config, hf)


def test_logits_match_hf_on_mixed_batch(models):
    """Several images of different aspect ratios, a text-only padded row, GQA everywhere."""
    config, hf, model = models
    assert config.connector.num_kv_heads < config.connector.num_heads
    assert config.text.num_kv_heads < config.text.num_heads
    batch = make_batch(config)
    reference = hf_logits(hf, batch)
    ours = megatron_logits(model, batch)
    valid = batch.padding.bool()
    assert ours.shape == reference.shape
    assert (ours - reference)[valid].abs().max() <= TOLERANCE
    assert reference[valid].abs().max() > 0.1  # the comparison is not between near-zeros


@pytest.mark.parametrize(
    "images_per_row",
    [
        [[IMAGE_SIZES[2]], [IMAGE_SIZES[2]]],  # one size, not a multiple of the patch
        [[], []],  # no image at all
        [[(224, 112), (42, 224)]],  # the full position table, both orientations
    ],
)
def test_logits_match_hf_on_other_layouts(models, images_per_row):
    config, hf, model = models
    batch = make_batch(config, seed=3, images_per_row=images_per_row, seq_len=32)
    valid = batch.padding.bool()
    assert (megatron_logits(model, batch) - hf_logits(hf, batch))[valid].abs().max() <= TOLERANCE


def test_padded_pixels_do_not_change_anything(models):
    config, _, model = models
    batch = make_batch(config)
    scribbled = batch.pixel_values.clone()
    scribbled[~batch.pixel_mask[:, None].expand_as(scribbled)] = 7.0
    before = megatron_logits(model, batch)
    after = megatron_logits(model, batch, pixel_values=scribbled)
    assert torch.equal(before, after)


def test_image_token_count_must_match_images(models):
    config, _, model = models
    batch = make_batch(config)
    with pytest.raises(ValueError, match="<image> tokens"):
        megatron_logits(model, batch, pixel_values=batch.pixel_values[:-1], pixel_attention_mask=batch.pixel_mask[:-1])


def test_mismatched_checkpoint_names_tensors(megatron_single_process):
    config = tiny_config()
    hf = hf_model(config)
    state = hf.state_dict()
    del state["model.text_model.layers.1.mlp.up_proj.weight"]
    other = dataclasses.replace(config, vision=dataclasses.replace(config.vision, intermediate_size=96))
    (model,) = build_model_chunks(other, ParallelConfig(), PrecisionConfig())
    with pytest.raises(ValueError) as error:
        load_hf_weights([model], state.__getitem__, set(state), other, 0, 1)
    message = str(error.value)
    assert "missing HF tensor: model.text_model.layers.1.mlp.up_proj.weight" in message
    assert "vision.encoder.layers.0.mlp.linear_fc1.weight" in message


def test_checkpoint_keys_use_transformer_engine_names(models):
    """The local spec writes TE's parameter names into distributed checkpoints, so checkpoints
    move between the TE (GPU) and local (CPU) specs; the mapping table reads both name forms."""
    from megatron_vlm.conversion.mapping import lookup
    from megatron_vlm.models.naming import canonical_name

    config, _, model = models
    keys = {entry.key for entry in model.sharded_state_dict().values() if hasattr(entry, "key")}
    for part in ("vision.encoder", "language_model.decoder"):
        assert f"{part}.layers.self_attention.linear_qkv.layer_norm_weight" in keys
        assert f"{part}.layers.mlp.linear_fc1.layer_norm_weight" in keys
        assert not any(k.startswith(f"{part}.layers.input_layernorm") for k in keys)
    te_name = "language_model.decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert canonical_name(te_name) == "language_model.decoder.layers.3.input_layernorm.weight"
    assert lookup(te_name, config)[0].hf == ("model.text_model.layers.*.input_layernorm.weight",)


def test_sliding_window_matches_hf(megatron_single_process):
    """Mistral's sliding window, narrower than the sequence (8 of 48 tokens): the decoder's mask
    must drop keys exactly where transformers does."""
    config = tiny_config(sliding_window=8)
    hf = hf_model(config)
    assert hf.config.text_config.sliding_window == 8
    model = megatron_model(config, hf)
    batch = make_batch(config)
    assert batch.input_ids.shape[1] == 48
    reference = hf_logits(hf, batch)
    valid = batch.padding.bool()
    # The window changes transformers' logits: the test would see a model that ignores it.
    unwindowed = megatron_model(
        dataclasses.replace(config, text=dataclasses.replace(config.text, sliding_window=None)), hf
    )
    hf.config.text_config.sliding_window = None
    assert (hf_logits(hf, batch) - reference)[valid].abs().max() > 1e-2
    assert (megatron_logits(unwindowed, batch) - reference)[valid].abs().max() > 1e-2
    assert (megatron_logits(model, batch) - reference)[valid].abs().max() <= TOLERANCE


@pytest.mark.parametrize("window", [None, 8])
def test_packed_documents_match_hf_document_by_document(megatron_single_process, window):
    """Two documents per row, padding after them, images in some: the decoder runs each document
    as its own causal sequence (RoPE positions restarting in each; with an 8-token window, its
    band), so every real position equals transformers running that document alone."""
    config = tiny_config(sliding_window=window)
    hf = hf_model(config)
    model = megatron_model(config, hf)
    documents = make_batch(config)  # four documents (rows): 48, 43 (padded), 48, 48 tokens
    inputs, lengths = packed_documents(documents)
    assert lengths == [48, 43, 48, 48]
    with torch.no_grad():
        ours = gather_logits(model(**inputs), config.text.vocab_size)
    reference = hf_logits(hf, documents)
    assert max(document_errors(ours, reference, lengths)) <= TOLERANCE
    assert (ours[0, lengths[0] + lengths[1] :] == 0).all()  # padding is not computed
    assert reference.abs().max() > 0.1
