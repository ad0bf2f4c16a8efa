"""Generation on our model (``inference/generate.py``): greedy decoding equal to transformers'
``generate`` on the exported model, token for token, for every family we train (in process at TP1,
through ``tools/generate.py`` at TP2 x PP2 and TP2); the key/value cache equal to a cache-free loop
over our own full forward (also with a sliding window that binds, and for the CLIP + MLP variant that
has no transformers class); a prompt's output independent of its batch; sampling seeded per prompt;
the stop rules."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from generation_models import NEW_TOKENS, PROMPTS, hf_greedy, photos

from megatron_vlm.config import ParallelConfig, PrecisionConfig, load_model_preset
from megatron_vlm.data.batch import forward_inputs, micro_batch
from megatron_vlm.inference.generate import GenerationConfig, generate
from megatron_vlm.inference.loading import load_for_inference
from megatron_vlm.inference.prompts import prompt_encoder
from megatron_vlm.models.idefics2 import build_model_chunks, gather_logits

ROOT = Path(__file__).resolve().parents[1]
NEAR_TIE = 1e-4
SHARPEN_OWN = 8.0  # Megatron's initialisation gives larger logits than transformers' random one


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints):
    return {preset: tiny_checkpoints(preset) for preset in ("tiny", "tiny_idefics3", "tiny_idefics1")}


def prompts_of(encoder, indices=None):
    chosen = [PROMPTS[i] for i in (indices if indices is not None else range(len(PROMPTS)))]
    _, inputs = encoder.encode([text for text, _ in chosen], [photos(names) for _, names in chosen])
    return inputs


def near_ties(outputs) -> dict[int, list[int]]:
    return {row: out.near_ties(NEAR_TIE) for row, out in enumerate(outputs) if out.near_ties(NEAR_TIE)}


def assert_same_tokens(ours, reference, what: str) -> None:
    ties = near_ties(ours)  # reported with any mismatch: float noise may flip a near-tie
    for row, (out, expected) in enumerate(zip(ours, reference, strict=True)):
        assert out.token_ids == expected, f"{what}, prompt {row}: near-ties (prompt: steps) {ties}"
    assert not ties, f"{what}: steps within {NEAR_TIE} of a tie (prompt: steps) {ties}"


@pytest.mark.parametrize("preset", ["tiny", "tiny_idefics3", "tiny_idefics1"])
def test_greedy_generation_equals_transformers_on_the_export(checkpoints, preset):
    """Idefics2, Idefics3 and Idefics1 (cross-attention): the four prompts batched (right padding),
    with the KV cache, against transformers generating each prompt alone."""
    checkpoint = checkpoints[preset]
    chunks, config, _ = load_for_inference(checkpoint.megatron, ParallelConfig())
    encoder = prompt_encoder(config)
    ours = generate(chunks, prompts_of(encoder), GenerationConfig(max_new_tokens=NEW_TOKENS))
    assert all(len(out.token_ids) == NEW_TOKENS and out.stop_reason == "max_new_tokens" for out in ours)
    assert_same_tokens(ours, hf_greedy(checkpoint, encoder), preset)


def cache_free_greedy(model, config, inputs, new_tokens: int) -> list[list[int]]:
    """The reference the cache must equal: every step runs our full forward (the training forward,
    no cache) over each prompt followed by what it generated, one row per prompt, and takes the
    argmax at its last position."""
    document_ids = inputs["document_ids"]
    lengths = (document_ids >= 0).sum(dim=1).tolist()
    rows = [inputs["input_ids"][row, :length].tolist() for row, length in enumerate(lengths)]  # on the host
    generated = [[] for _ in rows]
    for _ in range(new_tokens):
        longest = max(len(r) + len(g) for r, g in zip(rows, generated, strict=True))
        input_ids = torch.zeros(len(rows), longest, dtype=torch.long)
        documents = torch.full((len(rows), longest), -1)
        for row, (prompt, tail) in enumerate(zip(rows, generated, strict=True)):
            input_ids[row, : len(prompt) + len(tail)] = torch.tensor(prompt + tail)
            documents[row, : len(prompt) + len(tail)] = 0
        device = inputs["pixel_values"].device
        batch = forward_inputs(
            micro_batch(
                input_ids.to(device),
                documents.to(device),
                inputs["pixel_values"],
                inputs["pixel_attention_mask"],
                config.image_token_id,
            )
        )
        with torch.no_grad():
            logits = gather_logits(model(**batch), config.text.vocab_size)
        for row, (prompt, tail) in enumerate(zip(rows, generated, strict=True)):
            tail.append(int(logits[row, len(prompt) + len(tail) - 1].argmax()))
    return generated


@pytest.mark.parametrize(
    "preset, overrides",
    [("tiny_clip_mlp", {}), ("tiny", {"sliding_window": 6})],
    ids=["clip_mlp", "mistral_window_6"],
)
def test_kv_cache_equals_a_cache_free_loop(megatron_single_process, preset, overrides):
    """Our own model, no transformers class needed (CLIP + MLP connector), and a sliding window that
    binds within the prompts and the new tokens: the cached decoding equals re-running the whole
    sequence every step."""
    base = load_model_preset(preset)
    config = dataclasses.replace(base, text=dataclasses.replace(base.text, **overrides))
    torch.manual_seed(0)
    (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
    with torch.no_grad():
        model.language_model.output_layer.weight.mul_(SHARPEN_OWN)
    model.eval()
    inputs = prompts_of(prompt_encoder(config))
    ours = generate([model], inputs, GenerationConfig(max_new_tokens=12))
    assert_same_tokens(ours, cache_free_greedy(model, config, inputs, 12), preset)


@pytest.mark.first_env_only  # our decoding loop: no Megatron-Core version changes it
def test_a_prompts_output_does_not_depend_on_its_batch(checkpoints):
    """Each prompt alone, and with the others in another order: the same tokens, greedy and sampled
    (sampling draws from a generator seeded per prompt)."""
    chunks, config, _ = load_for_inference(checkpoints["tiny"].megatron, ParallelConfig())
    encoder = prompt_encoder(config)
    sampling = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.8, seed=7)
    for generation in (GenerationConfig(max_new_tokens=10), sampling):
        batched = generate(chunks, prompts_of(encoder, [3, 1, 0, 2]), generation, sample_seeds=[3, 1, 0, 2])
        for position, index in enumerate([3, 1, 0, 2]):
            alone = generate(chunks, prompts_of(encoder, [index]), generation, sample_seeds=[index])
            assert alone[0].token_ids == batched[position].token_ids, (generation.do_sample, index)
    other_seed = generate(chunks, prompts_of(encoder, [0]), dataclasses.replace(sampling, seed=8), sample_seeds=[0])
    first = generate(chunks, prompts_of(encoder, [0]), sampling, sample_seeds=[0])
    assert other_seed[0].token_ids != first[0].token_ids  # the seed matters


@pytest.mark.first_env_only  # our decoding loop: no Megatron-Core version changes it
def test_sampling_follows_temperature_and_top_p(checkpoints):
    """top_p small enough keeps only the most likely token: sampling then equals greedy decoding;
    a high temperature without top_p departs from it."""
    chunks, config, _ = load_for_inference(checkpoints["tiny"].megatron, ParallelConfig())
    inputs = prompts_of(prompt_encoder(config))
    greedy = generate(chunks, inputs, GenerationConfig(max_new_tokens=8))
    nucleus = generate(chunks, inputs, GenerationConfig(max_new_tokens=8, do_sample=True, top_p=1e-6, seed=3))
    assert [o.token_ids for o in nucleus] == [o.token_ids for o in greedy]
    hot = generate(chunks, inputs, GenerationConfig(max_new_tokens=8, do_sample=True, temperature=50.0, seed=3))
    assert [o.token_ids for o in hot] != [o.token_ids for o in greedy]


@pytest.mark.first_env_only  # our decoding loop: no Megatron-Core version changes it
def test_rows_stop_on_their_stop_tokens_and_strings(checkpoints):
    """A row stops after a stop token (kept, as transformers does) or once its text holds a stop
    string; the other rows go on to max_new_tokens."""
    chunks, config, _ = load_for_inference(checkpoints["tiny"].megatron, ParallelConfig())
    encoder = prompt_encoder(config)
    inputs = prompts_of(encoder)
    free = generate(chunks, inputs, GenerationConfig(max_new_tokens=12), encoder.decode)
    stop_token = free[1].token_ids[4]
    stopped = generate(chunks, inputs, GenerationConfig(max_new_tokens=12, stop_token_ids=(stop_token,)))
    for out, reference in zip(stopped, free, strict=True):
        if stop_token in reference.token_ids:
            cut = reference.token_ids.index(stop_token) + 1
            assert (out.token_ids, out.stop_reason) == (reference.token_ids[:cut], "stop_token")
        else:
            assert (out.token_ids, out.stop_reason) == (reference.token_ids, "max_new_tokens")
    text = free[0].text
    stop_string = text[len(text) // 2 : len(text) // 2 + 2]
    cut = generate(chunks, inputs, GenerationConfig(max_new_tokens=12, stop_strings=(stop_string,)), encoder.decode)
    assert cut[0].stop_reason == "stop_string" and stop_string in cut[0].text
    assert stop_string not in encoder.decode(cut[0].token_ids[:-1])  # it stopped at the first occurrence
    assert cut[0].token_ids == free[0].token_ids[: len(cut[0].token_ids)]
    with pytest.raises(ValueError, match="decode"):
        generate(chunks, inputs, GenerationConfig(stop_strings=("x",)))


# --- tools/generate.py on real process groups ------------------------------------------------------


def run_generate_tool(checkpoint: Path, prompts_file: Path, *layout: str) -> list[list[int]]:
    command = [sys.executable, str(ROOT / "tools/generate.py"), "--checkpoint", str(checkpoint), *layout]
    command += ["--prompts", str(prompts_file), "--max-new-tokens", str(NEW_TOKENS), "--json", "--batch-size", "4"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [line["id"] for line in lines] == list(range(len(PROMPTS)))
    return [line["token_ids"] for line in lines]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    images = ROOT / "examples" / "data" / "images"
    lines = [json.dumps({"prompt": text, "images": [str(images / n) for n in names]}) for text, names in PROMPTS]
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "prompts.jsonl"


@pytest.mark.multiprocess
def test_generate_tool_equals_transformers_at_tp2_pp2(checkpoints, prompts_file):
    """The user's tool, started as one process, runs itself under torchrun at TP2 x PP2: pipeline
    stages send packed hidden states without a shape exchange, tensor-parallel ranks agree on every
    token. (Idefics1's cross-attention, Idefics3 and Idefics2 with Llama generate through TP2 x PP2 in
    the family workers too: tests/test_cross_attention.py, tests/test_families.py.)"""
    checkpoint = checkpoints["tiny"]
    reference = hf_greedy(checkpoint, prompt_encoder(load_model_preset("tiny")))
    assert run_generate_tool(checkpoint.megatron, prompts_file, "--tp", "2", "--pp", "2") == reference
