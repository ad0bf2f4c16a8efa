"""Run under torchrun (TP2): the composed CLIP + MLP connector + Mistral model against the
transformers composition of ``tests/test_design_parts.py`` (CLIPVisionModel, Idefics2MLP,
MistralForCausalLM), weights split over the tensor-parallel ranks through the recipes' rows.
Each rank writes ``rank{N}.ok`` into --out when its logits match within 1e-4."""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    from megatron.core import parallel_state
    from test_design_parts import (
        TOLERANCE,
        HfOracle,
        clip_mlp_config,
        image_batch,
        load_through_rows,
        megatron_forward,
        part_table,
    )

    from megatron_vlm import distributed
    from megatron_vlm.config import ParallelConfig, PrecisionConfig
    from megatron_vlm.models.idefics2 import build_model_chunks

    config = clip_mlp_config()
    parallel = ParallelConfig(tensor_parallel=2)
    distributed.initialize(parallel, config, seed=1234)
    rank = parallel_state.get_tensor_model_parallel_rank()
    oracle = HfOracle(config)  # the same seeds on every rank: the same full weights
    (model,) = build_model_chunks(config, parallel, PrecisionConfig(), initialize_weights=False)
    load_through_rows(model.eval(), part_table(config), oracle.state(), config, rank, 2)
    input_ids, padding, pixel_values = image_batch(config, [2, 0, 1], seq_len=96, seed=5)
    ours = megatron_forward(model, input_ids, padding, pixel_values, config.image_token_id)
    reference = oracle.logits(input_ids, padding, pixel_values)
    valid = padding.bool()
    difference = float((ours - reference)[valid].abs().max())
    if not difference <= TOLERANCE or not float(reference[valid].abs().max()) > 0.1:
        raise SystemExit(f"rank {rank}: TP2 logits differ from transformers by {difference}")
    (args.out / f"rank{torch.distributed.get_rank()}.ok").write_text(f"{difference}\n")
    distributed.shutdown()


if __name__ == "__main__":
    main()
