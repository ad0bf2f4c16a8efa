"""Export a Megatron checkpoint (any TP/PP; LoRA adapters merged) to a Hugging Face directory.

    python tools/convert_megatron_to_hf.py --megatron DIR --out DIR [--tokenizer DIR]

The result loads with ``Idefics2ForConditionalGeneration.from_pretrained``: config.json, sharded
safetensors with an index, and tokenizer/processor files when --tokenizer is given ("mistral"
means the Mistral-7B tokenizer from mistral-common). Written to a temporary directory, renamed
at the end.
"""

import argparse
from pathlib import Path


def parse_size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron", type=Path, required=True, help="Megatron checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="HF directory to create")
    parser.add_argument("--tokenizer", help="tokenizer directory to include, or 'mistral'")
    parser.add_argument("--max-shard-size", type=parse_size, default="5GB", help="e.g. 5GB, 500MB")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], help="default: the checkpoint's dtype")
    args = parser.parse_args()

    from megatron_vlm import distributed
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.conversion import convert
    from megatron_vlm.models.checkpoint_io import model_config_of, read_metadata

    config = model_config_of(read_metadata(args.megatron))
    distributed.start_tool(config, ParallelConfig(), 1)
    try:
        tokenizer = None if args.tokenizer in (None, "mistral") else args.tokenizer
        report = convert.megatron_to_hf(
            args.megatron,
            args.out,
            tokenizer_dir=tokenizer,
            include_tokenizer=args.tokenizer is not None,
            max_shard_bytes=args.max_shard_size,
            dtype=args.dtype,
        )
        print(f"wrote {args.out}: {report.summary()}")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
