"""Make a shard directory of ours readable by Megatron-Energon, Megatron's own multimodal loader.

    python tools/prepare_energon.py data/interleaved     # then get_train_dataset("data/interleaved", ...)

Runs ``energon prepare`` on the directory (its index, ``.nv-meta/``; the held-out ``validation/``
split left out, so energon never reads what our validation holds out) with the sample type of the
shards' kind: ``InterleavedSample`` for interleaved documents (``sequence``: texts and images in
document order), ``CaptioningSample`` for pairs and pages (``image``, ``caption``). Energon's field map
cannot express a variable number of images, so the dataset's ``sample_loader.py`` is ours
(``megatron_vlm/data/energon_sample_loader.py``, standalone), which also finds a pair's image whatever
its extension (a shard may hold JPEG and PNG images). Conversations have no energon sample type and
are refused by name.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE_TYPES = {"interleaved": "InterleavedSample", "pair": "CaptioningSample", "page": "CaptioningSample"}


def prepare(shards: Path) -> str:
    """``energon prepare`` + our sample loader; returns the energon sample type."""
    from megatron_vlm.data import energon_sample_loader
    from megatron_vlm.data.shards import Shard, shard_paths

    paths = shard_paths(shards)
    if not paths:
        raise FileNotFoundError(f"no shards (*.tar) in {shards}")
    kinds = {sample.kind for path in paths for sample in Shard(path)}
    if len(kinds) != 1 or next(iter(kinds)) not in SAMPLE_TYPES:
        raise ValueError(
            f"{shards} holds {sorted(kinds)} samples; energon reads one kind per dataset, one of {sorted(SAMPLE_TYPES)}"
        )
    sample_type = SAMPLE_TYPES[kinds.pop()]
    energon = [sys.executable, "-c", "import sys; from megatron.energon.cli.main import main; sys.exit(main())"]
    command = [*energon, "prepare", str(shards), "--non-interactive", "--force-overwrite", "--no-progress"]
    command += ["--split-ratio", "1,0,0", "--sample-type", sample_type, "--exclude", "(^|/)validation/"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"energon prepare failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    shutil.copyfile(energon_sample_loader.__file__, shards / ".nv-meta" / "sample_loader.py")
    return sample_type


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", type=Path, help="a shard directory (tools/preprocess_data.py output)")
    args = parser.parse_args(argv)
    sample_type = prepare(args.shards)
    print(f"{args.shards}: energon dataset of {sample_type} (.nv-meta/, sample_loader.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
