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

    result.update(greedy_generation(chunks, hf, config, batch))

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


GENERATED = 8


def greedy_generation(chunks: Any, hf: Any, config: Any, batch: Any) -> dict:
    """Greedy generation at this layout (``inference/generate.py``: the KV cache, the pipeline's sends,
    tensor-parallel logits) on the parity batch's rows that hold images, batched, against transformers'
    ``generate`` on each row alone: both lists of ids, and the smallest gap between the two largest
    logits of our steps (float noise could flip a near-tie)."""
    import dataclasses

    import torch
    from parity import Batch, hf_inputs, megatron_inputs

    from megatron_vlm.inference.generate import GenerationConfig, generate

    def rows(selected: list[int]) -> Batch:
        starts = [sum(len(images) for images in batch.images_per_row[:row]) for row in range(len(batch.images_per_row))]
        images = [i for row in selected for i in range(starts[row], starts[row] + len(batch.images_per_row[row]))]
        length = int(batch.padding[selected].sum(dim=1).max())
        return dataclasses.replace(
            batch,
            input_ids=batch.input_ids[selected, :length],
            padding=batch.padding[selected, :length],
            images_per_row=[batch.images_per_row[row] for row in selected],
            pixel_values=batch.pixel_values[images],
            pixel_mask=batch.pixel_mask[images],
        )

    with_images = [row for row, images in enumerate(batch.images_per_row) if images]
    outputs = generate(chunks, megatron_inputs(rows(with_images)), GenerationConfig(max_new_tokens=GENERATED))
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    reference = []
    for row in with_images:
        alone = rows([row])
        with torch.no_grad():
            generated = hf.generate(**hf_inputs(alone, config), max_new_tokens=GENERATED, do_sample=False)
        reference.append(generated[0, alone.input_ids.shape[1] :].tolist())
    return {
        "generated": [out.token_ids for out in outputs],
        "hf_generated": reference,
        "generation_margin": min(min(out.margins) for out in outputs),
    }


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
