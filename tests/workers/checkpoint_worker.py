"""Run under torchrun: load a Megatron checkpoint at a given layout, save the logits of a fixed
batch (last stage, TP rank 0) to --out."""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    from megatron.core import parallel_state

    from megatron_vlm import distributed
    from megatron_vlm.config import ParallelConfig, PrecisionConfig
    from megatron_vlm.data.batch import make_batch, megatron_inputs
    from megatron_vlm.models.checkpoint_io import load_model, model_config_of, read_metadata
    from megatron_vlm.models.idefics2 import build_model_chunks
    from megatron_vlm.models.pipeline import forward_logits

    config = model_config_of(read_metadata(args.load))
    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp, virtual_pipeline=args.vpp)
    distributed.initialize(parallel, config)
    chunks = build_model_chunks(config, parallel, PrecisionConfig())
    load_model(chunks, args.load, config)
    logits = forward_logits(chunks, megatron_inputs(make_batch(config)), config.text.vocab_size)
    if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save(logits, args.out)
    distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
