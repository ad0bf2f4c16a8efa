"""Score a megatron-vlm checkpoint on the paper's benchmarks (4-shot VQAv2, TextVQA, OK-VQA, COCO),
at any TP/PP/DP layout.

    python tools/evaluate.py --checkpoint ckpt/run --task vqav2=data/VQAv2 --task coco=data/coco --out eval/
    python tools/evaluate.py --checkpoint runs/tiny/checkpoints --tp 2 --pp 2 --dp 2 --task textvqa=data/textvqa --out eval/
    python tools/evaluate.py --rescore eval/

A task's data is a directory (or file) in a layout users download: the Hub's parquet (lmms-lab's
VQAv2, textvqa, OK-VQA, COCO-Caption2017) or the original release (questions + annotations JSON and
a COCO image folder; TextVQA's JSON; Karpathy's dataset_coco.json). Shots come from the layout's
train split (or, where it has none, the evaluated split without the query). OUT gets
<task>.predictions.jsonl (one line per question: id, prediction, references, the shots' ids) and
results.json (each task's metrics and count, the paper's average, settings, inference cost). An
interrupted run resumes where it stopped; --rescore recomputes results.json from the predictions
files alone. With TP*PP*DP > 1 the tool runs itself under torchrun.
"""

import argparse
import json
import sys
from pathlib import Path


def named_paths(values: list[str], flag: str, parser: argparse.ArgumentParser) -> dict[str, Path]:
    paths = {}
    for value in values:
        name, _, path = value.partition("=")
        if not path:
            parser.error(f"{flag} {value!r}: expected NAME=PATH")
        paths[name] = Path(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="checkpoint directory, or a run's checkpoints/")
    parser.add_argument("--rescore", type=Path, metavar="OUT", help="recompute OUT/results.json from its predictions")
    parser.add_argument(
        "--task", action="append", default=[], help="NAME=PATH (repeatable): vqav2, textvqa, okvqa, coco"
    )
    parser.add_argument("--image-dir", action="append", default=[], help="NAME=DIR: a release's image folder")
    parser.add_argument("--split", default="eval", help="split to score (default: each layout's evaluation split)")
    parser.add_argument("--shots", type=int, default=4, help="in-context examples per question (paper: 4)")
    parser.add_argument("--seed", type=int, default=0, help="which in-context examples each question gets")
    parser.add_argument("--limit", type=int, help="score only the first N questions of each task")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generation batch and replica")
    parser.add_argument("--max-new-tokens", type=int, help="default: each task's")
    parser.add_argument("--out", type=Path, help="output directory")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--dp", type=int, default=1, help="data-parallel replicas (questions are shared out)")
    parser.add_argument("--image-splitting", action="store_true", help="split images into 4 crops + the image")
    parser.add_argument("--longest-edge", type=int, help="resize images as the model was trained (default: export's)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: the checkpoint's")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    args = parser.parse_args()

    if args.rescore is not None:
        from megatron_vlm.evaluation.harness import rescore

        print(json.dumps(rescore(args.rescore), indent=2))
        return 0
    if args.checkpoint is None or args.out is None or not args.task:
        parser.error("give --checkpoint, --out and at least one --task NAME=PATH (or --rescore OUT)")
    data_paths = named_paths(args.task, "--task", parser)
    image_dirs = named_paths(args.image_dir, "--image-dir", parser)

    from megatron_vlm import distributed
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.evaluation.tasks import tasks
    from megatron_vlm.models.checkpoint_io import model_config_of, read_metadata
    from megatron_vlm.training.checkpoint import model_checkpoint

    unknown = sorted(set(data_paths) - set(tasks()))
    if unknown:
        parser.error(f"unknown task(s) {unknown}; known: {tasks()}")
    directory = model_checkpoint(args.checkpoint)  # a run's checkpoints/: its latest complete one
    config = model_config_of(read_metadata(directory))
    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp, virtual_pipeline=args.vpp)
    distributed.start_tool(config, parallel, args.tp * args.pp * args.dp)
    try:
        import dataclasses

        from megatron_vlm.data.tokens import load_tokenizer
        from megatron_vlm.evaluation.harness import EvalSettings, Evaluator, load_task_data
        from megatron_vlm.inference.loading import load_for_inference
        from megatron_vlm.inference.prompts import exported_image_config, prompt_encoder

        settings = EvalSettings(
            shots=args.shots,
            seed=args.seed,
            batch_size=args.batch_size,
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
        )
        datas = [
            load_task_data(name, path, args.split, image_dir=image_dirs.get(name), limit=args.limit)
            for name, path in data_paths.items()
        ]
        chunks, config, _ = load_for_inference(directory, parallel, args.dtype)
        image = exported_image_config(config, args.image_splitting)
        if args.longest_edge:
            image = dataclasses.replace(
                image, longest_edge=args.longest_edge, shortest_edge=min(image.shortest_edge, args.longest_edge)
            )
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        evaluator = Evaluator(chunks, prompt_encoder(config, tokenizer, image=image), config, settings)
        results = evaluator.run(datas, args.out)
        if distributed.detect_environment().rank == 0:
            scores = {k: v for k, v in results.items() if k not in ("settings", "inference")}
            print(json.dumps(scores, indent=2))
            print(f"wrote {args.out / 'results.json'} in {evaluator.seconds:.1f} s")
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing may spawn worker processes
    sys.exit(main())
