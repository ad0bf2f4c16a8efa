"""What trains: freezing the backbones and LoRA adapters on their linear layers.

The paper's recipe (Idefics2, section 3) adapts the pretrained backbones with LoRA while the new
parts (connector, new token embeddings) train fully. Adapters hang off the tensor-parallel linears
as forward hooks, so base parameter names (and checkpoints, and the HF mapping) are unchanged;
``merge_lora`` folds them into the base weights for export.

Which linears take adapters, by class (``ADAPTABLE``): Megatron's local ``ColumnParallelLinear`` /
``RowParallelLinear`` and Transformer Engine's ``TEColumnParallelLinear``, ``TERowParallelLinear``
and ``TELayerNormColumnParallelLinear``. The last fuses the pre-norm into the linear, so its input
is *not* normalised: the adapter must see the normalised activations. As Megatron-Bridge does, the
layer is asked to also return its layer-norm output (TE's ``return_layernorm_output``; gathered
over the sequence under sequence parallelism) and the adapter reads that. The base output is
``ln(x) W^T`` either way, so ``W + scale * B A`` merges exactly. Under sequence parallelism the layer
returns this rank's slice of ``ln(x)`` (``return_layernorm_output_gathered`` off) and the adapter
gathers it itself, as for a plain input: TE 2.4+ drops the gradient of a *gathered* returned output
and TE 2.0-2.3 adds it before the reduce-scatter (counted TP times), both wrong (issue #27;
``tests/emulated_kernels.TeLayerNormLinearRules``); the slice's gradient is added after it by every
version, as Megatron-Bridge's adapters also take it.

Tensor parallelism: on a column-parallel linear, A [r, in] is replicated and B [out/tp, r] split
like the base; on a row-parallel linear, A [r, in/tp] is split and B [out, r] replicated, with the
low-rank activations all-reduced. Under sequence parallelism the low-rank activations are gathered
(column) or reduce-scattered (row) along the sequence instead, and the replicated factor, which
then sees only this rank's slice of the sequence, is marked ``sequence_parallel`` so its gradient is
summed over the tensor-parallel group. A is initialised from the *global* parameter name, so every
TP/PP layout starts from the same adapters.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from torch import nn

from megatron_vlm.config import TrainableConfig
from megatron_vlm.models.naming import global_parameter_names

# Backbone linears that take adapters (inside each TransformerLayer of the vision and text stacks).
LORA_LAYERS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
BACKBONES = {"vision": "vision.encoder.layers.", "language": "language_model.decoder.layers."}
# Parts new to the model inside a backbone's layers (the cross-attention architecture's gated
# blocks): they train fully, without adapters, when that backbone is frozen or LoRA-adapted.
NEW_PARTS = (".gated_cross_attention.",)


def _new_part(name: str) -> bool:
    return any(part in name for part in NEW_PARTS)


@dataclass(frozen=True)
class LinearKind:
    """How an adapter attaches to a linear of this class."""

    row_parallel: bool  # else column-parallel
    layernorm_input: bool  # the pre-norm is fused in: the adapter reads the layer's layer-norm output
    transformer_engine: bool  # sizes as TE names them (in_features / out_features per TP rank)


# By class name, so that start-up checks can judge a Transformer Engine layout without TE.
ADAPTABLE = {
    "ColumnParallelLinear": LinearKind(row_parallel=False, layernorm_input=False, transformer_engine=False),
    "RowParallelLinear": LinearKind(row_parallel=True, layernorm_input=False, transformer_engine=False),
    "TEColumnParallelLinear": LinearKind(row_parallel=False, layernorm_input=False, transformer_engine=True),
    "TERowParallelLinear": LinearKind(row_parallel=True, layernorm_input=False, transformer_engine=True),
    "TELayerNormColumnParallelLinear": LinearKind(row_parallel=False, layernorm_input=True, transformer_engine=True),
}


def linear_kind(cls: type | str) -> LinearKind | None:
    """The adapter arrangement for a linear class (or class name); None if LoRA cannot adapt it."""
    names = [cls] if isinstance(cls, str) else [c.__name__ for c in cls.__mro__]
    return next((ADAPTABLE[name] for name in names if name in ADAPTABLE), None)


def unadaptable(layer_linears: dict[str, str]) -> list[str]:
    """Targeted linears (name -> class name) that LoRA cannot adapt, with the reason."""
    return [
        f"{name} is a {cls}, which LoRA cannot adapt (supported: {', '.join(sorted(ADAPTABLE))})"
        for name, cls in layer_linears.items()
        if name.endswith(LORA_LAYERS) and linear_kind(cls) is None
    ]


def _sizes(base: nn.Module, kind: LinearKind) -> tuple[int, int]:
    """(input width the adapter's A sees on this rank, output width its B produces on this rank)."""
    if kind.transformer_engine:  # TE keeps the per-rank sizes
        return int(base.in_features), int(base.out_features)
    if kind.row_parallel:
        return base.input_size_per_partition, base.output_size
    return base.input_size, base.output_size_per_partition


class LoRAAdapter(nn.Module):
    """LoRA's low-rank update ``scale * B A``; with ``dora`` also DoRA's magnitude ``m`` (one per
    output feature, initialised to the base weight's row norms), the layer's output then being
    ``m / ||W + scale B A|| * (x W^T + scale x A^T B^T)`` (the norm per output feature, treated as a
    constant in the backward as the DoRA paper, section 4.3, and PEFT do)."""

    def __init__(
        self, base: nn.Module, kind: LinearKind, rank: int, alpha: float, dropout: float, seed: int, dora: bool = False
    ) -> None:
        super().__init__()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.row_parallel = kind.row_parallel
        self.scale = alpha / rank
        local_in, local_out = _sizes(base, kind)
        dtype = base.weight.dtype
        full_in = local_in * tp_size if kind.row_parallel else local_in
        full_a = torch.empty(rank, full_in)
        nn.init.kaiming_uniform_(full_a, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
        if self.row_parallel:
            self.a = nn.Parameter(full_a.chunk(tp_size, dim=1)[tp_rank].to(dtype).contiguous())
        else:
            self.a = nn.Parameter(full_a.to(dtype))
        self.b = nn.Parameter(torch.zeros(local_out, rank, dtype=dtype))
        device = base.weight.device
        self.to(device)
        # The split half is distinct on each TP rank: grad-norm and checkpoint code must know it.
        split = self.a if self.row_parallel else self.b
        set_tensor_model_parallel_attributes(split, is_parallel=True, dim=1 if self.row_parallel else 0, stride=1)
        # Under sequence parallelism the activations around the replicated factor are a slice of
        # the sequence (TE's returned layer-norm output too: it is not asked gathered): its
        # gradient is partial.
        config = base.config
        self.sequence_parallel = bool(config.sequence_parallel) and tp_size > 1
        self.input_is_sequence_sharded = self.sequence_parallel
        replicated = self.b if self.row_parallel else self.a
        replicated.sequence_parallel = self.sequence_parallel and (self.row_parallel or self.input_is_sequence_sharded)
        self.dropout = nn.Dropout(dropout)
        self.magnitude: nn.Parameter | None = None
        if dora:
            with torch.no_grad():
                norms = self.weight_norm(base.weight.detach())
            self.magnitude = nn.Parameter(norms.to(dtype))
            if self.row_parallel:  # [out], replicated: under sequence parallelism it sees a slice
                self.magnitude.sequence_parallel = self.sequence_parallel
            else:  # [out / tp], split like B
                set_tensor_model_parallel_attributes(self.magnitude, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_rank = self.dropout(x) @ self.a.t()
        if self.row_parallel:
            if self.sequence_parallel:
                low_rank = reduce_scatter_to_sequence_parallel_region(low_rank)
            else:
                low_rank = reduce_from_tensor_model_parallel_region(low_rank)
        elif self.input_is_sequence_sharded:
            low_rank = gather_from_sequence_parallel_region(low_rank)
        else:
            low_rank = copy_to_tensor_model_parallel_region(low_rank)
        return self.scale * (low_rank @ self.b.t())

    def delta_weight(self) -> torch.Tensor:
        """This rank's update of the base weight: scale * B @ A (shaped like the local weight)."""
        return self.scale * (self.b @ self.a)

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||weight + scale * B A|| per output feature of this rank, in float32; a row-parallel
        linear's rows span the TP ranks (each holds a slice of the input features): their squares
        are summed over the tensor-parallel group."""
        squares = (weight.float() + self.delta_weight().float()).square().sum(dim=1)
        if self.row_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(squares, group=parallel_state.get_tensor_model_parallel_group())
        return squares.sqrt()

    def dora_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """DoRA's per-output-feature factor m / ||W + scale B A|| (the norm detached)."""
        return self.magnitude.float() / self.weight_norm(weight.detach()).detach()


def _split_output(output: object) -> tuple[torch.Tensor, object, torch.Tensor | None]:
    """A linear's return value -> (output, bias, layer-norm output or None).

    Megatron's linears return ``(out, bias)``; TE's fused norm+linear asked for its layer-norm
    output returns ``((out, ln_out), bias)`` through Megatron's wrapper, or ``(out, bias, ln_out)``."""
    if isinstance(output, tuple) and len(output) == 3:
        return output[0], output[1], output[2]
    if isinstance(output, tuple) and len(output) == 2:
        first, bias = output
        if isinstance(first, tuple) and len(first) == 2:
            return first[0], bias, first[1]
        return first, bias, None
    return output, None, None  # type: ignore[return-value]


def _add_adapter(base: nn.Module, adapter: LoRAAdapter, kind: LinearKind, gated: bool) -> None:
    base.lora = adapter
    if kind.layernorm_input:
        base.return_layernorm_output = True
        # This rank's slice under sequence parallelism, gathered by the adapter: the gradient of a
        # gathered returned output is dropped (TE 2.4+) or counted TP times (TE 2.0-2.3).
        base.return_layernorm_output_gathered = False

    def add_low_rank(module: nn.Module, args: tuple, output: tuple) -> tuple:
        result, bias, layernorm_output = _split_output(output)
        adapter_input = layernorm_output if kind.layernorm_input else args[0]
        if adapter_input is None:
            raise RuntimeError(f"{type(module).__name__} did not return its layer-norm output for LoRA")
        update = module.lora(adapter_input).reshape(result.shape)
        if module.lora.magnitude is None:
            return result + update, bias
        # DoRA scales x W^T + the update, not the bias: a bias the layer added itself (none returned
        # apart) is taken out and put back.
        own_bias = getattr(module, "bias", None)
        added = own_bias if bias is None and isinstance(own_bias, torch.Tensor) and own_bias.numel() else None
        core = result - added if added is not None else result
        scaled = (module.lora.dora_scale(module.weight) * (core + update).float()).to(result.dtype)
        return (scaled + added if added is not None else scaled), bias

    base.lora_hook = base.register_forward_hook(add_low_rank)
    base_sharded_state_dict = base.sharded_state_dict

    def sharded_state_dict(prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """The base layer's entries, with the adapter's split half sharded like the base weight
        (Megatron's linears would record the adapter as replicated)."""
        entries = {
            k: v for k, v in base_sharded_state_dict(prefix, sharded_offsets, metadata).items() if ".lora." not in k
        }
        axis = {"a": 1} if adapter.row_parallel else {"b": 0, "magnitude": 0}
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        tensors = {"a": adapter.a, "b": adapter.b}
        if adapter.magnitude is not None:
            tensors["magnitude"] = adapter.magnitude
        adapter_entries = make_sharded_tensors_for_checkpoint(
            tensors,
            f"{prefix}lora.",
            axis,
            sharded_offsets,
            # Named, as Megatron's own linears do: given only the data-parallel group, Megatron-Core
            # leaves the TP group unset and records every TP rank's slice as the whole tensor (at
            # TP > 1 the save is refused: an invalid access pattern).
            tp_group=getattr(base, "tp_group", None) or parallel_state.get_tensor_model_parallel_group(),
            dp_cp_group=metadata["dp_cp_group"],
        )
        if gated:  # B's rows (and DoRA's magnitudes) follow fc1's per-rank [gate_r; up_r] layout
            for key in (f"{prefix}lora.b", f"{prefix}lora.magnitude"):
                if key in adapter_entries:
                    adapter_entries[key] = apply_swiglu_sharded_factory(adapter_entries[key], sharded_offsets)
        return {**entries, **adapter_entries}

    base.sharded_state_dict = sharded_state_dict


def apply_trainable(chunks: Sequence[nn.Module], trainable: TrainableConfig, seed: int = 0) -> None:
    """Freeze the parts the config freezes and add LoRA adapters to the targeted backbones.

    A backbone with adapters has its base weights frozen; embeddings and the output layer stay
    trainable unless the language model is frozen (the image tokens are new vocabulary). New parts
    inside the decoder (``NEW_PARTS``: gated cross-attention blocks) always train fully.
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
            if name.startswith(tuple(frozen_prefixes)) and not _new_part(name):
                param.requires_grad_(False)
        if not lora_on:
            continue
        global_names = global_parameter_names(chunk)
        for module_name, module in list(chunk.named_modules()):
            targeted = any(module_name.startswith(BACKBONES[b]) for b in lora_on)
            if not targeted or not module_name.endswith(LORA_LAYERS) or _new_part(module_name + "."):
                continue
            kind = linear_kind(type(module))
            if kind is None:
                raise ValueError(unadaptable({module_name: type(module).__name__})[0])
            seed_of_layer = zlib.crc32(f"{seed}:{global_names[module_name + '.weight']}".encode())
            gated = module_name.endswith("mlp.linear_fc1") and module.config.gated_linear_unit
            adapter = LoRAAdapter(
                module,
                kind,
                trainable.lora_rank,
                trainable.lora_alpha,
                trainable.lora_dropout,
                seed_of_layer,
                dora=trainable.dora,
            )
            _add_adapter(module, adapter, kind, gated)


@torch.no_grad()
def merge_lora(chunks: Sequence[nn.Module]) -> int:
    """Fold every adapter into its base weight and remove it; returns how many were merged."""
    merged = 0
    for chunk in chunks:
        for module in chunk.modules():
            adapter = getattr(module, "lora", None)
            if isinstance(adapter, LoRAAdapter):
                if adapter.magnitude is not None:  # DoRA: (m / ||W + dW||) (W + dW), exactly its output
                    factor = adapter.dora_scale(module.weight)[:, None]
                    merged_weight = factor * (module.weight.float() + adapter.delta_weight().float())
                    module.weight.copy_(merged_weight.to(module.weight.dtype))
                else:
                    module.weight.add_(adapter.delta_weight().to(module.weight.dtype))
                module.lora_hook.remove()
                del module.lora, module.lora_hook, module.sharded_state_dict  # back to the class method
                if getattr(module, "return_layernorm_output", False):
                    module.return_layernorm_output = module.return_layernorm_output_gathered = False
                merged += 1
    return merged
