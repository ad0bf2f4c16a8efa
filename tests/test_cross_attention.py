"""The cross-attention architecture (Flamingo / Idefics1: ``models/cross_attention.py``) against
transformers' IdeficsForVisionText2Text: logits at TP1 (in process), TP2 and TP2 x PP2 (real
processes, the image tokens travelling between pipeline stages), training steps equal across the
layouts, the image-attention rule against transformers' processor, freezing and LoRA with the new
blocks, refusals by name, and the converters' round trip."""

import dataclasses
import json

import pytest
import torch
from parity import (
    counted_checkpoints,
    family_batch,
    family_config,
    hf_logits,
    hf_model,
    megatron_inputs,
    recompute_granularities,
    run_tool,
    run_torchrun,
    training_inputs,
)
from workers.family_worker import measure

from megatron_vlm.backbones import text_tokens_per_image
from megatron_vlm.config import ParallelConfig, PrecisionConfig, TrainableConfig, load_model_preset
from megatron_vlm.conversion.families import family
from megatron_vlm.conversion.mapping import load_hf_weights
from megatron_vlm.conversion.verify import random_hf_model
from megatron_vlm.data.batch import attended_images
from megatron_vlm.models.idefics2 import build_model_chunks
from megatron_vlm.models.pipeline import forward_logits

TOLERANCE = 1e-4
STEPS = 3
NAME = "idefics1"


def _ranks(out, count):
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(count)]


@pytest.fixture(scope="module")
def tp1(megatron_single_process):
    """The tiny Idefics1 at TP1 in process: logits against transformers, then training on an image
    batch and a batch without images."""
    return measure(family_config(NAME), ParallelConfig(), STEPS, text_only_micro_batch=True)


@pytest.fixture(scope="module")
def loaded(megatron_single_process):
    """(config, transformers model, our TP1 chunks with its weights)."""
    config = family_config(NAME)
    hf = hf_model(config)
    state = hf.state_dict()
    chunks = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
    load_hf_weights(chunks, state.__getitem__, set(state), config, 0, 1)
    return config, hf, chunks


def test_logits_match_transformers_at_tp1_and_training_lowers_the_loss(tp1):
    assert tp1["hf_tensors_used"] == tp1["hf_tensors"]  # every transformers tensor is mapped
    assert any(".gated_cross_attn_layers.1." in name for name in tp1["hf_tensors"])
    assert tp1["images"] == 4
    assert tp1["logits_max_abs_diff"] <= TOLERANCE
    assert tp1["logits_max_abs"] > 0.1  # the comparison is not between near-zeros
    losses = [step["loss"] for step in tp1["steps"]]
    assert all(step["updated"] for step in tp1["steps"]) and losses[-1] < losses[0]
    # Greedy generation (the gated blocks' cached image keys) equals transformers' generate.
    assert tp1["generated"] == tp1["hf_generated"] and tp1["generation_margin"] > 1e-4


def test_an_image_reaches_only_the_tokens_after_it_in_its_row(loaded):
    """Changing the second image of a two-image row changes that row's logits from its <image>
    token on, and nothing before it or in other rows; transformers agrees on the changed batch."""
    config, hf, chunks = loaded
    batch = family_batch(config)
    changed = dataclasses.replace(batch, pixel_values=batch.pixel_values.clone())
    changed.pixel_values[2] = torch.randn_like(changed.pixel_values[2])  # row 2's second image
    before = forward_logits(chunks, megatron_inputs(batch), config.text.vocab_size)
    after = forward_logits(chunks, megatron_inputs(changed), config.text.vocab_size)
    second = int((batch.input_ids[2] == config.image_token_id).nonzero()[1])
    difference = (after - before).abs().amax(dim=-1)  # [b, s]
    assert difference[2, second:].min() > 1e-6
    assert difference[2, :second].max() == 0 and difference[[0, 1, 3]].max() == 0
    valid = changed.padding.bool()
    assert (after - hf_logits(hf, changed, config))[valid].abs().max() <= TOLERANCE


def test_attended_images_follow_transformers_processor_on_packed_documents():
    """Packed rows (documents ending with EOS): each token attends the latest image at or before it
    in its own document, as transformers' image_attention_mask_for_packed_input_ids."""
    from transformers.models.idefics.processing_idefics import image_attention_mask_for_packed_input_ids

    image, eos = 7, 2

    class Tokens:
        eos_token_id = eos

        def convert_tokens_to_ids(self, token):
            return image

    input_ids = torch.tensor(
        [
            [5, image, 5, 5, eos, 5, 5, image, 5, image, 5, eos, 5, 5],
            [5, 5, image, image, 5, eos, image, 5, eos, 5, image, 5, 5, eos],
        ]
    )
    # A document ends at its EOS: the next token starts the next one.
    ends = torch.roll(input_ids == eos, 1, dims=1)
    ends[:, 0] = False
    documents = ends.long().cumsum(dim=1)
    theirs, _ = image_attention_mask_for_packed_input_ids(input_ids.clone(), Tokens(), "pt")
    assert torch.equal(attended_images(input_ids, documents, image), theirs)


def test_one_image_token_per_image_in_the_text():
    config = family_config(NAME)
    assert text_tokens_per_image(config) == 1
    assert text_tokens_per_image(load_model_preset("tiny")) == load_model_preset("tiny").connector.num_latents


def test_without_resampler_and_with_vector_gates_matches_transformers(megatron_single_process):
    """use_resampler=False (connector kind none: the cross-attention reads the class token and every
    patch of each image), one gate per hidden unit (alpha_type vector), no q/k norms."""
    config = family_config(NAME)
    cross = dataclasses.replace(config.cross_attention, alpha_type="vector", qk_layer_norms=False)
    connector = dataclasses.replace(config.connector, kind="none")
    config = dataclasses.replace(config, connector=connector, cross_attention=cross)
    assert family(NAME).to_hf_config_dict(config)["use_resampler"] is False
    result = measure(config, ParallelConfig(), 1, text_only_micro_batch=False)
    assert result["hf_tensors_used"] == result["hf_tensors"]
    assert not any("perceiver" in name for name in result["hf_tensors"])
    assert result["logits_max_abs_diff"] <= TOLERANCE and result["logits_max_abs"] > 0.1


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recomputed_activations_give_the_same_loss_and_gradients(loaded, recompute):
    """The cross-attention context passes through Megatron's full-layer recompute (checkpointed
    TransformerBlock forward) unchanged."""
    config, hf, _ = loaded
    state = hf.state_dict()
    batch = training_inputs(family_batch(config))
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "document_ids", "pixel_values", "labels")}
    grads, checkpointed = [], []
    for mode in ("none", recompute):
        (chunk,) = build_model_chunks(config, ParallelConfig(recompute=mode), PrecisionConfig())
        assert recompute_granularities([chunk]) == {mode}  # the setting reached Megatron-Core
        load_hf_weights([chunk], state.__getitem__, set(state), config, 0, 1)
        with counted_checkpoints() as count:
            (chunk.train()(**inputs) * batch["loss_mask"]).sum().backward()
        checkpointed.append(count[0])
        grads.append({n: p.grad for n, p in chunk.named_parameters() if p.grad is not None})
    # Recompute really ran: at least one checkpoint per decoder layer (full: each layer's forward;
    # selective: each core attention), none without it.
    assert checkpointed[0] == 0 and checkpointed[1] >= config.text.num_layers, checkpointed
    assert grads[0].keys() == grads[1].keys() and any(".gated_cross_attention." in n for n in grads[0])
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.multiprocess
def test_tp2pp2_sends_the_images_along_matches_transformers_and_trains_as_tp1(tp1, tmp_path):
    """Stage 0 (vision, connector, layer 0 and its block) is lighter than stage 1 (layers 1-3, the
    block of layer 2): stage 1's cross-attention reads the image tokens stage 0 sent, and their
    gradient comes back (the grad norm includes the vision tower's)."""
    args = ["--tp", "2", "--pp", "2", "--first-stage-layers", "1", "--family-config", NAME]
    run_torchrun(
        "family_worker.py", 4, [*args, "--steps", str(STEPS), "--text-only-micro-batch", "--out", str(tmp_path)]
    )
    ranks = _ranks(tmp_path, 4)
    assert [r["has_vision"] for r in ranks] == [[True], [True], [False], [False]]
    assert [r["decoder_layers"] for r in ranks] == [[1], [1], [3], [3]]
    assert sorted({t for r in ranks for t in r["hf_tensors_used"]}) == tp1["hf_tensors"]
    assert all(r["logits_max_abs_diff"] <= TOLERANCE for r in ranks if r["pp_rank"] == 1)
    for rank in ranks:  # generation: the image context sent once at prefill, then cached per block
        assert rank["generated"] == tp1["hf_generated"], (rank["pp_rank"], rank["generation_margin"])
        for ours, theirs in zip(rank["steps"], tp1["steps"], strict=True):
            assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
            assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5)


def test_frozen_or_lora_language_model_still_trains_its_cross_attention_blocks(megatron_single_process):
    from megatron_vlm.models.lora import apply_trainable

    config = family_config(NAME)
    chunks = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
    blocks = [n for n, _ in chunks[0].named_parameters() if ".gated_cross_attention." in n]
    assert len(blocks) == 2 * 12  # two blocks (layers 0, 2) of 12 tensors (q/k norms included)

    apply_trainable(chunks, TrainableConfig(freeze_language=True, freeze_vision=True))
    trains = {n for n, p in chunks[0].named_parameters() if p.requires_grad}
    assert set(blocks) <= trains
    assert not any(n.startswith(("language_model.", "vision.")) and n not in blocks for n in trains)
    assert any(n.startswith("connector.") for n in trains)

    apply_trainable(chunks, TrainableConfig(lora_rank=4, lora_targets=("language",)))
    adapted = {n for n, m in chunks[0].named_modules() if hasattr(m, "lora")}
    assert adapted and not any(".gated_cross_attention." in n for n in adapted)
    assert "language_model.decoder.layers.0.self_attention.linear_qkv" in adapted
    trains = {n for n, p in chunks[0].named_parameters() if p.requires_grad}
    assert set(blocks) <= trains
    assert "language_model.decoder.layers.0.self_attention.linear_qkv.weight" not in trains


def test_unsupported_layouts_and_configs_are_refused_by_name(megatron_single_process):
    config = family_config(NAME)
    precision = PrecisionConfig()
    with pytest.raises(ValueError, match="sequence_parallel is not implemented for model.architecture=cross_attention"):
        build_model_chunks(config, ParallelConfig(sequence_parallel=True), precision)
    odd = dataclasses.replace(config, cross_attention=dataclasses.replace(config.cross_attention, interval=3))
    with pytest.raises(ValueError, match=r"cross_attention.interval=3 must divide text.num_layers=4"):
        build_model_chunks(odd, ParallelConfig(), precision)
    wide = dataclasses.replace(config, vision=dataclasses.replace(config.vision, hidden_size=128, num_heads=2))
    with pytest.raises(ValueError, match=r"vision.hidden_size=128 exceeds text.hidden_size=64"):
        build_model_chunks(wide, ParallelConfig(pipeline_parallel=2), precision)
    few = dataclasses.replace(config, cross_attention=dataclasses.replace(config.cross_attention, max_images_per_row=1))
    chunks = build_model_chunks(few, ParallelConfig(), precision)
    with pytest.raises(ValueError, match=r"a row holds 2 images, above cross_attention.max_images_per_row=1"):
        forward_logits(chunks, megatron_inputs(family_batch(few)), few.text.vocab_size)


def test_config_reads_back_and_unmodelled_fields_are_refused():
    idefics1 = family(NAME)
    for config in (family_config(NAME), load_model_preset("idefics1-9b")):
        back = idefics1.from_hf_config(idefics1.to_hf_config_dict(config))
        assert (back.vision, back.connector, back.text) == (config.vision, config.connector, config.text)
        assert back.cross_attention == dataclasses.replace(config.cross_attention, max_images_per_row=8)
        assert (back.fake_image_token_id, back.image_token_id) == (config.fake_image_token_id, config.image_token_id)
    written = idefics1.to_hf_config_dict(family_config(NAME))
    written["freeze_text_layers"] = False  # a training switch: not the model's
    idefics1.from_hf_config(written)
    with pytest.raises(ValueError, match=r"dropout=0.1 is not implemented"):
        idefics1.from_hf_config({**written, "dropout": 0.1})
    assert idefics1.from_hf_config({**written, "use_resampler": False}).connector.kind == "none"
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match=r"RoPE type 'dynamic' is not implemented"):
        idefics1.from_hf_config({**written, "rope_parameters": dynamic})


@pytest.mark.multiprocess
def test_round_trip_through_tp2pp2_is_bit_exact_loads_generates_and_verifies(tmp_path):
    """The tiny_idefics1 preset (a 32,003-token vocabulary: the Mistral tokenizer + the image tokens
    fits) -> Megatron TP2 x PP2 (fp32) -> HF with the converter tools: every tensor equal (the
    decoupled vocabulary split back apart), the export and its processor load in transformers and
    generate, and verify_conversion passes on real photos."""
    from test_families import read_hf_tensors_any
    from transformers import AutoProcessor, IdeficsForVisionText2Text

    from megatron_vlm.conversion.verify import default_photos

    random_hf_model(load_model_preset("tiny_idefics1"), seed=5).save_pretrained(tmp_path / "hf")
    meg, exported = tmp_path / "tp2pp2", tmp_path / "exported"
    layout = ["--tp", "2", "--pp", "2", "--dtype", "fp32"]
    output = run_tool("convert_hf_to_megatron.py", "--hf", str(tmp_path / "hf"), "--out", str(meg), *layout)
    assert "at TP2 x PP2" in output
    run_tool("convert_megatron_to_hf.py", "--megatron", str(meg), "--out", str(exported), "--tokenizer", "mistral")
    original, back = read_hf_tensors_any(tmp_path / "hf"), read_hf_tensors_any(exported)
    assert set(original) == set(back) and "lm_head.additional_fc.weight" in back
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name

    model = IdeficsForVisionText2Text.from_pretrained(str(exported)).eval()
    processor = AutoProcessor.from_pretrained(str(exported))
    assert type(processor).__name__ == "IdeficsProcessor"
    inputs = processor(text=[[default_photos()[0], "A photo of"]], return_tensors="pt")
    assert int((inputs["input_ids"] == 32001).sum()) == 1  # one <image> token per image
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4

    verified = run_tool("verify_conversion.py", "--hf", str(tmp_path / "hf"), "--megatron", str(meg))
    result = json.loads(verified.strip().splitlines()[-1])
    assert result["passed"] and result["max_abs_diff"] <= TOLERANCE and result["top1_agreement"] == 1.0
    assert result["images"] == 4
