"""megatron-vlm: Idefics2-style vision-language pretraining on Megatron-Core."""

__version__ = "0.1.0"
