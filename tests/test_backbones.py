"""Backbone recipes: the registry, and checkpoints written before the recipe redesign."""

from pathlib import Path

import pytest
import torch
from parity import make_batch, megatron_inputs

from megatron_vlm import backbones
from megatron_vlm.config import ParallelConfig, PrecisionConfig, load_model_preset
from megatron_vlm.models.checkpoint_io import load_model, model_config_of, read_metadata
from megatron_vlm.models.idefics2 import build_model_chunks, gather_logits

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pre_redesign"


def test_every_part_of_the_presets_has_a_recipe():
    for preset in ("tiny", "small", "idefics2-8b"):
        vision, connector, text = backbones.recipes_of(load_model_preset(preset))
        assert (vision.kind, connector.kind, text.kind) == ("siglip", "perceiver", "mistral")


def test_unknown_kinds_and_model_types_are_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown vision kind 'eva_clip'; registered: \['clip', 'siglip'\]"):
        backbones.recipe("vision", "eva_clip")
    with pytest.raises(
        ValueError, match=r"no text recipe reads HF model_type 'qwen2'; supported: \['llama', 'mistral'\]"
    ):
        backbones.recipe_for_hf("text", "qwen2")


def test_model_checkpoint_written_before_the_redesign_loads_unchanged(megatron_single_process):
    """Same parameter names, metadata without the parts' ``kind`` (read as the defaults): the
    checkpoint loads and gives the logits it gave when it was written: bit for bit until the decoder
    moved to packed per-document attention (#16), within bf16 rounding since (a randomly initialised
    model is far off)."""
    from safetensors.torch import load_file

    metadata = read_metadata(FIXTURE / "checkpoint")
    assert "kind" not in metadata["model"]["vision"]  # written before recipes existed
    config = model_config_of(metadata)
    (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig(params_dtype="bfloat16"), False)
    load_model([model], FIXTURE / "checkpoint", config)
    batch = make_batch(config)
    with torch.no_grad():
        logits = gather_logits(model.eval()(**megatron_inputs(batch)), config.text.vocab_size)
    expected = load_file(str(FIXTURE / "logits.safetensors"))["logits"]
    valid = batch.padding.bool()  # padded positions are not computed since (they reach no loss)
    scale = float(expected[valid].abs().max())
    assert float((logits.float() - expected)[valid].abs().max()) <= 2e-2 * scale
    (fresh,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig(params_dtype="bfloat16"))
    with torch.no_grad():
        unloaded = gather_logits(fresh.eval()(**megatron_inputs(batch)), config.text.vocab_size)
    assert float((unloaded.float() - expected)[valid].abs().max()) > 0.2 * scale


def test_converter_exports_a_checkpoint_written_before_the_redesign(megatron_single_process, tmp_path):
    """The export loads in transformers with every tensor it expects and nothing else, and gives the
    logits the checkpoint gave when it was written (within bf16 rounding, as above)."""
    from safetensors.torch import load_file
    from transformers import Idefics2ForConditionalGeneration

    from megatron_vlm.conversion.convert import megatron_to_hf
    from megatron_vlm.conversion.verify import hf_logits

    megatron_to_hf(FIXTURE / "checkpoint", tmp_path / "hf")
    exported, info = Idefics2ForConditionalGeneration.from_pretrained(
        str(tmp_path / "hf"), output_loading_info=True, torch_dtype=torch.float32
    )
    problems = {key: info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    assert not any(problems.values()), problems
    config = model_config_of(read_metadata(FIXTURE / "checkpoint"))
    batch = make_batch(config)
    logits = hf_logits(exported.eval(), batch)
    expected = load_file(str(FIXTURE / "logits.safetensors"))["logits"]
    valid = batch.padding.bool()
    assert float((logits.float() - expected)[valid].abs().max()) <= 2e-2 * float(expected[valid].abs().max())
