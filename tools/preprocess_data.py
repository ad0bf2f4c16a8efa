"""Build indexed webdataset shards from jsonl or parquet rows with local image paths.

    python tools/preprocess_data.py examples/data/pairs.jsonl --out data/shards/pairs
    python tools/preprocess_data.py obelics-*.jsonl --out data/shards/obelics --workers 8 --samples-per-shard 2000

Every image is decoded and checked (corrupt, missing, absurd sizes); rejected rows are counted by
reason and listed in NAME.report.json. Output is deterministic for the same input.
"""

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", type=Path, nargs="+", help="jsonl or parquet files")
    parser.add_argument("--out", type=Path, required=True, help="output directory for the shards")
    parser.add_argument("--name", help="shard name prefix (default: first input's stem)")
    parser.add_argument("--kind", choices=["interleaved", "pair", "page"], help="force the row layout")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1, help="processes that read and check images")
    args = parser.parse_args()
    missing = [str(p) for p in args.inputs if not p.is_file()]
    if missing:
        parser.error(f"input files not found: {missing}")

    from megatron_vlm.data.preprocess import preprocess

    report = preprocess(args.inputs, args.out, args.samples_per_shard, args.workers, args.kind, name=args.name)
    summary = {k: v for k, v in report.to_dict().items() if k != "rejects"}
    print(json.dumps(summary))
    return 0 if report.written else 1


if __name__ == "__main__":
    sys.exit(main())
