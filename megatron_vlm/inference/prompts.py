"""A model's prompt encoder (``data.prompts``) with the numbers only the model's recipes know: how
many ``<image>`` tokens an image becomes, and how the processor the exporter writes
(``tools/convert_megatron_to_hf.py --tokenizer``) resizes, splits and normalizes images."""

from __future__ import annotations

from typing import Any

from megatron_vlm.backbones import recipes_of, text_tokens_per_image
from megatron_vlm.config import ModelConfig
from megatron_vlm.data.images import ImageConfig
from megatron_vlm.data.prompts import PromptEncoder


def exported_image_config(config: ModelConfig, do_image_splitting: bool = True) -> ImageConfig:
    """The images of the processor an export carries: for SigLIP-style encoders the longest edge at
    min(image_size, 980) and the shortest at 378 (or the longest, if smaller), 4 crops + the image
    with splitting; squares at the encoder's size for a fixed-resolution encoder (CLIP, Idefics1's
    tower, never split); the encoder's own pixel normalization."""
    vision = recipes_of(config)[0]
    side = config.vision.image_size
    normalization = {"mean": tuple(vision.image_mean), "std": tuple(vision.image_std)}
    if getattr(vision, "fixed_resolution", False):
        return ImageConfig(longest_edge=side, shortest_edge=side, resize="square", **normalization)
    longest = min(side, 980)
    return ImageConfig(longest_edge=longest, shortest_edge=min(378, longest), split=do_image_splitting, **normalization)


def prompt_encoder(
    config: ModelConfig,
    tokenizer: Any = None,
    do_image_splitting: bool = True,
    image: ImageConfig | None = None,
) -> PromptEncoder:
    """The model's prompt encoder: its family's processor with ``image`` (default: the exporter's,
    ``exported_image_config``) and ``tokenizer`` (default: the text recipe's, ``data.tokens``)."""
    if tokenizer is None:
        from megatron_vlm.data.tokens import load_tokenizer

        tokenizer = load_tokenizer(name=recipes_of(config)[2].tokenizer)
    image = image or exported_image_config(config, do_image_splitting)
    return PromptEncoder(config, tokenizer, image, text_tokens_per_image(config))
