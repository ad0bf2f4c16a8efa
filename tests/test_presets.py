"""Presets: the published Idefics2-8B numbers, its exact parameter count, config round trips."""

import dataclasses

import pytest
import torch

from megatron_vlm.config import ModelConfig, ParallelConfig, PrecisionConfig, load_model_preset
from megatron_vlm.conversion.hf_config import from_hf_config, to_hf_config
from megatron_vlm.models.idefics2 import build_model_chunks


def test_idefics2_8b_preset_has_the_published_numbers():
    config = load_model_preset("idefics2-8b")
    v, c, t = config.vision, config.connector, config.text
    assert (v.num_layers, v.hidden_size, v.intermediate_size, v.num_heads, v.patch_size, v.image_size) == (
        27,
        1152,
        4304,
        16,
        14,
        980,
    )
    assert (c.num_latents, c.depth, c.num_heads, c.num_kv_heads, c.head_dim) == (64, 3, 16, 4, 96)
    assert (t.num_layers, t.hidden_size, t.intermediate_size, t.num_heads, t.num_kv_heads) == (32, 4096, 14336, 32, 8)
    assert (t.rope_theta, t.vocab_size) == (10000.0, 32003)
    assert (config.fake_image_token_id, config.image_token_id, config.end_of_utterance_token_id) == (
        32000,
        32001,
        32002,
    )


def test_unknown_preset_and_unknown_keys_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="idefics2-8b"):
        load_model_preset("no-such-model")
    bad = tmp_path / "bad.yaml"
    bad.write_text("text:\n  hiden_size: 12\n")
    with pytest.raises(ValueError, match="hiden_size"):
        load_model_preset(bad)


@pytest.mark.parametrize("preset", ["idefics2-8b", "small", "tiny"])
def test_hf_config_round_trip(preset):
    config = load_model_preset(preset)
    assert from_hf_config(to_hf_config(config)) == dataclasses.replace(
        config,
        fake_image_token_id=ModelConfig.fake_image_token_id,
        end_of_utterance_token_id=ModelConfig.end_of_utterance_token_id,
    )


def test_8b_parameter_count_equals_transformers(megatron_single_process):
    from transformers import Idefics2ForConditionalGeneration

    config = load_model_preset("idefics2-8b")
    with torch.device("meta"):
        hf = Idefics2ForConditionalGeneration(to_hf_config(config))
        unpadded = dataclasses.replace(config, make_vocab_size_divisible_by=1)
        (ours,) = build_model_chunks(unpadded, ParallelConfig(), PrecisionConfig(params_dtype="bfloat16"))
        (padded,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig(params_dtype="bfloat16"))
    hf_count = sum(p.numel() for p in hf.parameters())
    assert sum(p.numel() for p in ours.parameters()) == hf_count == 8_402_768_112
    # With the vocabulary padded to a multiple of 128, embedding and output gain the pad rows only.
    pad_rows = config.padded_vocab_size - config.text.vocab_size
    assert sum(p.numel() for p in padded.parameters()) == hf_count + 2 * pad_rows * config.text.hidden_size


def test_run_config_overrides_and_numbers(tmp_path):
    from megatron_vlm.config import load_run_config

    run = load_run_config(
        "examples/tiny_cpu.yaml", ["training.lr=3e-4", "training.train_steps=7", "parallel.recompute=full"]
    )
    assert run.training.lr == 3e-4 and isinstance(run.training.lr, float)
    assert run.training.train_steps == 7 and run.parallel.recompute == "full"
    with pytest.raises(ValueError, match="TrainingConfig.lr: 'fast' is not a number"):
        load_run_config("examples/tiny_cpu.yaml", ["training.lr=fast"])
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        load_run_config("examples/tiny_cpu.yaml", ["training.lr"])
    for preset in ("idefics2_8b_stage1", "idefics2_8b_stage2"):
        run = load_run_config(f"examples/{preset}.yaml")
        assert run.model.text.num_layers == 32 and run.trainable.lora_rank == 16


def test_the_fine_tuning_presets_chain_the_stages_and_carry_the_papers_mixture():
    """Stage 1 -> stage 2 -> instruction fine-tuning -> chat: each preset starts from the checkpoints
    directory the previous one writes (<output_dir>/checkpoints); the SFT stage is DoRA with NEFTune on
    Table 14's mixture (arXiv 2405.02246, Appendix A.2.1: 50 Cauldron subsets and 9 text-only sets,
    the "% mixture" column summing to 99.98)."""
    from pathlib import Path

    from megatron_vlm.config import load_run_config
    from megatron_vlm.data.loader import load_data_config

    chain = [load_run_config(f"examples/{name}.yaml") for name in ("idefics2_8b_stage1", "idefics2_8b_stage2")]
    chain += [load_run_config(f"examples/{name}.yaml") for name in ("idefics2_8b_sft", "idefics2_8b_chatty")]
    for before, after in zip(chain, chain[1:], strict=False):
        assert Path(after.training.load_weights).is_relative_to(Path(before.training.output_dir) / "checkpoints")
    sft = chain[2]
    assert sft.trainable.dora and sft.trainable.lora_rank > 0 and not sft.trainable.freeze_connector
    assert sft.training.neftune_alpha > 0
    mixture = load_data_config(sft.data.mixture, "/data")
    shares = {source.name: source.weight for source in mixture.sources}
    assert sum(s.shards.startswith("/data/cauldron/") for s in mixture.sources) == 50 and len(shares) == 59
    assert sum(shares.values()) == pytest.approx(99.98)
    assert (shares["vqav2"], shares["openhermes"], shares["rendered_text"], shares["datikz"]) == (
        5.72,
        12.73,
        5.57,
        0.03,
    )
    assert mixture.augment.shuffle_turns and mixture.augment.upscale_probability > 0
    assert mixture.weights_of == "loss_tokens"  # Table 14's shares are of answer tokens
    tiny = load_run_config("examples/tiny_cpu_sft.yaml")
    assert (
        Path(tiny.training.load_weights)
        == Path(load_run_config("examples/tiny_cpu.yaml").training.output_dir) / "checkpoints"
    )
