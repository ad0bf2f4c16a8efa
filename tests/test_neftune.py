"""NEFTune (issue #23): the noise scale the NEFTune paper defines, per packed document, on text
tokens only, and only while training; seeded by the micro-batch's data. (A run saved and resumed
with NEFTune on equals the uninterrupted one: tests/test_training.py's bf16 kill-and-resume case.)"""

import dataclasses
import math

import pytest
import torch
from parity import make_batch, megatron_inputs, tiny_config

from megatron_vlm.models.neftune import neftune_noise, noise_seed

IMAGE = 7


def test_the_noise_is_uniform_at_the_papers_scale_per_document_on_text_only():
    hidden, alpha = 64, 5.0
    # Row 0: documents of 6 and 10 tokens (two image positions in the second); row 1: 12 tokens + padding.
    document_ids = torch.tensor([[0] * 6 + [1] * 10, [0] * 12 + [-1] * 4])
    input_ids = torch.full((2, 16), 3)
    input_ids[0, 8:10] = IMAGE
    is_text = input_ids != IMAGE
    noise = neftune_noise(torch.zeros(16, 2, hidden), document_ids, is_text, alpha, seed=11)
    assert noise.shape == (16, 2, hidden)
    spans = [(0, slice(0, 6), 6), (0, slice(10, 16), 10), (0, slice(6, 8), 10), (1, slice(0, 12), 12)]
    scaled = []
    for row, span, length in spans:
        bound = alpha / math.sqrt(length * hidden)  # the NEFTune paper's alpha / sqrt(L d)
        values = noise[span, row]
        assert values.abs().max() <= bound * (1 + 1e-6)
        assert values.abs().max() >= 0.95 * bound  # reaches the edges of its interval
        scaled.append(values.flatten() / bound)
    scaled = torch.cat(scaled)  # 2,816 draws of U(-1, 1): mean 0 (sd 0.011), variance 1/3
    assert abs(float(scaled.mean())) < 0.05 and abs(float(scaled.var()) - 1 / 3) < 0.03
    assert not noise[8:10, 0].any() and not noise[12:, 1].any()  # images and padding: none
    assert torch.equal(noise, neftune_noise(torch.zeros(16, 2, hidden), document_ids, is_text, alpha, seed=11))
    assert not torch.equal(noise, neftune_noise(torch.zeros(16, 2, hidden), document_ids, is_text, alpha, seed=12))


def test_the_seed_follows_the_data_not_the_layout():
    meta = {"lane": 3, "source": "cauldron", "positions": [17, 18], "num_images": 2}
    assert noise_seed(1234, meta) == noise_seed(1234, {**meta, "num_images": 5})  # what it holds, nothing else
    assert len({noise_seed(1234, meta), noise_seed(1235, meta), noise_seed(1234, {**meta, "lane": 4})}) == 3
    assert noise_seed(1234, meta) != noise_seed(1234, {**meta, "positions": [17, 19]})


@pytest.mark.parametrize("family", ["idefics2", "idefics1"])  # Idefics1: the cross-attention model
def test_noise_only_while_training(megatron_single_process, family):
    from parity import family_batch, family_config

    from megatron_vlm.config import ParallelConfig, PrecisionConfig
    from megatron_vlm.models.idefics2 import build_model_chunks, gather_logits

    config = tiny_config() if family == "idefics2" else family_config("idefics1")
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, attention_dropout=0.0))
    torch.manual_seed(0)
    (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
    inputs = megatron_inputs(make_batch(config) if family == "idefics2" else family_batch(config))

    def logits(training: bool, seed: int | None) -> torch.Tensor:
        model.train(training)
        with torch.no_grad():
            return gather_logits(model(**inputs, noise_seed=seed), config.text.vocab_size)

    clean = logits(False, None)
    model.neftune_alpha = 5.0
    assert torch.equal(logits(False, 3), clean)  # evaluation and generation: no noise
    assert torch.equal(logits(True, None), clean)  # no seed (not a training step): no noise
    noisy = logits(True, 3)
    assert float((noisy - clean).abs().max()) > 1e-3
    assert torch.equal(logits(True, 3), noisy)  # the same micro-batch, the same noise
    model.neftune_alpha = 0.0
    assert torch.equal(logits(True, 3), clean)


def test_a_negative_alpha_is_refused():
    from pathlib import Path

    from megatron_vlm.config import load_run_config
    from megatron_vlm.training.preflight import check_batch_layout

    run = load_run_config(Path(__file__).resolve().parents[1] / "examples/tiny_cpu.yaml", ["training.neftune_alpha=-1"])
    with pytest.raises(ValueError, match="neftune_alpha=-1.0 must be >= 0"):
        check_batch_layout(run, 1)
