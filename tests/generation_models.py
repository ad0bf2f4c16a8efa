"""Tiny converted checkpoints for the generation and evaluation tests, and transformers' greedy
generation on their exports (the oracle).

Each is a random transformers model of a tiny preset whose output layer is sharpened (x20), so that
greedy steps are decided by clear margins rather than float noise; it is converted to our format
(``convert.hf_to_megatron``) and exported back (``convert.megatron_to_hf``): transformers generates
from the export, our code from the converted checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

SHARPEN = 20.0
NEW_TOKENS = 24

# Real photos of several aspect ratios: a prompt per case, as the paper's prompts put images.
PROMPTS = (
    ("<image>A photo of", ["chelsea.jpg"]),  # landscape
    ("Compare <image> with <image>:", ["rocket_portrait.jpg", "coffee.jpg"]),  # portrait + landscape
    ("Once upon a time, in a quiet town,", []),  # text only
    ("<image>Question: what is in the image? Answer:", ["astronaut.jpg"]),  # square
)


@dataclasses.dataclass
class TinyCheckpoint:
    preset: str
    megatron: Path  # our converted checkpoint
    hf: Path  # its export


def build_checkpoint(preset: str, root: Path, seed: int = 0) -> TinyCheckpoint:
    """Collective (a single-process layout is enough): random HF model -> ours -> exported HF."""
    from megatron_vlm.config import ParallelConfig, load_model_preset
    from megatron_vlm.conversion import convert
    from megatron_vlm.conversion.verify import random_hf_model

    config = load_model_preset(preset)
    model = random_hf_model(config, seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(SHARPEN)
        extra = getattr(model.get_output_embeddings(), "additional_fc", None)  # Idefics1's image-token rows
        if extra is not None:
            extra.weight.mul_(SHARPEN)
    source = root / f"{preset}-source"
    model.save_pretrained(source)
    checkpoint = TinyCheckpoint(preset, root / f"{preset}-megatron", root / f"{preset}-export")
    convert.hf_to_megatron(source, checkpoint.megatron, ParallelConfig())
    convert.megatron_to_hf(checkpoint.megatron, checkpoint.hf)
    return checkpoint


def photos(names: list[str]) -> list[Any]:
    from PIL import Image

    folder = Path(__file__).resolve().parents[1] / "examples" / "data" / "images"
    return [Image.open(folder / name) for name in names]


def hf_greedy(checkpoint: TinyCheckpoint, encoder: Any, new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """transformers' ``generate(do_sample=False)`` on the export, each prompt alone (no padding),
    exactly ``new_tokens`` tokens (no stop token), the prompt processed by the same processor."""
    from megatron_vlm.config import load_model_preset
    from megatron_vlm.conversion.families import family_of

    model_class = family_of(load_model_preset(checkpoint.preset)).hf_model_class()
    model = model_class.from_pretrained(str(checkpoint.hf), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    outputs = []
    for text, names in PROMPTS:
        inputs, _ = encoder.encode([text], [photos(names)])
        prompt = inputs["input_ids"].shape[1]
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        outputs.append(generated[0, prompt:].tolist())
    return outputs
