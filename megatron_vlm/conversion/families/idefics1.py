"""Idefics1 (transformers' ``IdeficsForVisionText2Text``): a CLIP-style vision tower at a fixed square
resolution, a Perceiver resampler at the vision width, and a Llama decoder with gated
cross-attention blocks (the cross-attention architecture, ``models/cross_attention.py``).

Its checkpoint keeps the text model's settings at the top level of IdeficsConfig (no text_config),
the image tokens added to Llama's vocabulary in separate tensors (``additional_embedding``,
``additional_fc``: one table here, ``TextConfig.additional_vocab_size``), and the gated
cross-attention blocks as ``model.gated_cross_attn_layers.N``: block N sits before decoder layer
N x ``cross_layer_interval`` (here: ``language_model.decoder.layers.{N x interval}.gated_cross_attention``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping as MappingType
from typing import Any

import torch

from megatron_vlm.backbones import recipe, recipe_for_hf, recipes_of
from megatron_vlm.backbones.mapping import Fuse, Mapping, Split
from megatron_vlm.config import CrossAttentionConfig, ModelConfig
from megatron_vlm.conversion.families.base import (
    NON_MODEL_KEYS,
    read_hf_config,
    refuse_unmodelled,
    register_family,
    require_kinds,
)

# IdeficsConfig keys that are training switches or initialisation, not the model's forward pass.
TRAINING_KEYS = frozenset(
    {
        "freeze_text_layers",
        "freeze_text_module_exceptions",
        "freeze_lm_head",
        "freeze_vision_layers",
        "freeze_vision_module_exceptions",
        "alpha_initializer",
        "alphas_initializer_range",
        "initializer_factor",
    }
)
# The text model's keys of IdeficsConfig, as a LlamaConfig names them (Idefics1 has no GQA, no biases).
_TEXT_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "rms_norm_eps",
    "max_position_embeddings",
    "pad_token_id",
)


class _ImageTokenIds:
    """What transformers' ``image_attention_mask_for_packed_input_ids`` asks of a tokenizer: the
    ``<image>`` id, and an end-of-document id (none in a synthetic batch: one document per row)."""

    def __init__(self, image_token_id: int) -> None:
        self.image_token_id = image_token_id
        self.eos_token_id = -1

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.image_token_id


class Idefics1Family:
    name = "idefics1"
    hf_model_type = "idefics"
    hf_architecture = "IdeficsForVisionText2Text"
    part_prefixes = {
        "vision": ("vision.", "model.vision_model."),
        "connector": ("connector.", "model.perceiver_resampler."),
        "text": ("language_model.", "model."),
    }
    # connector none: use_resampler=False, every vision token a cross-attention key
    kinds = {"vision": ("clip",), "connector": ("idefics_perceiver", "none"), "text": ("llama",)}

    def check(self, config: ModelConfig) -> None:
        """Refuse, by name, a model this format cannot hold."""
        if config.architecture != "cross_attention":
            raise ValueError(
                f"the {self.name} format is the cross-attention architecture; model.architecture={config.architecture!r}"
            )
        require_kinds(config, self.name, **self.kinds)
        t = config.text
        if t.num_kv_heads != t.num_heads:
            raise ValueError(
                f"the {self.name} format has no grouped-query attention: text.num_kv_heads={t.num_kv_heads}"
            )
        if t.attention_dropout:
            raise ValueError(
                f"the {self.name} format has one dropout for the whole model: text.attention_dropout must be 0"
            )
        if not 0 <= t.additional_vocab_size < t.vocab_size:
            raise ValueError(f"text.additional_vocab_size={t.additional_vocab_size} must be in [0, vocab_size)")

    def extra_rows(self, config: ModelConfig) -> list[Mapping]:
        """The gated cross-attention blocks: concrete rows (Megatron layer N x interval <-> HF block N)."""
        interval = config.cross_attention.interval
        inner = [
            ("input_norm.weight", "input_layernorm.weight", Split.REPLICATED),
            ("linear_q.weight", "cross_attn.q_proj.weight", Split.COLUMN),
            ("linear_k.weight", "cross_attn.k_proj.weight", Split.COLUMN),
            ("linear_v.weight", "cross_attn.v_proj.weight", Split.COLUMN),
            ("linear_proj.weight", "cross_attn.o_proj.weight", Split.ROW),
            ("alpha_cross_attn", "alpha_cross_attn", Split.REPLICATED),
            ("alpha_dense", "alpha_dense", Split.REPLICATED),
            ("post_attention_norm.weight", "post_attention_layernorm.weight", Split.REPLICATED),
            ("mlp.linear_fc2.weight", "mlp.down_proj.weight", Split.ROW),
        ]
        if config.cross_attention.qk_layer_norms:
            inner += [
                ("q_norm.weight", "cross_attn.q_layer_norm.weight", Split.REPLICATED),
                ("k_norm.weight", "cross_attn.k_layer_norm.weight", Split.REPLICATED),
            ]
        rows = []
        for block in range(config.text.num_layers // interval):
            ours = f"language_model.decoder.layers.{block * interval}.gated_cross_attention."
            theirs = f"model.gated_cross_attn_layers.{block}."
            rows += [Mapping(ours + m, (theirs + h,), split) for m, h, split in inner]
            rows.append(
                Mapping(
                    ours + "mlp.linear_fc1.weight",
                    (theirs + "mlp.gate_proj.weight", theirs + "mlp.up_proj.weight"),
                    Split.GATED_COLUMN,
                    Fuse.GATE_UP,
                )
            )
        return rows

    # -- configs ---------------------------------------------------------------------------

    def to_hf_config_dict(self, config: ModelConfig) -> dict[str, Any]:
        """Our ModelConfig as transformers' IdeficsConfig dict."""
        self.check(config)
        vision, connector, text = recipes_of(config)
        llama = text.to_hf(config.text, config.pad_token_id)
        vision_config = {k: v for k, v in vision.to_hf(config.vision).items() if k != "hidden_size"}
        vision_config.update(model_type="idefics_vision", embed_dim=config.vision.hidden_size)
        rope = llama.get("rope_parameters") or {"rope_type": "default", "rope_theta": config.text.rope_theta}
        cross = config.cross_attention
        return {
            "model_type": self.hf_model_type,
            "architectures": [self.hf_architecture],
            **{key: llama[key] for key in _TEXT_KEYS},
            "vocab_size": config.text.vocab_size - config.text.additional_vocab_size,
            "additional_vocab_size": config.text.additional_vocab_size,
            "rope_parameters": rope,
            "dropout": 0.0,
            "tie_word_embeddings": False,
            "cross_layer_interval": cross.interval,
            "alpha_type": cross.alpha_type,
            "qk_layer_norms": cross.qk_layer_norms,
            "use_resampler": config.connector.kind != "none",
            "vision_config": vision_config,
            "perceiver_config": connector.to_hf(config),
        }

    def hf_config(self, config_json: MappingType[str, Any] | Any) -> Any:
        from transformers import IdeficsConfig

        return read_hf_config(config_json, IdeficsConfig)

    def to_hf_config(self, config: ModelConfig) -> Any:
        return self.hf_config(self.to_hf_config_dict(config))

    def from_hf_config(self, config_json: MappingType[str, Any] | Any) -> ModelConfig:
        """IdeficsConfig (object or config.json dict) -> ModelConfig; what would change the model but
        is not modelled is refused by name."""
        from transformers import LlamaConfig

        hf = self.hf_config(config_json)
        if hf.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=True is not supported (Idefics1 unties them)")
        if hf.dropout:
            raise ValueError(f"dropout={hf.dropout} is not implemented (the decoder runs without dropout)")
        additional = int(hf.additional_vocab_size)
        llama = LlamaConfig(
            **{key: getattr(hf, key) for key in _TEXT_KEYS},
            vocab_size=hf.vocab_size + additional,
            num_key_value_heads=hf.num_attention_heads,
            rope_parameters=copy.deepcopy(hf.rope_parameters),
            tie_word_embeddings=False,
        )
        text = recipe("text", "llama").from_hf(llama)
        text.additional_vocab_size = additional
        vision = recipe_for_hf("vision", hf.vision_config.model_type).from_hf(hf.vision_config)
        connector = recipe("connector", "idefics_perceiver" if hf.use_resampler else "none").from_hf(
            hf.perceiver_config
        )
        config = ModelConfig(
            vision=vision,
            connector=connector,
            text=text,
            architecture="cross_attention",
            cross_attention=CrossAttentionConfig(
                interval=hf.cross_layer_interval, alpha_type=hf.alpha_type, qk_layer_norms=bool(hf.qk_layer_norms)
            ),
            pad_token_id=hf.pad_token_id or 0,
            # IdeficsConfig names no token ids: Idefics1's tokenizer appends <fake_token_around_image>,
            # <image> (and <end_of_utterance>) to LLaMA's vocabulary in that order.
            fake_image_token_id=hf.vocab_size,
            image_token_id=hf.vocab_size + 1,
            end_of_utterance_token_id=hf.vocab_size + 2,
            family=self.name,
        )
        self._check_round_trip(hf, self.to_hf_config_dict(config))
        return config

    def _check_round_trip(self, source: Any, written: dict[str, Any]) -> None:
        """Every model-affecting field of ``source`` must come back the same from what we write (both
        read through transformers' classes, so both share their defaults)."""
        ours = type(source).from_dict(copy.deepcopy(written))
        skip = NON_MODEL_KEYS | TRAINING_KEYS | {"use_resampler"}  # the model reads the top-level one
        problems = []
        for prefix, theirs, mine in (
            ("", source, ours),
            ("vision_config.", source.vision_config, ours.vision_config),
            ("perceiver_config.", source.perceiver_config, ours.perceiver_config),
        ):
            mine_values = mine.to_dict()
            for key, value in theirs.to_dict().items():
                if key in skip or key.endswith("_config") or key not in mine_values:
                    continue
                if mine_values[key] != value:
                    problems.append(f"{prefix}{key}={value!r}")
        refuse_unmodelled(problems)

    # -- the transformers model (the oracle) -----------------------------------------------

    def hf_model_class(self) -> type:
        from transformers import IdeficsForVisionText2Text

        return IdeficsForVisionText2Text

    def synthetic_batch(
        self, config: ModelConfig, seed: int = 0, images_per_row: list[list[tuple[int, int]]] | None = None
    ) -> Any:
        """The parity batch: whole square images at the tower's size, one ``<image>`` per image, a row
        with two images (its tokens after the second attend only that one), a text-only padded row."""
        from megatron_vlm.backbones import text_tokens_per_image
        from megatron_vlm.data.batch import make_batch

        side = (config.vision.image_size, config.vision.image_size)
        counts = [len(images) for images in images_per_row] if images_per_row is not None else [1, 0, 2, 1]
        return make_batch(
            config,
            seed=seed,
            images_per_row=[[side] * count for count in counts],
            image_seq_len=text_tokens_per_image(config),
        )

    def hf_inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        """A synthetic ``data.batch.Batch`` (flat image list, one ``<image>`` token per image) ->
        transformers' layout: pixel_values [b, most images, C, H, W] zero-padded, and the
        image_attention_mask [b, s, most images] its processor builds (each token attends the
        latest image at or before it)."""
        from transformers.models.idefics.processing_idefics import (
            image_attention_mask_for_packed_input_ids,
            incremental_to_binary_attention_mask,
        )

        rows = len(batch.images_per_row)
        most = max(1, max(len(images) for images in batch.images_per_row))
        if batch.pixel_values.shape[0]:
            _, channels, h, w = batch.pixel_values.shape
        else:
            channels, h, w = 3, 1, 1
        pixel_values = torch.zeros(rows, most, channels, h, w)
        index = 0
        for row, images in enumerate(batch.images_per_row):
            for slot in range(len(images)):
                pixel_values[row, slot] = batch.pixel_values[index]
                index += 1
        incremental, _ = image_attention_mask_for_packed_input_ids(
            batch.input_ids.clone(), _ImageTokenIds(batch.image_token_id), "pt"
        )
        image_attention_mask = incremental_to_binary_attention_mask(incremental, "pt", num_classes=most)
        return dict(
            input_ids=batch.input_ids,
            attention_mask=batch.padding,
            pixel_values=pixel_values,
            image_attention_mask=image_attention_mask,
        )

    def processor(self, config: ModelConfig, tokenizer: Any, do_image_splitting: bool = True) -> Any:
        """transformers' IdeficsProcessor for this model (``data.prompts``)."""
        from megatron_vlm.inference.prompts import prompt_encoder

        return prompt_encoder(config, tokenizer, do_image_splitting).processor


FAMILY = register_family(Idefics1Family())
