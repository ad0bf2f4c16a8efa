"""Run under torchrun: HF-parity of logits and training steps of one converter family's tiny model
(``parity.TINY_FAMILY_CONFIGS``) at a given TP/PP layout.

Every rank builds the same random transformers model of the family (same seed), loads it through the
mapping table, compares logits through the pipeline schedule, trains a few steps and writes
``rank{N}.json`` into --out. ``measure`` is also what the tests run in process at TP1, so both
layouts are measured by the same code.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(config: Any, parallel: Any, steps: int, text_only_micro_batch: bool) -> dict:
    """Logits against the family's transformers model, then ``steps`` training steps on two
    micro-batches (the family's parity batch, and a batch without images or a second image batch)."""
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig
    from parity import family_batch, hf_logits, hf_model, megatron_inputs, training_inputs

    from megatron_vlm.config import PrecisionConfig
    from megatron_vlm.conversion.mapping import load_hf_weights
    from megatron_vlm.models.idefics2 import build_model_chunks
    from megatron_vlm.models.pipeline import forward_logits
    from megatron_vlm.training.step import build_optimizer, train_step, wrap_ddp

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    result: dict = {"tp_rank": tp_rank, "pp_rank": parallel_state.get_pipeline_model_parallel_rank()}
    hf = hf_model(config)
    state = hf.state_dict()
    chunks = build_model_chunks(config, parallel, PrecisionConfig())
    used = load_hf_weights(chunks, state.__getitem__, set(state), config, tp_rank, parallel.tensor_parallel)
    result["hf_tensors"], result["hf_tensors_used"] = sorted(state), sorted(used)
    result["decoder_layers"] = [len(c.language_model.decoder.layers) for c in chunks]
    result["has_vision"] = [c.vision is not None for c in chunks]

    batch = family_batch(config)
    result["images"] = int(batch.pixel_values.shape[0])
    ours = forward_logits(chunks, megatron_inputs(batch), config.text.vocab_size)
    if ours is not None:
        reference = hf_logits(hf, batch, config)
        valid = batch.padding.bool()
        result["logits_max_abs_diff"] = float((ours.cpu() - reference)[valid].abs().max())
        result["logits_max_abs"] = float(reference[valid].abs().max())

    images_per_row = [[], [], [], []] if text_only_micro_batch else None
    second = family_batch(config, seed=1, images_per_row=images_per_row)
    micro_batches = [training_inputs(batch), training_inputs(second)]
    model = wrap_ddp(chunks)
    optimizer = build_optimizer(
        model,
        # Adam's eps as tests/workers/parity_worker.py: float32 rounding differences between layouts
        # on gradient elements near eps would otherwise become update differences.
        OptimizerConfig(optimizer="adam", lr=1e-3, adam_eps=1e-5, clip_grad=1.0, weight_decay=0.0),
    )
    result["steps"] = [train_step(model, optimizer, micro_batches) for _ in range(steps)]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--first-stage-layers", type=int, default=None)
    parser.add_argument("--family-config", required=True, help="a name in parity.TINY_FAMILY_CONFIGS")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--text-only-micro-batch", action="store_true", help="train on a batch without images as the second one"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    from parity import family_config

    from megatron_vlm import distributed
    from megatron_vlm.config import ParallelConfig

    config = family_config(args.family_config)
    parallel = ParallelConfig(
        tensor_parallel=args.tp, pipeline_parallel=args.pp, decoder_layers_in_first_stage=args.first_stage_layers
    )
    distributed.initialize(parallel, config, seed=1234)
    result = {"rank": torch.distributed.get_rank(), **measure(config, parallel, args.steps, args.text_only_micro_batch)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{result['rank']}.json").write_text(json.dumps(result))
    distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
