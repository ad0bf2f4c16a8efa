"""Check a converted checkpoint against its Hugging Face original on real photos and text.

    python tools/verify_conversion.py --hf DIR --megatron DIR [--tp 2 --pp 2] [--images a.jpg b.png]

Runs both models on the same inputs (transformers' Idefics2 processor; default photos ship with
scikit-image) and reports the largest logit difference and top-1 agreement as one JSON line.
transformers' model is loaded in the checkpoint's dtype and both compute in float32, so the
default tolerance (1e-4) holds for float32 and bfloat16 checkpoints alike; the JSON states the
dtype and the tolerance. Exits 1 above --tolerance.
"""

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", type=Path, required=True)
    parser.add_argument("--megatron", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--images", type=Path, nargs="+", help="photos to use (default: scikit-image's)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest |logit difference| (default 1e-4)")
    args = parser.parse_args()

    from PIL import Image

    from megatron_vlm import distributed
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.conversion.verify import verify_checkpoints
    from megatron_vlm.models.checkpoint_io import model_config_of, read_metadata

    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp)
    config = model_config_of(read_metadata(args.megatron))
    distributed.start_tool(config, parallel, args.tp * args.pp)
    try:
        photos = [Image.open(path).convert("RGB") for path in args.images] if args.images else None
        result = verify_checkpoints(args.hf, args.megatron, parallel, photos, args.tolerance)
        if distributed.detect_environment().rank == 0:
            print(json.dumps({"layout": f"TP{args.tp}xPP{args.pp}", **result}))
    finally:
        distributed.shutdown()
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
