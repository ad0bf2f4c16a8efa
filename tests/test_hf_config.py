"""Reading HF configs as transformers does: stripped config.json files take transformers' defaults,
and every field that would change the model but is not implemented is refused by name."""

import copy
import dataclasses

import pytest

from megatron_vlm.backbones import recipes_of
from megatron_vlm.config import ModelConfig, ParallelConfig, PrecisionConfig, load_model_preset
from megatron_vlm.conversion import convert
from megatron_vlm.conversion.hf_config import from_hf_config, to_hf_config, to_hf_config_dict

# The Hub's HuggingFaceM4/idefics2-8b config.json: only the sub-config keys that differ from
# transformers' defaults are stored.
IDEFICS2_8B_CONFIG_JSON = {
    "architectures": ["Idefics2ForConditionalGeneration"],
    "image_token_id": 32001,
    "model_type": "idefics2",
    "perceiver_config": {"model_type": "idefics2"},
    "text_config": {
        "model_type": "mistral",
        "max_position_embeddings": 32768,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "vocab_size": 32003,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 980,
        "intermediate_size": 4304,
        "model_type": "idefics2",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
    },
}


def tiny_hf_dict(**sections: dict) -> dict:
    """The tiny preset as a config.json dict, with ``sections`` merged into its sub-configs."""
    values = copy.deepcopy(to_hf_config_dict(load_model_preset("tiny")))
    for section, entries in sections.items():
        values[section].update(entries)
    return values


def test_stripped_hub_config_reads_as_the_8b_preset():
    source = copy.deepcopy(IDEFICS2_8B_CONFIG_JSON)
    config = from_hf_config(source)
    assert source == IDEFICS2_8B_CONFIG_JSON  # the caller's dict is left alone
    assert config == load_model_preset("idefics2-8b")
    # What transformers fills in: Mistral's sliding window and the perceiver's own norm epsilon.
    assert config.text.sliding_window == 4096 and config.connector.rms_norm_eps == 1e-6
    # Written back, transformers reads the same model.
    assert from_hf_config(to_hf_config(config)) == config


def test_sliding_window_and_attention_dropout_are_read_and_written_back():
    source = tiny_hf_dict(
        vision_config={"attention_dropout": 0.1},
        perceiver_config={"attention_dropout": 0.2},
        text_config={"attention_dropout": 0.3, "sliding_window": 8},
    )
    config = from_hf_config(source)
    assert (config.vision.attention_dropout, config.connector.attention_dropout) == (0.1, 0.2)
    assert (config.text.attention_dropout, config.text.sliding_window) == (0.3, 8)
    written = to_hf_config_dict(config)
    assert written["text_config"]["sliding_window"] == 8
    assert [written[s]["attention_dropout"] for s in ("vision_config", "perceiver_config", "text_config")] == [
        0.1,
        0.2,
        0.3,
    ]
    # Each part's dropout reaches its Megatron TransformerConfig.
    parallel, precision = ParallelConfig(), PrecisionConfig(use_transformer_engine=False)
    vision, connector, text = recipes_of(config)
    assert vision.transformer_config(config.vision, parallel, precision).attention_dropout == 0.1
    assert connector.transformer_config(config, parallel, precision).attention_dropout == 0.2
    assert text.transformer_config(config, parallel, precision).attention_dropout == 0.3


@pytest.mark.parametrize(
    ("text_config", "named"),
    [
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope.*'linear'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, r"rope.*'yarn'"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial"),
        ({"hidden_act": "gelu"}, r"text_config.hidden_act='gelu'"),
        ({"head_dim": 8}, r"text_config.head_dim=8"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ],
)
def test_unimplemented_text_fields_are_refused_by_name(text_config, named):
    with pytest.raises(ValueError, match=named):
        from_hf_config(tiny_hf_dict(text_config=text_config))


def test_round_trip_check_names_fields_the_model_would_drop():
    """A Llama-layout decoder with biases: transformers builds them, we would not."""
    source = tiny_hf_dict(text_config={"model_type": "llama", "attention_bias": True, "mlp_bias": True})
    del source["text_config"]["sliding_window"]
    with pytest.raises(ValueError, match=r"text_config.attention_bias=True, text_config.mlp_bias=True"):
        from_hf_config(source)
    with pytest.raises(ValueError, match=r"vision_config.hidden_act='gelu'"):
        from_hf_config(tiny_hf_dict(vision_config={"hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="model_type='llava'"):
        from_hf_config({**tiny_hf_dict(), "model_type": "llava"})
    # Bookkeeping keys are not model fields.
    assert from_hf_config(
        tiny_hf_dict(text_config={"bos_token_id": 5, "use_cache": False, "initializer_range": 0.5})
    ) == from_hf_config(tiny_hf_dict())


def test_siglip_and_mistral_configs_are_read_with_defaults_and_checked():
    siglip = {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128}
    siglip |= {"num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 14, "image_size": 56}
    mistral = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 64, "intermediate_size": 160}
    mistral |= {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
    connector = load_model_preset("tiny").connector
    config = convert.combined_model_config(siglip, mistral, connector, image_size=224)
    assert config.text.sliding_window == 4096  # MistralConfig's default, which the file leaves out
    assert config.vision.layer_norm_eps == 1e-6 and config.vision.image_size == 224
    with pytest.raises(ValueError, match=r"text_config.rope_parameters: RoPE type 'dynamic'"):
        convert.combined_model_config(
            siglip, {**mistral, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, connector, 224
        )
    with pytest.raises(ValueError, match=r"text_config.attention_bias=True"):
        convert.combined_model_config(
            siglip, {**mistral, "model_type": "llama", "attention_bias": True}, connector, 224
        )


def test_tiny_presets_round_trip_with_the_new_fields():
    for name in ("tiny", "small"):
        config = load_model_preset(name)
        windowed = dataclasses.replace(config, text=dataclasses.replace(config.text, sliding_window=16))
        for value in (config, windowed):
            assert from_hf_config(to_hf_config(value)) == dataclasses.replace(
                value,
                fake_image_token_id=ModelConfig.fake_image_token_id,
                end_of_utterance_token_id=ModelConfig.end_of_utterance_token_id,
            )
