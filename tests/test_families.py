"""Converter families beyond Idefics2 with Mistral: Idefics2 with a Llama decoder, and Idefics3
(SigLIP on full squares, pixel-shuffle connector, Llama-3). Logits against the family's transformers
model at TP1 (in process) and TP2 x PP2 (real processes), training steps equal across the layouts,
the pixel-shuffle connector against transformers' own, and the converters' round trips."""

import json

import pytest
import torch
from parity import family_config, run_tool, run_torchrun
from workers.family_worker import measure

from megatron_vlm.backbones import recipe
from megatron_vlm.config import ParallelConfig, load_model_preset
from megatron_vlm.conversion import convert
from megatron_vlm.conversion.hf_config import from_hf_config, to_hf_config_dict
from megatron_vlm.conversion.verify import random_hf_model

TOLERANCE = 1e-4
STEPS = 4
FAMILY_CONFIGS = ("idefics2-llama", "idefics3")


@pytest.fixture(scope="module")
def tp1(megatron_single_process):
    """Each family's tiny model at TP1, in process: logits against transformers, then training."""
    return {
        name: measure(family_config(name), ParallelConfig(), STEPS, text_only_micro_batch=True)
        for name in FAMILY_CONFIGS
    }


@pytest.fixture(scope="module", params=FAMILY_CONFIGS)
def tp2pp2(request, tmp_path_factory):
    """One torchrun run per family config at TP2 x PP2: (name, every rank's result)."""
    name = request.param
    out = tmp_path_factory.mktemp(f"family_{name}")
    run_torchrun(
        "family_worker.py",
        4,
        [
            "--tp",
            "2",
            "--pp",
            "2",
            "--family-config",
            name,
            "--steps",
            str(STEPS),
            "--text-only-micro-batch",
            "--out",
            str(out),
        ],
    )
    return name, [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(4)]


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_logits_match_transformers_at_tp1(tp1, name):
    result = tp1[name]
    assert result["hf_tensors_used"] == result["hf_tensors"]  # every transformers tensor is mapped
    assert result["images"] == 4
    assert result["logits_max_abs_diff"] <= TOLERANCE
    assert result["logits_max_abs"] > 0.1  # the comparison is not between near-zeros
    losses = [step["loss"] for step in result["steps"]]
    assert all(step["updated"] for step in result["steps"]) and losses[-1] < losses[0]
    # Greedy generation (KV cache) equals transformers' generate; no step within 1e-4 of a tie.
    assert result["generated"] == result["hf_generated"] and result["generation_margin"] > 1e-4


@pytest.mark.first_env_only
@pytest.mark.multiprocess
def test_tp2pp2_matches_transformers_and_trains_as_tp1(tp2pp2, tp1):
    name, ranks = tp2pp2
    reference = tp1[name]
    assert [r["has_vision"] for r in ranks] == [[True], [True], [False], [False]]
    assert sorted({t for r in ranks for t in r["hf_tensors_used"]}) == reference["hf_tensors"]
    last_stage = [r for r in ranks if r["pp_rank"] == 1]
    assert all(r["logits_max_abs_diff"] <= TOLERANCE for r in last_stage)
    for rank in ranks:  # generation through the pipeline: every rank has the tokens transformers generates
        assert rank["generated"] == reference["hf_generated"], (rank["pp_rank"], rank["generation_margin"])
        for ours, theirs in zip(rank["steps"][:2], reference["steps"][:2], strict=True):
            assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
            assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
        losses = [step["loss"] for step in rank["steps"]]
        assert losses[-1] < losses[0]


# --- the pixel-shuffle connector -------------------------------------------------------------------


@pytest.mark.parametrize(("grid", "scale"), [(6, 2), (6, 3), (8, 4)])
def test_pixel_shuffle_is_transformers(grid, scale):
    from transformers import Idefics3Config
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    from megatron_vlm.backbones.pixel_shuffle import pixel_shuffle

    features = torch.randn(3, grid * grid, 5)
    theirs = Idefics3Connector(Idefics3Config(scale_factor=scale)).pixel_shuffle(features, scale)
    assert torch.equal(pixel_shuffle(features, scale), theirs)


def test_pixel_shuffle_refuses_what_it_cannot_shuffle(megatron_single_process):
    import dataclasses

    from megatron_vlm.config import PrecisionConfig

    config = family_config("idefics3")
    shuffle = recipe("connector", "pixel_shuffle")
    assert shuffle.tokens_per_image(config) == 9  # 84 px / 14 = 6x6 patches, 2x2 blocks
    connector = shuffle.build(config, ParallelConfig(), PrecisionConfig(), True)
    features = torch.randn(36 + 20, config.vision.hidden_size)
    with pytest.raises(ValueError, match=r"whole 6x6 patch grid .*images of \[20\] patches.*image.resize: square"):
        connector(features, torch.tensor([36, 20]))
    assert connector(features[:36], torch.tensor([36])).shape == (9, 1, config.text.hidden_size)

    four = dataclasses.replace(config, connector=dataclasses.replace(config.connector, scale_factor=4))
    with pytest.raises(ValueError, match="scale_factor=4 does not divide the vision patch grid of 6"):
        shuffle.build(four, ParallelConfig(), PrecisionConfig(), True)
    clip = dataclasses.replace(config, vision=dataclasses.replace(config.vision, kind="clip", hidden_act="quick_gelu"))
    with pytest.raises(ValueError, match="one token per patch of a 6x6 grid; the 'clip' encoder returns 37"):
        shuffle.tokens_per_image(clip)


def test_pixel_shuffle_counts_match_transformers_module():
    """Parameters (perf/memory_model.py) and forward FLOPs (perf/flops.py) of the connector, from its
    recipe, against transformers' Idefics3 model of the same config."""
    from megatron_vlm.perf import flops, memory_model

    config = family_config("idefics3")
    hf = random_hf_model(config)
    projection = hf.model.connector.modality_projection.proj
    assert memory_model.connector_parameters(config).sharded == projection.weight.numel()
    padding_rows = 2 * (config.padded_vocab_size - config.text.vocab_size) * config.text.hidden_size
    assert memory_model.model_parameters(config) == sum(p.numel() for p in hf.parameters()) + padding_rows
    patches = (config.vision.image_size // config.vision.patch_size) ** 2
    tokens = patches // config.connector.scale_factor**2
    vision_only = recipe("vision", "siglip").forward_flops(config.vision, patches)
    assert flops.vision_forward_flops(config, patches) - vision_only == 2 * tokens * projection.weight.numel()


# --- configs ---------------------------------------------------------------------------------------


def test_idefics3_8b_config_reads_back_and_unmodelled_fields_are_refused():
    from transformers import Idefics3Config

    config = load_model_preset("idefics3-8b")
    assert recipe("connector", "pixel_shuffle").tokens_per_image(config) == 169  # 364 px: 26x26 -> 13x13
    written = to_hf_config_dict(config)
    hf = Idefics3Config.from_dict(json.loads(json.dumps(written)))
    assert (hf.scale_factor, hf.image_token_id, hf.text_config.vocab_size) == (2, 128257, 128259)
    assert hf.vision_config.model_type == "idefics3_vision" and hf.text_config.model_type == "llama"
    assert from_hf_config(written) == config
    for section, key, value in (("vision_config", "hidden_act", "gelu"), ("text_config", "attention_bias", True)):
        changed = json.loads(json.dumps(written))
        changed[section][key] = value
        with pytest.raises(ValueError, match=f"{section}.{key}={value!r}"):
            from_hf_config(changed)


def test_idefics3_export_refuses_a_tokenizer_that_does_not_fit(tmp_path):
    """Llama-3's tokenizer is not available offline: asked for the default one, an Idefics3-8B
    export refuses, naming the tokenizer and the vocabulary, and writes nothing."""
    with pytest.raises(ValueError, match=r"tokenizer mistral does not fit the model.*vocabulary 128259"):
        convert.save_processor(tmp_path, load_model_preset("idefics3-8b"), None)
    assert not list(tmp_path.iterdir())


# --- converters ------------------------------------------------------------------------------------


def read_hf_tensors(directory):
    from safetensors import safe_open

    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for name, file in weight_map.items():
        with safe_open(str(directory / file), "pt") as handle:
            tensors[name] = handle.get_tensor(name)
    return tensors


@pytest.mark.first_env_only
@pytest.mark.multiprocess
def test_idefics3_round_trip_through_tp2pp2_is_bit_exact_loads_and_verifies(tmp_path):
    """A tiny Idefics3 (real 32,003-token vocabulary, so the Mistral tokenizer fits) saved by
    transformers in shards -> Megatron TP2 x PP2 -> HF: every tensor equal, the export loads and
    generates in transformers, and verify_conversion passes on real photos."""
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    from megatron_vlm.conversion.verify import default_photos

    random_hf_model(load_model_preset("tiny_idefics3"), seed=5).save_pretrained(tmp_path / "hf", max_shard_size="2MB")
    meg, exported = tmp_path / "tp2pp2", tmp_path / "exported"
    layout = ["--tp", "2", "--pp", "2", "--dtype", "fp32"]
    output = run_tool("convert_hf_to_megatron.py", "--hf", str(tmp_path / "hf"), "--out", str(meg), *layout)
    assert "at TP2 x PP2" in output and "in float32 (as asked)" in output
    run_tool("convert_megatron_to_hf.py", "--megatron", str(meg), "--out", str(exported), "--tokenizer", "mistral")
    original, back = read_hf_tensors(tmp_path / "hf"), read_hf_tensors(exported)
    assert set(original) == set(back) and len(original) > 1
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert json.loads((exported / "config.json").read_text())["model_type"] == "idefics3"

    model = Idefics3ForConditionalGeneration.from_pretrained(str(exported)).eval()
    processor = AutoProcessor.from_pretrained(str(exported))
    assert type(processor).__name__ == "Idefics3Processor" and processor.image_seq_len == 9
    inputs = processor(text=["<image>A photo of"], images=[[default_photos()[0]]], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4

    verified = run_tool("verify_conversion.py", "--hf", str(tmp_path / "hf"), "--megatron", str(meg))
    result = json.loads(verified.strip().splitlines()[-1])
    assert result["passed"] and result["max_abs_diff"] <= TOLERANCE and result["top1_agreement"] == 1.0
    assert result["images"] == 4


def test_idefics2_llama_round_trip_is_bit_exact(megatron_single_process, tmp_path):
    """Idefics2 with a Llama decoder (Llama-3 RoPE scaling) -> Megatron -> HF, in process: every
    tensor and the config come back."""
    config = family_config("idefics2-llama")
    random_hf_model(config, seed=7).save_pretrained(tmp_path / "hf")
    convert.hf_to_megatron(tmp_path / "hf", tmp_path / "meg", ParallelConfig(), "fp32")
    convert.megatron_to_hf(tmp_path / "meg", tmp_path / "exported")
    original, back = read_hf_tensors_any(tmp_path / "hf"), read_hf_tensors_any(tmp_path / "exported")
    assert set(original) == set(back)
    assert all(torch.equal(back[name], tensor) for name, tensor in original.items())
    written = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert written["text_config"]["rope_parameters"]["rope_type"] == "llama3"
    back_config = from_hf_config(written)
    assert (back_config.vision, back_config.connector, back_config.text) == (
        config.vision,
        config.connector,
        config.text,
    )
    assert back_config.image_token_id == config.image_token_id


def read_hf_tensors_any(directory):
    """A single-file or sharded safetensors checkpoint's tensors."""
    if (directory / "model.safetensors.index.json").is_file():
        return read_hf_tensors(directory)
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_unsupported_model_type_is_refused_by_name(tmp_path):
    (tmp_path / "llava").mkdir()
    llava = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "image_token_index": 32000}
    (tmp_path / "llava" / "config.json").write_text(json.dumps(llava))
    with pytest.raises(RuntimeError, match=r"model_type='llava', which this converter does not support") as error:
        run_tool("convert_hf_to_megatron.py", "--hf", str(tmp_path / "llava"), "--out", str(tmp_path / "out"))
    assert "idefics3 (Idefics3ForConditionalGeneration)" in str(error.value)
    assert not (tmp_path / "out").exists()
