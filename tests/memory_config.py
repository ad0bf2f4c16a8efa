"""The model and workload of the memory-model checks: big enough that the training state
(hundreds of MiB) dwarfs the noise of resident-memory readings, small enough for 2 CPU cores."""

import dataclasses

from megatron_vlm.config import ModelConfig, load_model_preset
from megatron_vlm.perf.memory_model import Workload


def memory_check_config() -> ModelConfig:
    config = load_model_preset("tiny")  # the real 32003-token vocabulary: logits matter
    text = dataclasses.replace(config.text, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8)
    vision = dataclasses.replace(config.vision, hidden_size=128, intermediate_size=512, num_layers=2)
    return dataclasses.replace(config, text=text, vision=vision)


def memory_check_workload() -> Workload:
    return Workload(micro_batch_size=2, seq_length=512, images=2, patches_per_image=16 * 16)
