"""The model and workload of the memory-model checks: the `small` preset (its training state,
hundreds of MiB, dwarfs the noise of resident-memory readings) on 2 CPU cores."""

from megatron_vlm.config import ModelConfig, load_model_preset
from megatron_vlm.perf.memory_model import Workload


def memory_check_config() -> ModelConfig:
    return load_model_preset("small")


def memory_check_workload() -> Workload:
    return Workload(micro_batch_size=2, seq_length=512, images=2, patches_per_image=16 * 16)
