"""Run under torchrun: train a few steps of a fixed workload at a given layout and write, per
rank, the measured training-state peak memory next to the memory model's prediction."""

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
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--recompute", default="none")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig
    from memory_config import memory_check_config, memory_check_workload

    from megatron_vlm import distributed
    from megatron_vlm.backbones.common import torch_dtype
    from megatron_vlm.config import ParallelConfig, PrecisionConfig
    from megatron_vlm.models.idefics2 import build_model_chunks
    from megatron_vlm.perf.memory import TrainingMemoryMeter
    from megatron_vlm.perf.memory_model import TrainingSetup, predict_stage_memory
    from megatron_vlm.perf.workload import synthetic_micro_batch
    from megatron_vlm.training.step import build_optimizer, train_step, wrap_ddp

    torch.set_num_threads(1)
    config, work = memory_check_config(), memory_check_workload()
    parallel = ParallelConfig(
        tensor_parallel=args.tp, pipeline_parallel=args.pp, virtual_pipeline=args.vpp, recompute=args.recompute
    )
    env = distributed.initialize(parallel, config)
    batches = [synthetic_micro_batch(config, work, seed=i) for i in range(args.micro_batches)]
    meter = TrainingMemoryMeter()
    meter.start()  # after imports, process groups and the step's inputs: the model's state from here
    chunks = build_model_chunks(config, parallel, PrecisionConfig(params_dtype=args.dtype))
    model = wrap_ddp(chunks, args.distributed_optimizer)
    optimizer = build_optimizer(
        model,
        OptimizerConfig(
            optimizer="adam",
            lr=1e-4,
            bf16=args.dtype == "bfloat16",
            params_dtype=torch_dtype(args.dtype),
            use_distributed_optimizer=args.distributed_optimizer,
        ),
    )
    for _ in range(args.steps):
        loss = train_step(model, optimizer, batches)["loss"]
    measured = meter.peak_bytes()
    setup = TrainingSetup(
        parallel=parallel,
        data_parallel=parallel_state.get_data_parallel_world_size(),
        num_microbatches=args.micro_batches,
        params_dtype=args.dtype,
        distributed_optimizer=args.distributed_optimizer,
    )
    stage = parallel_state.get_pipeline_model_parallel_rank()
    predicted = predict_stage_memory(config, setup, work, stage)
    # The inputs were built before the meter started: the prediction's input term is not measured.
    predicted_peak = predicted.peak - predicted.inputs
    result = {
        "rank": env.rank,
        "stage": stage,
        "measured_bytes": measured,
        "predicted_bytes": predicted_peak,
        "predicted": predicted.as_dict(),
        "parameters": sum(p.numel() for chunk in chunks for p in chunk.parameters()),
        "loss": loss,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{env.rank}.json").write_text(json.dumps(result, indent=2))
    distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
