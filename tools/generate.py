"""Generate text from a megatron-vlm checkpoint (converted or from training) at any TP/PP layout.

    python tools/generate.py --checkpoint ckpt/idefics2-8b --prompt "<image>A photo of" --image cat.jpg
    python tools/generate.py --checkpoint runs/tiny/checkpoints --tp 2 --pp 2 --prompts prompts.jsonl --json

The prompt is text with ``<image>`` placeholders, one per --image, as transformers' processors take
it; images are processed as the processor written by ``convert_megatron_to_hf.py --tokenizer`` does
(image splitting included; --no-image-splitting turns it off). --prompts reads a JSONL file, one
``{"prompt": ..., "images": [paths, relative to the file], "id": ...}`` per line. Greedy by default;
--do-sample with --temperature / --top-p / --seed samples. A row stops at EOS, <end_of_utterance>,
a --stop string, or --max-new-tokens. With TP*PP > 1 the tool runs itself under torchrun.

With --json the last line of stdout is ``{"text": ..., "token_ids": [...]}`` (the generated ids only)
for one prompt; for --prompts every prompt's line is printed, in order, with its id.
"""

import argparse
import json
import sys
from pathlib import Path


def read_prompts(args: argparse.Namespace) -> list[dict]:
    """The prompts of the command line: one (--prompt, --image ...) or a JSONL file's lines."""
    if args.prompts is None:
        return [{"id": 0, "prompt": args.prompt, "images": [str(path) for path in args.image]}]
    prompts = []
    for number, line in enumerate(args.prompts.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise SystemExit(f"{args.prompts}:{number}: not JSON ({error})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise SystemExit(f'{args.prompts}:{number}: expected {{"prompt": TEXT, "images": [...]}}')
        images = [str(args.prompts.parent / image) for image in entry.get("images", [])]
        prompts.append({"id": entry.get("id", len(prompts)), "prompt": entry["prompt"], "images": images})
    return prompts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory, or a run's checkpoints/")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="text with one <image> per --image")
    source.add_argument("--prompts", type=Path, help="JSONL file of prompts")
    parser.add_argument("--image", type=Path, nargs="*", default=[], help="images of --prompt, in order")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (each prompt draws from its own)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--no-image-splitting", action="store_true", help="do not split images into crops")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's, e.g. Mistral-7B's)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward (--prompts)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: the checkpoint's")
    parser.add_argument("--json", action="store_true", help="print JSON (see above)")
    args = parser.parse_args()
    if args.prompt is not None and args.prompt.count("<image>") != len(args.image):
        parser.error(f"--prompt has {args.prompt.count('<image>')} <image> placeholders for {len(args.image)} --image")

    from megatron_vlm import distributed
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.models.checkpoint_io import model_config_of, read_metadata
    from megatron_vlm.training.checkpoint import model_checkpoint

    directory = model_checkpoint(args.checkpoint)  # a run's checkpoints/: its latest complete one
    config = model_config_of(read_metadata(directory))
    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp, virtual_pipeline=args.vpp)
    prompts = read_prompts(args)
    distributed.start_tool(config, parallel, args.tp * args.pp)
    try:
        from PIL import Image

        from megatron_vlm.data.tokens import load_tokenizer
        from megatron_vlm.inference.generate import GenerationConfig, generate
        from megatron_vlm.inference.loading import load_for_inference
        from megatron_vlm.inference.prompts import prompt_encoder

        chunks, config, _ = load_for_inference(directory, parallel, args.dtype)
        tokenizer = load_tokenizer(args.tokenizer, name="mistral") if args.tokenizer else None
        encoder = prompt_encoder(config, tokenizer, do_image_splitting=not args.no_image_splitting)
        generation = GenerationConfig(
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            stop_token_ids=encoder.stop_token_ids,
            stop_strings=tuple(args.stop),
        )
        rank0 = distributed.detect_environment().rank == 0
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            images = [[Image.open(path) for path in entry["images"]] for entry in batch]
            _, inputs = encoder.encode([entry["prompt"] for entry in batch], images)
            outputs = generate(
                chunks, inputs, generation, encoder.decode, sample_seeds=range(start, start + len(batch))
            )
            if not rank0:
                continue
            for entry, out in zip(batch, outputs, strict=True):
                ties = out.near_ties(1e-4)  # greedy steps float noise could flip (another layout, batch)
                if ties:
                    print(f"[{entry['id']}] near-ties (top-two logits within 1e-4) at steps {ties}", file=sys.stderr)
                if args.json:
                    record = {"text": out.text, "token_ids": out.token_ids, "stop_reason": out.stop_reason}
                    record["near_ties"] = ties
                    print(json.dumps({"id": entry["id"], **record} if args.prompts else record), flush=True)
                else:
                    print(f"[{entry['id']}] {entry['prompt']!r} -> {out.text!r} ({out.stop_reason})", flush=True)
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing may spawn worker processes
    sys.exit(main())
