"""Run under torchrun: the trainer's evaluation (``training/evaluation.py``) of saved checkpoints
at a given TP/PP layout, on a data root whose sources hold validation splits.

Builds what the trainer builds (tokenizer, loader of this data-parallel rank, model chunks of the
layout, DDP), loads each checkpoint's weights and writes ``rank{N}.json`` into --out: per
checkpoint, the validation loss and loss tokens per source.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--first-stage-layers", type=int, default=None)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--mixture", default="tiny")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--checkpoint", type=Path, action="append", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    from megatron.core import parallel_state

    from megatron_vlm import distributed
    from megatron_vlm.backbones import recipes_of
    from megatron_vlm.config import ParallelConfig, PrecisionConfig
    from megatron_vlm.data.loader import MultimodalLoader, load_data_config
    from megatron_vlm.data.tokens import load_tokenizer
    from megatron_vlm.models.checkpoint_io import load_model, model_config_of, read_metadata
    from megatron_vlm.models.idefics2 import build_model_chunks
    from megatron_vlm.training.evaluation import Evaluator
    from megatron_vlm.training.step import wrap_ddp

    config = model_config_of(read_metadata(args.checkpoint[0]))
    parallel = ParallelConfig(
        tensor_parallel=args.tp,
        pipeline_parallel=args.pp,
        virtual_pipeline=args.vpp,
        decoder_layers_in_first_stage=args.first_stage_layers,
    )
    distributed.initialize(parallel, config, seed=1234)
    data = load_data_config(
        args.mixture, args.data_root, micro_batch_size=args.micro_batch_size, image_backend="pillow", seed=99
    )
    loader = MultimodalLoader(
        data,
        load_tokenizer(name=recipes_of(config)[2].tokenizer),
        config.connector.num_latents,
        config.image_token_id,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
    )
    evaluator = Evaluator(loader, args.samples, "cpu")
    chunks = build_model_chunks(config, parallel, PrecisionConfig())
    model = wrap_ddp(chunks)
    result: dict = {"rank": torch.distributed.get_rank(), "pp_rank": parallel_state.get_pipeline_model_parallel_rank()}
    for checkpoint in args.checkpoint:
        load_model(chunks, checkpoint, config)
        losses = evaluator.run(model)
        result[checkpoint.name] = {name: [loss.loss, loss.tokens] for name, loss in losses.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{result['rank']}.json").write_text(json.dumps(result))
    distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
