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
    # The paper trains the new tokens' embeddings and the output layer with the adapters.
    assert {"language_model.embedding.word_embeddings.weight", "language_model.output_layer.weight"} <= trainable
    assert any(n.endswith(".lora.a") for n in trainable) and any(n.endswith(".lora.b") for n in trainable)
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
    """Exactly the named part is frozen: every other parameter still trains."""
    apply_trainable([model], trainable)
    names = [name for name, _ in model.named_parameters()]
    assert any(n.startswith(frozen_prefix) for n in names) and any(n.startswith(trained_prefix) for n in names)
    for name, param in model.named_parameters():
        assert param.requires_grad == (not name.startswith(frozen_prefix)), name


def test_unknown_lora_target_is_named(model):
    with pytest.raises(ValueError, match="perceiver"):
        apply_trainable([model], TrainableConfig(lora_rank=2, lora_targets=("perceiver",)))


def test_training_starts_from_converted_weights_with_adapters_merged(megatron_single_process, tmp_path):
    """training.load_weights: a converted checkpoint loads exactly; one saved with LoRA adapters
    is merged on load (what stage 2 does with stage 1's weights)."""
    import dataclasses

    from parity import hf_model, tiny_config

    from megatron_vlm.config import ParallelConfig, PrecisionConfig
    from megatron_vlm.conversion import convert
    from megatron_vlm.models.checkpoint_io import load_weights, save_model
    from megatron_vlm.models.idefics2 import build_model_chunks

    config = dataclasses.replace(tiny_config(), make_vocab_size_divisible_by=128)  # what HF configs imply
    hf = hf_model(config, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    convert.hf_to_megatron(tmp_path / "hf", tmp_path / "converted", ParallelConfig())
    (fresh,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
    load_weights([fresh], str(tmp_path / "converted"), config)
    reference = megatron_model(config, hf)
    reference_state = reference.state_dict()
    for name, tensor in fresh.state_dict().items():
        if not name.endswith("_extra_state"):
            assert torch.equal(tensor, reference_state[name]), name

    # Stage 1 -> stage 2: a checkpoint with trained adapters starts the next run merged.
    trainable = TrainableConfig(lora_rank=4, lora_alpha=8.0)
    apply_trainable([reference], trainable)
    with torch.no_grad():
        for adapter in adapters(reference):
            adapter.b.normal_(std=0.05)
    batch = make_batch(config)
    adapted = megatron_logits(reference, batch)
    save_model([reference], tmp_path / "stage1", config, trainable)
    (next_stage,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
    load_weights([next_stage], str(tmp_path / "stage1"), config)
    assert not adapters(next_stage)
    assert (megatron_logits(next_stage.eval(), batch) - adapted).abs().max() <= 1e-5
