"""Convert Hugging Face weights to a Megatron-Core distributed checkpoint (any TP/PP).

    python tools/convert_hf_to_megatron.py --hf DIR --out DIR --tp 2 --pp 2
    python tools/convert_hf_to_megatron.py --vision-hf SIGLIP --text-hf MISTRAL --out DIR

With TP*PP > 1 the tool runs itself under torchrun on this node (each rank reads only its tensors);
the checkpoint then loads at any layout. From SigLIP + Mistral the connector is freshly
initialised (its shape from --connector-preset) and the vocabulary gains the 3 image tokens.
The weights keep the source's dtype unless --dtype says otherwise.
"""

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("source (either --hf, or --vision-hf with --text-hf)")
    source.add_argument("--hf", type=Path, help="Idefics2 HF checkpoint directory")
    source.add_argument("--vision-hf", type=Path, help="SigLIP HF checkpoint directory")
    source.add_argument("--text-hf", type=Path, help="Mistral HF checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="Megatron checkpoint directory to create")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to convert at")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to convert at")
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        help="default: the source's dtype (config.json, else its tensors); float16 or mixed sources: fp32",
    )
    parser.add_argument(
        "--connector-preset", default="idefics2-8b", help="preset whose connector shape to use (SigLIP + Mistral)"
    )
    parser.add_argument(
        "--image-size", type=int, default=980, help="largest image side; sizes the position table (SigLIP + Mistral)"
    )
    args = parser.parse_args()
    if bool(args.hf) == bool(args.vision_hf or args.text_hf) or (args.vision_hf is None) != (args.text_hf is None):
        parser.error("give --hf, or both --vision-hf and --text-hf")

    from megatron_vlm import distributed
    from megatron_vlm.config import ParallelConfig, load_model_preset
    from megatron_vlm.conversion import convert
    from megatron_vlm.conversion.hf_config import from_hf_config

    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp)
    connector = load_model_preset(args.connector_preset).connector
    if args.hf:
        config = from_hf_config(json.loads((args.hf / "config.json").read_text()))
    else:
        config = convert.combined_model_config(
            json.loads((args.vision_hf / "config.json").read_text()),
            json.loads((args.text_hf / "config.json").read_text()),
            connector,
            args.image_size,
        )
    distributed.start_tool(config, parallel, args.tp * args.pp)
    try:
        if args.hf:
            report = convert.hf_to_megatron(args.hf, args.out, parallel, args.dtype)
        else:
            report = convert.separate_to_megatron(
                args.vision_hf, args.text_hf, args.out, parallel, connector, args.image_size, args.dtype
            )
        if distributed.detect_environment().rank == 0:
            print(f"wrote {args.out} at TP{args.tp} x PP{args.pp}: {report.summary()}")
    finally:
        distributed.shutdown()


if __name__ == "__main__":  # the guard matters: dist_checkpointing may spawn worker processes
    main()
