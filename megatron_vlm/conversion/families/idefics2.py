"""Idefics2 (transformers' ``Idefics2ForConditionalGeneration``): SigLIP at native resolution,
SwiGLU projection + Perceiver resampler, a Mistral (or Llama) decoder, fully autoregressive."""

from __future__ import annotations

from collections.abc import Mapping as MappingType
from typing import Any

import torch

from megatron_vlm.backbones import recipe_for_hf, recipes_of
from megatron_vlm.backbones.mapping import Mapping
from megatron_vlm.config import ModelConfig
from megatron_vlm.conversion.families.base import check_round_trip, read_hf_config, register_family, require_kinds


class Idefics2Family:
    name = "idefics2"
    hf_model_type = "idefics2"
    hf_architecture = "Idefics2ForConditionalGeneration"
    # Where each part lives: its module in our model, its prefix in transformers' checkpoint.
    part_prefixes = {
        "vision": ("vision.", "model.vision_model."),
        "connector": ("connector.", "model.connector."),
        "text": ("language_model.", "model.text_model."),
    }
    sections = ("vision_config", "perceiver_config", "text_config")
    kinds = {"vision": ("siglip",), "connector": ("perceiver",), "text": ("mistral", "llama")}

    def check(self, config: ModelConfig) -> None:
        """Refuse, by name, a model this format cannot hold."""
        if config.architecture != "fully_autoregressive":
            raise ValueError(
                f"the {self.name} format is fully autoregressive; model.architecture={config.architecture!r}"
            )
        require_kinds(config, self.name, **self.kinds)

    def extra_rows(self, config: ModelConfig) -> list[Mapping]:
        return []

    # -- configs ---------------------------------------------------------------------------

    def to_hf_config_dict(self, config: ModelConfig) -> dict[str, Any]:
        """Our ModelConfig as transformers' Idefics2Config dict; each part written by its recipe."""
        self.check(config)
        vision, connector, text = recipes_of(config)
        return {
            "model_type": self.hf_model_type,
            "architectures": [self.hf_architecture],
            "image_token_id": config.image_token_id,
            "tie_word_embeddings": False,
            "vision_config": vision.to_hf(config.vision),
            "perceiver_config": connector.to_hf(config),
            "text_config": text.to_hf(config.text, config.pad_token_id),
        }

    def hf_config(self, config_json: MappingType[str, Any] | Any) -> Any:
        from transformers import Idefics2Config

        return read_hf_config(config_json, Idefics2Config)

    def to_hf_config(self, config: ModelConfig) -> Any:
        return self.hf_config(self.to_hf_config_dict(config))

    def from_hf_config(self, config_json: MappingType[str, Any] | Any) -> ModelConfig:
        """The family's config (object or config.json dict) -> ModelConfig, each part read by the
        recipe for its sub-config's model type; what would change the model but is not modelled is
        refused by name."""
        hf = self.hf_config(config_json)
        if hf.tie_word_embeddings:
            raise ValueError(f"tie_word_embeddings=True is not supported ({self.hf_architecture} unties them)")
        connector_source = self.connector_hf_config(hf)
        vision = recipe_for_hf("vision", hf.vision_config.model_type)
        connector = recipe_for_hf("connector", connector_source.model_type)
        text = recipe_for_hf("text", hf.text_config.model_type)
        config = ModelConfig(
            vision=vision.from_hf(hf.vision_config),
            connector=connector.from_hf(connector_source),
            text=text.from_hf(hf.text_config),
            **self.token_ids(hf),
            pad_token_id=getattr(hf.text_config, "pad_token_id", 0) or 0,
            family=self.name,
        )
        check_round_trip(hf, self.to_hf_config_dict(config), self.sections)
        return config

    def connector_hf_config(self, hf: Any) -> Any:
        """Where the connector's numbers are in the family's config: Idefics2's perceiver_config."""
        return hf.perceiver_config

    def token_ids(self, hf: Any) -> dict[str, int]:
        """The image token ids the config names (Idefics2: <image>; the others are the defaults')."""
        return {"image_token_id": hf.image_token_id}

    # -- the transformers model (the oracle) -----------------------------------------------

    def hf_model_class(self) -> type:
        from transformers import Idefics2ForConditionalGeneration

        return Idefics2ForConditionalGeneration

    def hf_inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        """A synthetic ``data.batch.Batch`` (flat image list) -> transformers' [batch, max images,
        ...] layout with all-zero padding images."""
        rows = len(batch.images_per_row)
        if batch.pixel_values.shape[0] == 0:  # transformers wants no pixel_values at all then
            return dict(input_ids=batch.input_ids, attention_mask=batch.padding)
        most = max(1, max(len(images) for images in batch.images_per_row))
        _, channels, h, w = batch.pixel_values.shape
        pixel_values = torch.zeros(rows, most, channels, h, w)
        pixel_mask = torch.zeros(rows, most, h, w, dtype=torch.long)
        index = 0
        for row, images in enumerate(batch.images_per_row):
            for slot in range(len(images)):
                pixel_values[row, slot] = batch.pixel_values[index]
                pixel_mask[row, slot] = batch.pixel_mask[index].long()
                index += 1
        return dict(
            input_ids=batch.input_ids,
            attention_mask=batch.padding,
            pixel_values=pixel_values,
            pixel_attention_mask=pixel_mask,
        )

    def processor(self, config: ModelConfig, tokenizer: Any, do_image_splitting: bool = True) -> Any:
        """transformers' processor for this model, as the export writes it (``data.prompts``)."""
        from megatron_vlm.inference.prompts import prompt_encoder

        return prompt_encoder(config, tokenizer, do_image_splitting).processor


FAMILY = register_family(Idefics2Family())
