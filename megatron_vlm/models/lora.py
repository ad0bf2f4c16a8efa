"""What trains: freezing the backbones and LoRA adapters on their linear layers.

The paper's recipe (Idefics2, section 3) adapts the pretrained backbones with LoRA while the new
parts (connector, new token embeddings) train fully. Adapters hang off Megatron's tensor-parallel
linears as forward hooks, so base parameter names (and checkpoints, and the HF mapping) are
unchanged; ``merge_lora`` folds them into the base weights for export.

Tensor parallelism: on a column-parallel linear, A [r, in] is replicated and B [out/tp, r] split
like the base; on a row-parallel linear, A [r, in/tp] is split and B [out, r] replicated, with the
low-rank activations all-reduced. A is initialised from the *global* parameter name, so every
TP/PP layout starts from the same adapters.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from torch import nn

from megatron_vlm.config import TrainableConfig
from megatron_vlm.conversion.mapping import global_parameter_names

# Backbone linears that take adapters (inside each TransformerLayer of the vision and text stacks).
LORA_LAYERS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
BACKBONES = {"vision": "vision.encoder.layers.", "language": "language_model.decoder.layers."}


class LoRAAdapter(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, seed: int) -> None:
        super().__init__()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.row_parallel = isinstance(base, RowParallelLinear)
        self.scale = alpha / rank
        dtype = base.weight.dtype
        full_a = torch.empty(rank, base.input_size)
        nn.init.kaiming_uniform_(full_a, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
        if self.row_parallel:
            self.a = nn.Parameter(full_a.chunk(tp_size, dim=1)[tp_rank].to(dtype).contiguous())
            self.b = nn.Parameter(torch.zeros(base.output_size, rank, dtype=dtype))
        else:
            self.a = nn.Parameter(full_a.to(dtype))
            self.b = nn.Parameter(torch.zeros(base.output_size_per_partition, rank, dtype=dtype))
        # The split half is distinct on each TP rank: grad-norm and checkpoint code must know it.
        split = self.a if self.row_parallel else self.b
        set_tensor_model_parallel_attributes(split, is_parallel=True, dim=1 if self.row_parallel else 0, stride=1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_rank = self.dropout(x) @ self.a.t()
        if self.row_parallel:
            low_rank = reduce_from_tensor_model_parallel_region(low_rank)
        else:
            low_rank = copy_to_tensor_model_parallel_region(low_rank)
        return self.scale * (low_rank @ self.b.t())

    def delta_weight(self) -> torch.Tensor:
        """This rank's update of the base weight: scale * B @ A (shaped like the local weight)."""
        return self.scale * (self.b @ self.a)


def _add_adapter(base: nn.Module, adapter: LoRAAdapter, gated: bool) -> None:
    base.lora = adapter

    def add_low_rank(module: nn.Module, args: tuple, output: tuple) -> tuple:
        return (output[0] + module.lora(args[0]), *output[1:])

    base.lora_hook = base.register_forward_hook(add_low_rank)
    base_sharded_state_dict = base.sharded_state_dict

    def sharded_state_dict(prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """The base layer's entries, with the adapter's split half sharded like the base weight
        (Megatron's linears would record the adapter as replicated)."""
        entries = {
            k: v for k, v in base_sharded_state_dict(prefix, sharded_offsets, metadata).items() if ".lora." not in k
        }
        axis = {"a": 1} if adapter.row_parallel else {"b": 0}
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        adapter_entries = make_sharded_tensors_for_checkpoint(
            {"a": adapter.a, "b": adapter.b},
            f"{prefix}lora.",
            axis,
            sharded_offsets,
            dp_cp_group=metadata["dp_cp_group"],
        )
        if gated:  # B's rows follow fc1's per-rank [gate_r; up_r] layout
            key = f"{prefix}lora.b"
            adapter_entries[key] = apply_swiglu_sharded_factory(adapter_entries[key], sharded_offsets)
        return {**entries, **adapter_entries}

    base.sharded_state_dict = sharded_state_dict


def apply_trainable(chunks: Sequence[nn.Module], trainable: TrainableConfig, seed: int = 0) -> None:
    """Freeze the parts the config freezes and add LoRA adapters to the targeted backbones.

    A backbone with adapters has its base weights frozen; embeddings and the output layer stay
    trainable unless the language model is frozen (the image tokens are new vocabulary).
    """
    unknown = set(trainable.lora_targets) - set(BACKBONES)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {sorted(BACKBONES)}")
    lora_on = set(trainable.lora_targets) if trainable.lora_rank > 0 else set()
    for chunk in chunks:
        for param in chunk.parameters():  # start from "everything trains", then freeze
            param.requires_grad_(True)
        frozen_prefixes = []
        if trainable.freeze_vision or "vision" in lora_on:
            frozen_prefixes.append("vision.")
        if trainable.freeze_connector:
            frozen_prefixes.append("connector.")
        if trainable.freeze_language:
            frozen_prefixes.append("language_model.")
        elif "language" in lora_on:
            frozen_prefixes.append("language_model.decoder.")
        for name, param in chunk.named_parameters():
            if name.startswith(tuple(frozen_prefixes)):
                param.requires_grad_(False)
        if not lora_on:
            continue
        global_names = global_parameter_names(chunk)
        for module_name, module in list(chunk.named_modules()):
            targeted = any(module_name.startswith(BACKBONES[b]) for b in lora_on)
            if not targeted or not module_name.endswith(LORA_LAYERS):
                continue
            if not isinstance(module, ColumnParallelLinear | RowParallelLinear):
                raise ValueError(
                    f"LoRA needs Megatron's local tensor-parallel linears; {module_name} is "
                    f"{type(module).__name__} (Transformer Engine's fused norm+linear): set "
                    f"precision.use_transformer_engine=false for LoRA runs"
                )
            seed_of_layer = zlib.crc32(f"{seed}:{global_names[module_name + '.weight']}".encode())
            gated = module_name.endswith("mlp.linear_fc1") and module.config.gated_linear_unit
            _add_adapter(
                module,
                LoRAAdapter(module, trainable.lora_rank, trainable.lora_alpha, trainable.lora_dropout, seed_of_layer),
                gated,
            )


@torch.no_grad()
def merge_lora(chunks: Sequence[nn.Module]) -> int:
    """Fold every adapter into its base weight and remove it; returns how many were merged."""
    merged = 0
    for chunk in chunks:
        for module in chunk.modules():
            adapter = getattr(module, "lora", None)
            if isinstance(adapter, LoRAAdapter):
                module.weight.add_(adapter.delta_weight().to(module.weight.dtype))
                module.lora_hook.remove()
                del module.lora, module.lora_hook, module.sharded_state_dict  # back to the class method
                merged += 1
    return merged
