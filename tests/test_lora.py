"""Freezing and LoRA adapters: identity at init, exact merge, the paper's trainable split."""

import pytest
import torch
from parity import hf_model, make_batch, megatron_inputs, tiny_config
from test_model_parity import megatron_logits, megatron_model

from megatron_vlm.config import TrainableConfig
from megatron_vlm.models.lora import LoRAAdapter, apply_trainable, merge_lora


@pytest.fixture()
def model(megatron_single_process):
    config = tiny_config()
    return megatron_model(config, hf_model(config))


def adapters(model):
    return [m for m in model.modules() if isinstance(m, LoRAAdapter)]


def test_adapters_start_as_identity_and_merge_exactly(model):
    batch = make_batch(tiny_config())
    base = megatron_logits(model, batch)
    apply_trainable([model], TrainableConfig(lora_rank=4, lora_alpha=8.0))
    # 2 stacks x layers x 4 linears: qkv, proj, fc1, fc2
    assert len(adapters(model)) == 4 * (model.model_config.vision.num_layers + model.model_config.text.num_layers)
    assert torch.equal(megatron_logits(model, batch), base)

    with torch.no_grad():
        for adapter in adapters(model):
            adapter.b.normal_(std=0.05)
    adapted = megatron_logits(model, batch)
    assert (adapted - base).abs().max() > 1e-3
    count = len(adapters(model))
    assert merge_lora([model]) == count
    assert not adapters(model)
    assert (megatron_logits(model, batch) - adapted).abs().max() <= 1e-5


def test_paper_recipe_trains_adapters_connector_and_embeddings(model):
    apply_trainable([model], TrainableConfig(lora_rank=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for name in trainable:
        assert (
            ".lora." in name
            or name.startswith("connector.")
            or name in ("language_model.embedding.word_embeddings.weight", "language_model.output_layer.weight")
        ), name
    assert any(n.startswith("connector.") for n in trainable)
    assert "vision.patch_embedding.weight" not in trainable
    assert "language_model.decoder.layers.0.mlp.linear_fc1.weight" not in trainable

    # Gradients reach exactly the trainable parameters.
    config = tiny_config()
    batch = make_batch(config)
    model.train()
    output = model(**megatron_inputs(batch), labels=batch.input_ids.roll(-1, 1))
    output.mean().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name


@pytest.mark.parametrize(
    ("trainable", "frozen_prefix", "trained_prefix"),
    [
        (TrainableConfig(freeze_vision=True), "vision.", "connector."),
        (TrainableConfig(freeze_connector=True), "connector.", "vision."),
        (TrainableConfig(freeze_language=True), "language_model.", "connector."),
    ],
)
def test_each_part_freezes_independently(model, trainable, frozen_prefix, trained_prefix):
    apply_trainable([model], trainable)
    for name, param in model.named_parameters():
        if name.startswith(frozen_prefix):
            assert not param.requires_grad, name
        elif name.startswith(trained_prefix):
            assert param.requires_grad, name


def test_unknown_lora_target_is_named(model):
    with pytest.raises(ValueError, match="perceiver"):
        apply_trainable([model], TrainableConfig(lora_rank=2, lora_targets=("perceiver",)))
