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
        for k in ("input_ids", "position_ids", "attention_mask", "pixel_values", "pixel_attention_mask", "labels")
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
