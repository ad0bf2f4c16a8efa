#!/usr/bin/env python
"""Rank the parallel layouts of a GPU budget for Idefics2 training by predicted throughput.

For every TP x PP x VPP x DP x micro-batch x recompute x optimizer-sharding layout it predicts
memory per rank (megatron_vlm/perf/memory_model.py) and step time (megatron_vlm/perf/planner.py),
lists the feasible ones fastest first and says why the others cannot run.

    python tools/plan.py --gpus 256 --gpu-mem 80 --preset idefics2-8b
    python tools/plan.py --gpus 64 --gpu-mem 80 --preset idefics2-8b --seq-length 2048 \\
        --images-per-sequence 8 --image-size 980 --global-batch 1024 --json plan.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_vlm.backbones import recipes_of  # noqa: E402
from megatron_vlm.config import TrainableConfig, load_model_preset  # noqa: E402
from megatron_vlm.perf.planner import Cluster, Job, plan  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    parser.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU, GiB")
    parser.add_argument("--preset", default="idefics2-8b", help="model preset (examples/models/) or YAML path")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=1024, help="sequences per optimizer step")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--images-per-sequence", type=int, default=4)
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="longest image side, px (square assumed; default: the preset's vision image_size)",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument(
        "--kernels", default="te", choices=["te", "local"], help="te: TE fused kernels; local: Megatron-Core local spec"
    )
    parser.add_argument("--freeze", default="", help="comma list of vision,connector,language kept frozen")
    parser.add_argument("--micro-batch-sizes", default="1,2,4")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU")
    parser.add_argument("--efficiency", type=float, default=0.5, help="achieved share of the peak in large GEMMs")
    parser.add_argument("--intra-node-gbps", type=float, default=450.0)
    parser.add_argument("--inter-node-gbps", type=float, default=50.0)
    parser.add_argument("--reserved-gib", type=float, default=4.0, help="per GPU: CUDA context, NCCL, fragmentation")
    parser.add_argument("--top", type=int, default=15, help="feasible layouts to list")
    parser.add_argument("--json", type=Path, help="write every layout (feasible or not) here")
    args = parser.parse_args(argv)

    if args.gpus < 1 or args.gpu_mem <= 0:
        parser.error("--gpus must be >= 1 and --gpu-mem > 0")
    model = load_model_preset(args.preset)
    frozen = {part.strip() for part in args.freeze.split(",") if part.strip()}
    unknown = frozen - {"vision", "connector", "language"}
    if unknown:
        parser.error(f"--freeze: unknown parts {sorted(unknown)}")
    vision, connector, _ = recipes_of(model)
    fixed = getattr(vision, "fixed_resolution", False) or getattr(connector, "fixed_tokens_per_image", False)
    if args.image_size is None:
        args.image_size = model.vision.image_size
    elif fixed and args.image_size != model.vision.image_size:
        parser.error(
            f"--image-size {args.image_size}: the {args.preset} model takes every image square at its "
            f"vision image_size, {model.vision.image_size} px"
        )
    patches_per_side = args.image_size // model.vision.patch_size
    job = Job(
        model=model,
        global_batch_size=args.global_batch,
        seq_length=args.seq_length,
        images_per_sequence=args.images_per_sequence,
        patches_per_image=patches_per_side**2,
        params_dtype=args.dtype,
        trainable=TrainableConfig(
            freeze_vision="vision" in frozen,
            freeze_connector="connector" in frozen,
            freeze_language="language" in frozen,
        ),
        kernels=args.kernels,
    )
    cluster = Cluster(
        gpus=args.gpus,
        gpu_memory_gib=args.gpu_mem,
        gpus_per_node=args.gpus_per_node,
        peak_tflops=args.peak_tflops,
        efficiency=args.efficiency,
        intra_node_gbps=args.intra_node_gbps,
        inter_node_gbps=args.inter_node_gbps,
        reserved_gib=args.reserved_gib,
    )
    sizes = tuple(int(size) for size in args.micro_batch_sizes.split(","))
    estimates = plan(job, cluster, micro_batch_sizes=sizes)
    feasible = [e for e in estimates if e.feasible]
    infeasible = [e for e in estimates if not e.feasible]

    print(
        f"{args.preset} on {args.gpus} x {args.gpu_mem:g} GiB GPUs ({args.gpus_per_node} per node): global batch "
        f"{args.global_batch} x {args.seq_length} tokens, {args.images_per_sequence} images of {args.image_size} px "
        f"per sequence, {args.dtype}, {args.kernels} kernels"
    )
    print(f"{len(feasible)} feasible layouts of {len(estimates)}; fastest first:\n")
    print("| # | layout | memory/rank GiB | step s | tokens/s | tokens/s/GPU | MFU | compute / bubble / TP / DP s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for rank, e in enumerate(feasible[: args.top], 1):
        b = e.breakdown
        print(
            f"| {rank} | {e.describe()} | {e.peak_memory_gib:.1f} | {e.step_seconds:.2f} | {e.tokens_per_second:,.0f} | "
            f"{e.tokens_per_second / args.gpus:,.0f} | {100 * e.mfu:.1f}% | "
            f"{b['compute']:.2f} / {b['bubble']:.2f} / {b['tensor_parallel']:.2f} / {b['data_parallel']:.2f} |"
        )
    if not feasible:
        print("| - | none fits: add GPUs, freeze parts, or shorten sequences | | | | | | |")
    reasons = Counter(_reason_kind(problem) for e in infeasible for problem in e.problems)
    print(f"\n{len(infeasible)} infeasible layouts; reasons (a layout may have several), count:")
    for reason, count in reasons.most_common():
        print(f"  {count:5d}  {reason}")
    print("\nexamples:")
    shown = set()
    for e in infeasible:
        kind = _reason_kind(e.problems[0])
        if kind in shown:
            continue
        shown.add(kind)
        print(f"  {e.describe()}: {'; '.join(e.problems)}")
    if args.json:
        rows = [
            {
                "layout": e.describe(),
                "tensor_parallel": e.parallel.tensor_parallel,
                "pipeline_parallel": e.parallel.pipeline_parallel,
                "virtual_pipeline": e.parallel.virtual_pipeline,
                "data_parallel": e.data_parallel,
                "micro_batch_size": e.micro_batch_size,
                "num_microbatches": e.num_microbatches,
                "recompute": e.parallel.recompute,
                "distributed_optimizer": e.distributed_optimizer,
                "feasible": e.feasible,
                "problems": e.problems,
                "peak_memory_gib": e.peak_memory_gib,
                "step_seconds": e.step_seconds,
                "tokens_per_second": e.tokens_per_second,
                "mfu": e.mfu,
                "breakdown": e.breakdown,
            }
            for e in estimates
        ]
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if feasible else 1


def _reason_kind(problem: str) -> str:
    """A problem's kind, for counting: its text up to the first number-specific detail."""
    if problem.startswith("needs "):
        return "does not fit in GPU memory"
    if "spans nodes" in problem:
        return "TP spans nodes"
    if "global batch" in problem:
        return "global batch does not split into micro-batches x DP"
    if "interleaved schedule" in problem:
        return "too few micro-batches for the interleaved schedule"
    if "must divide the" in problem:
        return "TP does not divide heads / widths"
    if "make_vocab_size_divisible_by" in problem:
        return "TP does not divide the padded vocabulary"
    if "do not split over" in problem or "split evenly" in problem:
        return "decoder layers do not split over PP x VPP"
    return problem


if __name__ == "__main__":
    raise SystemExit(main())
