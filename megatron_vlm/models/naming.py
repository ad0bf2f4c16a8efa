"""Parameter names of the composed model: Transformer Engine's and the local spec's forms, and
global (pipeline-independent) layer indices. The HF table, LoRA seeds and checkpoints use these."""

from __future__ import annotations

import torch

# Transformer Engine fuses the pre-norms into the following linear; same tensors, other names.
_TE_NAMES = (
    (".self_attention.linear_qkv.layer_norm_", ".input_layernorm."),
    (".mlp.linear_fc1.layer_norm_", ".pre_mlp_layernorm."),
)


def canonical_name(name: str) -> str:
    """TE-spec parameter name -> local-spec name (the table's); other names unchanged."""
    for te, local in _TE_NAMES:
        if te in name:
            return name.replace(te, local)
    return name


def global_parameter_names(chunk: torch.nn.Module) -> dict[str, str]:
    """Local parameter name -> canonical name with global decoder-layer indices (PP/VPP offset)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    renames: dict[str, str] = {}
    for module_name, module in chunk.named_modules():
        if isinstance(module, TransformerLayer) and module_name.startswith("language_model.decoder.layers."):
            renames[module_name + "."] = f"language_model.decoder.layers.{module.layer_number - 1}."
    names = {}
    for name, _ in chunk.named_parameters():
        canonical = canonical_name(name)
        for local, global_ in renames.items():
            if canonical.startswith(local):
                canonical = global_ + canonical[len(local) :]
                break
        names[name] = canonical
    return names
