"""The analytic memory model against real runs: exact parameter counts, the activations autograd
really keeps, and peak memory of real multi-process training steps at several layouts."""

import json
from collections import defaultdict

import pytest
import torch
from parity import run_torchrun, tiny_config

from megatron_vlm.config import ParallelConfig, PrecisionConfig, load_model_preset
from megatron_vlm.models.idefics2 import build_model_chunks
from megatron_vlm.perf import memory_model
from megatron_vlm.perf.workload import synthetic_micro_batch


def test_8b_parameter_count_matches_transformers_count():
    config = load_model_preset("idefics2-8b")
    padding_rows = config.padded_vocab_size - config.text.vocab_size
    # transformers' Idefics2ForConditionalGeneration: 8,402,768,112 (tests/test_presets.py)
    assert memory_model.model_parameters(config) - 2 * padding_rows * config.text.hidden_size == 8_402_768_112


def test_saved_activations_match_the_formula(megatron_single_process):
    """What autograd keeps for backward in one forward, module by module (deduplicated storages)."""
    config = tiny_config()
    (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
    work = memory_model.Workload(micro_batch_size=2, seq_length=96, images=2, patches_per_image=16)
    batch = synthetic_micro_batch(config, work)
    inputs = {
        k: batch[k]
        for k in ("input_ids", "position_ids", "document_ids", "pixel_values", "pixel_attention_mask", "labels")
    }
    owner, saved = ["other"], {}

    def enter(name):
        def hook(*_):
            owner.append(name)

        return hook

    def leave(*_):
        owner.pop()

    handles = []
    for name, module in model.named_modules():
        if (
            name == "vision"
            or name == "connector"
            or (name.startswith("language_model.decoder.layers.") and name.count(".") == 3)
        ):
            handles.append(module.register_forward_pre_hook(enter("layer" if "layers" in name else "vision")))
            handles.append(module.register_forward_hook(leave))

    def pack(tensor):
        saved.setdefault(tensor.untyped_storage().data_ptr(), (owner[-1], tensor.untyped_storage().nbytes()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**inputs)
    for handle in handles:
        handle.remove()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = defaultdict(int)
    for pointer, (name, size) in saved.items():
        if pointer not in parameters:
            measured[name] += size
    setup = memory_model.TrainingSetup(parallel=ParallelConfig())
    tokens = work.micro_batch_size * work.seq_length
    per_layer = memory_model.decoder_layer_activations(config, setup, tokens, work.micro_batch_size, work.seq_length)
    assert measured["layer"] == pytest.approx(config.text.num_layers * per_layer, rel=0.01)
    vision = memory_model.vision_activations(config, setup, work.images, work.patches_per_image)
    assert measured["vision"] == pytest.approx(vision, rel=0.1)
    output = memory_model.output_activations(config, setup, tokens)
    assert measured["other"] == pytest.approx(output, rel=0.1)


LAYOUTS = {
    "tp2": ["--tp", "2"],
    "pp2-vpp2": ["--pp", "2", "--vpp", "2", "--micro-batches", "4"],
    "dp2-distributed-optimizer-bf16": ["--distributed-optimizer", "--dtype", "bfloat16"],
    "tp2-recompute-full": ["--tp", "2", "--recompute", "full"],
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_predicted_peak_within_15_percent_of_measured(layout, tmp_path, monkeypatch):
    # glibc otherwise keeps freed large blocks in its heap (a dynamic mmap threshold), so resident
    # memory would follow the allocator's history rather than the live tensors.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    run_torchrun("memory_worker.py", 2, [*LAYOUTS[layout], "--out", str(tmp_path)], timeout=900)
    results = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert len(results) == 2
    for result in results:
        assert result["parameters"] == result["predicted"]["parameters"]
        ratio = result["predicted_bytes"] / result["measured_bytes"]
        assert 0.85 <= ratio <= 1.15, f"{layout} rank {result['rank']}: predicted/measured = {ratio:.3f}"


@pytest.mark.parametrize(
    ("preset", "architecture"),
    [
        ("idefics1-9b", "IdeficsForVisionText2Text"),
        ("idefics3-8b", "Idefics3ForConditionalGeneration"),
        ("idefics2-8b-llama1", "Idefics2ForConditionalGeneration"),
    ],
)
def test_new_8b_parameter_counts_match_transformers(preset, architecture):
    """The memory model's (and planner's) parameter count of each new 7-8B preset equals that of
    transformers' model of it (built on the meta device), the vocabulary padding aside."""
    import transformers

    from megatron_vlm.conversion.hf_config import to_hf_config

    config = load_model_preset(preset)
    with torch.device("meta"):
        hf = getattr(transformers, architecture)(to_hf_config(config))
    padding_rows = config.padded_vocab_size - config.text.vocab_size
    expected = sum(p.numel() for p in hf.parameters())
    assert memory_model.model_parameters(config) - 2 * padding_rows * config.text.hidden_size == expected


def test_cross_attention_blocks_in_every_chunk_and_their_parameters(megatron_single_process):
    """Gated blocks go where Megatron places their layers (plain, uneven first stage, interleaved),
    and a stage's parameters are its modules' own."""
    import dataclasses

    from parity import family_config

    config = family_config("idefics1")  # 4 layers, a block before layers 0 and 2
    for parallel, expected in (
        (ParallelConfig(), [[2]]),
        (ParallelConfig(pipeline_parallel=2, decoder_layers_in_first_stage=1), [[1], [1]]),
        (ParallelConfig(pipeline_parallel=2, decoder_layers_in_first_stage=3), [[2], [0]]),
        (ParallelConfig(pipeline_parallel=2, virtual_pipeline=2), [[1, 1], [0, 0]]),  # layers 0, 2 | 1, 3
    ):
        placed = [
            [c.gated_blocks for c in memory_model.chunks_of_stage(config, parallel, s)] for s in range(len(expected))
        ]
        assert placed == expected, parallel
    (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
    assert memory_model.model_parameters(config) == sum(p.numel() for p in model.parameters())
    vector = dataclasses.replace(
        config, cross_attention=dataclasses.replace(config.cross_attention, alpha_type="vector")
    )
    (model,) = build_model_chunks(vector, ParallelConfig(), PrecisionConfig())
    assert memory_model.model_parameters(vector) == sum(p.numel() for p in model.parameters())


def test_cross_attention_saved_activations_match_the_formula(megatron_single_process):
    """What autograd keeps for backward inside the gated cross-attention blocks of one forward."""
    from parity import family_config

    config = family_config("idefics1")
    (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
    work = memory_model.Workload(micro_batch_size=2, seq_length=96, images=2, patches_per_image=36)
    batch = synthetic_micro_batch(config, work)
    inputs = {
        k: batch[k]
        for k in ("input_ids", "position_ids", "document_ids", "pixel_values", "pixel_attention_mask", "labels")
    }
    inside, saved = [False], {}

    def enter(*_):
        inside.append(True)

    def leave(*_):
        inside.pop()

    handles = []
    for name, module in model.named_modules():
        if name.endswith(".gated_cross_attention"):
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))

    def pack(tensor):
        if inside[-1]:
            saved.setdefault(tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**inputs)
    for handle in handles:
        handle.remove()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(size for pointer, size in saved.items() if pointer not in parameters)
    setup = memory_model.TrainingSetup(parallel=ParallelConfig())
    context = memory_model.cross_attention_context(config, work, pipelined=False)
    blocks = memory_model.gated_blocks_in(config, 0, config.text.num_layers)
    per_block = memory_model.gated_block_activations(config, setup, work.micro_batch_size, work.seq_length, context)
    context_input = work.micro_batch_size * context * config.vision.hidden_size * 4
    assert measured == pytest.approx(blocks * per_block + context_input, rel=0.1)
