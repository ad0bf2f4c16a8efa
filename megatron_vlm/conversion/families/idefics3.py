"""Idefics3 (transformers' ``Idefics3ForConditionalGeneration``): SigLIP on full square images (the
processor resizes or splits every image into image_size squares), a pixel-shuffle connector and a
Llama-3 decoder, fully autoregressive.

transformers' Idefics3Config has no connector sub-config: the pixel-shuffle ``scale_factor`` sits at
its top level (the connector recipe reads and writes it there).
"""

from __future__ import annotations

from collections.abc import Mapping as MappingType
from typing import Any

from megatron_vlm.backbones import recipes_of
from megatron_vlm.config import ModelConfig
from megatron_vlm.conversion.families.base import read_hf_config, register_family
from megatron_vlm.conversion.families.idefics2 import Idefics2Family


class Idefics3Family(Idefics2Family):
    """The Idefics2 layout (same part prefixes, same batch format for transformers' model) with
    Idefics3's config, connector and processor."""

    name = "idefics3"
    hf_model_type = "idefics3"
    hf_architecture = "Idefics3ForConditionalGeneration"
    part_prefixes = {
        "vision": ("vision.", "model.vision_model."),
        "connector": ("connector.", "model.connector."),
        "text": ("language_model.", "model.text_model."),
    }
    sections = ("vision_config", "text_config")
    kinds = {"vision": ("siglip",), "connector": ("pixel_shuffle",), "text": ("llama",)}

    # -- configs ---------------------------------------------------------------------------

    def to_hf_config_dict(self, config: ModelConfig) -> dict[str, Any]:
        """Our ModelConfig as transformers' Idefics3Config dict; each part written by its recipe."""
        self.check(config)
        vision, connector, text = recipes_of(config)
        return {
            "model_type": self.hf_model_type,
            "architectures": [self.hf_architecture],
            "image_token_id": config.image_token_id,
            "tie_word_embeddings": False,
            **connector.to_hf(config),
            "vision_config": {**vision.to_hf(config.vision), "model_type": "idefics3_vision"},
            "text_config": text.to_hf(config.text, config.pad_token_id),
        }

    def hf_config(self, config_json: MappingType[str, Any] | Any) -> Any:
        from transformers import Idefics3Config

        return read_hf_config(config_json, Idefics3Config)

    def connector_hf_config(self, hf: Any) -> Any:
        """The pixel shuffle's scale_factor is on the top-level Idefics3Config."""
        return hf

    def token_ids(self, hf: Any) -> dict[str, int]:
        # Idefics3's tokenizer adds <fake_token_around_image>, <image>, <end_of_utterance> after
        # Llama-3's vocabulary; only <image> is in the config (Idefics3-8B: 128257).
        return {
            "fake_image_token_id": hf.image_token_id - 1,
            "image_token_id": hf.image_token_id,
            "end_of_utterance_token_id": hf.image_token_id + 1,
        }

    # -- the transformers model (the oracle) -----------------------------------------------

    def hf_model_class(self) -> type:
        from transformers import Idefics3ForConditionalGeneration

        return Idefics3ForConditionalGeneration

    def synthetic_batch(
        self,
        config: ModelConfig,
        seed: int = 0,
        images_per_row: list[list[tuple[int, int]]] | None = None,
        seq_len: int | None = None,
    ) -> Any:
        """A parity batch as Idefics3 takes it: full squares at the vision image_size (what its
        processor gives the model), image spans of the connector's token count; a text-only row
        with padding as in Idefics2's batch."""
        from megatron_vlm.data.batch import make_batch

        size = (config.vision.image_size, config.vision.image_size)
        if images_per_row is None:
            images_per_row = [[size], [], [size, size], [size]]
        tokens = recipes_of(config)[1].tokens_per_image(config)
        most = max(len(images) for images in images_per_row)
        needed = max(48, 3 + most * (tokens + 4) + 5)  # make_batch's default length, longer if the images need it
        return make_batch(
            config, seed=seed, images_per_row=images_per_row, seq_len=seq_len or needed, image_seq_len=tokens
        )

    def processor(self, config: ModelConfig, tokenizer: Any, do_image_splitting: bool = True) -> Any:
        """transformers' processor for this model, as the export writes it (``data.prompts``)."""
        from megatron_vlm.inference.prompts import prompt_encoder

        return prompt_encoder(config, tokenizer, do_image_splitting).processor


FAMILY = register_family(Idefics3Family())
