"""HF <-> Megatron converters: exact round trips, parity of converted models on real photos,
resharding, SigLIP + Mistral starts, and clear refusals of bad input."""

import json
import shutil

import pytest
import torch
from parity import run_tool, run_torchrun
from safetensors import safe_open

from megatron_vlm.config import ParallelConfig, load_model_preset
from megatron_vlm.conversion import convert
from megatron_vlm.conversion.verify import random_hf_model

pytestmark = pytest.mark.multiprocess


def read_hf_tensors(directory):
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for name, file in weight_map.items():
        with safe_open(str(directory / file), "pt") as handle:
            tensors[name] = handle.get_tensor(name)
    return tensors


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny Idefics2 (real 32,003-token vocabulary) saved by transformers in several shards,
    converted at TP2 x PP2 by the tool."""
    root = tmp_path_factory.mktemp("conversion")
    random_hf_model(load_model_preset("tiny"), seed=5).save_pretrained(root / "hf", max_shard_size="2MB")
    output = run_tool(
        "convert_hf_to_megatron.py",
        "--hf",
        str(root / "hf"),
        "--out",
        str(root / "tp2pp2"),
        "--tp",
        "2",
        "--pp",
        "2",
        "--dtype",
        "fp32",
    )
    assert "wrote" in output and "peak RSS" in output
    return root


def test_round_trip_through_tp2pp2_is_bit_exact_and_loads_in_transformers(converted):
    from transformers import AutoProcessor, Idefics2ForConditionalGeneration

    assert len(list((converted / "hf").glob("*.safetensors"))) > 1
    output = run_tool(
        "convert_megatron_to_hf.py",
        "--megatron",
        str(converted / "tp2pp2"),
        "--out",
        str(converted / "exported"),
        "--tokenizer",
        "mistral",
        "--max-shard-size",
        "3MB",
    )
    assert "peak RSS" in output
    original, exported = read_hf_tensors(converted / "hf"), read_hf_tensors(converted / "exported")
    assert set(original) == set(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name

    model = Idefics2ForConditionalGeneration.from_pretrained(str(converted / "exported")).eval()
    processor = AutoProcessor.from_pretrained(str(converted / "exported"))
    from megatron_vlm.conversion.verify import default_photos

    inputs = processor(text=["<image>A photo of"], images=[[default_photos()[0]]], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize(("tp", "pp"), [pytest.param(1, 1, marks=pytest.mark.first_env_only), (2, 2)])
def test_verify_conversion_on_real_photos(converted, tp, pp):
    output = run_tool(
        "verify_conversion.py",
        "--hf",
        str(converted / "hf"),
        "--megatron",
        str(converted / "tp2pp2"),
        "--tp",
        str(tp),
        "--pp",
        str(pp),
    )
    result = json.loads(output.strip().splitlines()[-1])
    assert result["passed"] and result["max_abs_diff"] <= 1e-4
    assert result["top1_agreement"] == 1.0 and result["images"] == 4


def test_tp2pp2_checkpoint_loads_at_other_layouts_with_identical_logits(converted, tmp_path):
    for name, nproc, args in (
        ("tp1pp1", 1, []),
        ("tp1pp2", 2, ["--pp", "2"]),
        ("pp2vpp2", 2, ["--pp", "2", "--vpp", "2"]),
    ):
        run_torchrun(
            "checkpoint_worker.py", nproc, ["--load", str(converted / "tp2pp2"), *args, "--out", str(tmp_path / name)]
        )
    reference = torch.load(tmp_path / "tp1pp1")
    assert torch.equal(torch.load(tmp_path / "tp1pp2"), reference)
    assert torch.equal(torch.load(tmp_path / "pp2vpp2"), reference)


def verified(hf_dir, megatron_dir):
    """verify_conversion.py with its defaults: its JSON line."""
    output = run_tool("verify_conversion.py", "--hf", str(hf_dir), "--megatron", str(megatron_dir))
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.first_env_only
def test_documented_flow_with_defaults_keeps_fp32_and_verifies(converted, tmp_path):
    """convert_hf_to_megatron.py then verify_conversion.py, every option at its default, on an
    fp32 source (as idefics2-8b is stored): the checkpoint stays fp32 and verifies at 1e-4."""
    from megatron_vlm.models.checkpoint_io import read_metadata

    output = run_tool("convert_hf_to_megatron.py", "--hf", str(converted / "hf"), "--out", str(tmp_path / "meg"))
    result = verified(converted / "hf", tmp_path / "meg")
    assert result["passed"] and result["max_abs_diff"] <= 1e-4 and result["top1_agreement"] == 1.0
    assert (result["dtype"], result["compute_dtype"], result["tolerance"]) == ("float32", "float32", 1e-4)
    assert "in float32 (the source's dtype)" in output
    assert read_metadata(tmp_path / "meg")["dtype"] == "float32"


@pytest.mark.first_env_only
def test_bf16_conversion_verifies_against_the_same_bf16_weights(converted, tmp_path):
    """A bf16 checkpoint of an fp32 source is checked against transformers' model loaded in bf16
    (the same rounded weights), so the default tolerance holds: no slack for the rounding."""
    output = run_tool(
        "convert_hf_to_megatron.py", "--hf", str(converted / "hf"), "--out", str(tmp_path / "meg"), "--dtype", "bf16"
    )
    result = verified(converted / "hf", tmp_path / "meg")
    assert result["passed"] and result["max_abs_diff"] <= 1e-4 and result["top1_agreement"] == 1.0
    assert (result["dtype"], result["tolerance"]) == ("bfloat16", 1e-4)
    assert "in bfloat16 (as asked)" in output


@pytest.mark.first_env_only
def test_verify_fails_on_a_different_model(converted, tmp_path):
    random_hf_model(load_model_preset("tiny"), seed=6).save_pretrained(tmp_path / "other")
    with pytest.raises(RuntimeError, match='"passed": false'):
        run_tool("verify_conversion.py", "--hf", str(tmp_path / "other"), "--megatron", str(converted / "tp2pp2"))


# --- SigLIP + Mistral ------------------------------------------------------------------------


def save_siglip_and_mistral(root, with_prefix):
    from safetensors.torch import save_file
    from transformers import MistralConfig, MistralForCausalLM, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    siglip = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=56,
            patch_size=14,
        )
    )
    siglip.save_pretrained(root / "siglip")
    if with_prefix:  # the key form older transformers wrote
        state = {
            f"vision_model.{k.removeprefix('vision_model.')}": v.contiguous() for k, v in siglip.state_dict().items()
        }
        for file in (root / "siglip").glob("*.safetensors"):
            file.unlink()
        save_file(state, str(root / "siglip" / "model.safetensors"), metadata={"format": "pt"})
    mistral = MistralForCausalLM(
        MistralConfig(
            vocab_size=32000,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    mistral.save_pretrained(root / "mistral")
    return siglip, mistral


@pytest.mark.parametrize("with_prefix", [False, True])
def test_siglip_and_mistral_land_exactly_and_train(megatron_single_process, tmp_path, with_prefix):
    from megatron.core.optimizer import OptimizerConfig

    from megatron_vlm.config import PrecisionConfig
    from megatron_vlm.data.batch import make_batch, training_inputs
    from megatron_vlm.models.checkpoint_io import load_model, model_config_of, read_metadata
    from megatron_vlm.models.idefics2 import build_model_chunks
    from megatron_vlm.training.step import build_optimizer, train_step, wrap_ddp

    siglip, mistral = save_siglip_and_mistral(tmp_path, with_prefix)
    connector = load_model_preset("tiny").connector
    report = convert.separate_to_megatron(
        tmp_path / "siglip", tmp_path / "mistral", tmp_path / "meg", ParallelConfig(), connector, image_size=224
    )
    assert report.ignored and all(n.startswith(("head.", "vision_model.head.")) for n in report.ignored)
    convert.megatron_to_hf(tmp_path / "meg", tmp_path / "hf")
    exported = read_hf_tensors(tmp_path / "hf")

    for name, tensor in siglip.state_dict().items():
        if name.startswith(("head.", "vision_model.head.")):
            assert name in report.ignored or f"vision_model.{name}" in report.ignored
            continue
        target = "model.vision_model." + name.removeprefix("vision_model.")
        if name.endswith("position_embedding.weight"):
            # 4x4 grid resized to 224 px / 14, as transformers' SigLIP resizes it for a larger image
            # (its interpolate_pos_encoding: bicubic over the 2-D grid): a transposed or shuffled grid differs.
            embeddings = next(m for m in siglip.modules() if hasattr(m, "interpolate_pos_encoding"))
            with torch.no_grad():
                resized = embeddings.interpolate_pos_encoding(torch.zeros(1, 16 * 16, 64), 224, 224)[0]
            assert exported[target].shape == (16 * 16, 64)
            assert torch.allclose(exported[target], resized, rtol=0, atol=1e-6)
            assert not torch.allclose(exported[target].reshape(16, 16, 64).transpose(0, 1).reshape(256, 64), resized)
        else:
            assert torch.equal(exported[target], tensor), name
    for name, tensor in mistral.state_dict().items():
        target = "lm_head.weight" if name == "lm_head.weight" else "model.text_model." + name.removeprefix("model.")
        if name in ("lm_head.weight", "model.embed_tokens.weight"):
            assert torch.equal(exported[target][:32000], tensor)
            assert torch.allclose(exported[target][32000:], tensor.mean(0).expand(3, -1), atol=1e-6)
        else:
            assert torch.equal(exported[target], tensor), name

    config = model_config_of(read_metadata(tmp_path / "meg"))
    assert (config.text.vocab_size, config.image_token_id) == (32003, 32001)
    chunks = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
    load_model(chunks, tmp_path / "meg", config)
    batch = make_batch(config)
    model = wrap_ddp(chunks)
    optimizer = build_optimizer(model, OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.0))
    connector_before = chunks[0].connector.latents.detach().clone()
    step = train_step(model, optimizer, [training_inputs(batch)])
    assert step["updated"] and torch.isfinite(torch.tensor(step["loss"])) and step["grad_norm"] > 0
    assert not torch.equal(chunks[0].connector.latents.detach(), connector_before)


# --- bad input ---------------------------------------------------------------------------------


def test_missing_and_unexpected_tensors_are_named_and_nothing_is_written(megatron_single_process, converted, tmp_path):
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(converted / "hf", broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    file = index["weight_map"]["model.text_model.layers.2.mlp.up_proj.weight"]
    tensors = {}
    with safe_open(str(broken / file), "pt") as handle:
        for name in handle.keys():
            tensors[name] = handle.get_tensor(name)
    del tensors["model.text_model.layers.2.mlp.up_proj.weight"]
    tensors["model.text_model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
    save_file(tensors, str(broken / file))
    index["weight_map"]["model.text_model.layers.9.mlp.up_proj.weight"] = file
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model.text_model.layers.9.mlp.up_proj.weight"):
        convert.hf_to_megatron(broken, tmp_path / "out", ParallelConfig())
    del index["weight_map"]["model.text_model.layers.9.mlp.up_proj.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    # The index still lists the tensor its shard lost: named with its file.
    with pytest.raises(
        ValueError, match=f"cannot read tensor model.text_model.layers.2.mlp.up_proj.weight from .*{file}"
    ):
        convert.hf_to_megatron(broken, tmp_path / "out", ParallelConfig())
    del index["weight_map"]["model.text_model.layers.2.mlp.up_proj.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="missing HF tensor: model.text_model.layers.2.mlp.up_proj.weight"):
        convert.hf_to_megatron(broken, tmp_path / "out", ParallelConfig())
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.*"))


def test_config_mismatch_wrong_shape_and_unreadable_file(megatron_single_process, converted, tmp_path):
    mismatched = tmp_path / "mismatched"
    shutil.copytree(converted / "hf", mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (mismatched / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shape mismatch: language_model.decoder.layers.0.mlp.linear_fc1.weight"):
        convert.hf_to_megatron(mismatched, tmp_path / "out", ParallelConfig())

    truncated = tmp_path / "truncated"
    shutil.copytree(converted / "hf", truncated)
    shard = sorted(truncated.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=shard.name):
        convert.hf_to_megatron(truncated, tmp_path / "out", ParallelConfig())

    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        convert.hf_to_megatron(tmp_path / "nowhere", tmp_path / "out", ParallelConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        convert.hf_to_megatron(tmp_path / "empty", tmp_path / "out", ParallelConfig())
    assert not (tmp_path / "out").exists()


def test_mismatched_megatron_checkpoint_and_existing_output_are_refused(megatron_single_process, converted, tmp_path):
    import dataclasses

    from megatron_vlm.config import PrecisionConfig
    from megatron_vlm.models.checkpoint_io import load_model, model_config_of, read_metadata
    from megatron_vlm.models.idefics2 import build_model_chunks

    config = model_config_of(read_metadata(converted / "tp2pp2"))
    other = dataclasses.replace(config, text=dataclasses.replace(config.text, num_layers=2))
    chunks = build_model_chunks(other, ParallelConfig(), PrecisionConfig())
    with pytest.raises(ValueError, match="text.num_layers: checkpoint 4, model 2"):
        load_model(chunks, converted / "tp2pp2", other)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        convert.megatron_to_hf(converted / "tp2pp2", converted / "hf")
    with pytest.raises(FileNotFoundError, match="megatron_vlm.json is missing"):
        read_metadata(tmp_path)
