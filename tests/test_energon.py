"""Our shards are readable by megatron-energon: ``tools/prepare_energon.py`` runs ``energon prepare``
with the sample type of their kind and installs our sample loader; energon's own loader then reads
every training sample once (pairs and pages as CaptioningSample, interleaved documents as
InterleavedSample with their texts and images in document order) and never the held-out split."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_data import DATA

from megatron_vlm.data.preprocess import preprocess
from megatron_vlm.data.shards import Shard, shard_paths

ROOT = Path(__file__).resolve().parents[1]
READER = """
import json, sys
from megatron.energon import WorkerConfig, get_loader, get_train_dataset
dataset = get_train_dataset(sys.argv[1], batch_size=1, shuffle_buffer_size=None, max_samples_per_sequence=None,
                            worker_config=WorkerConfig.default_worker_config(0))
seen = []
for _, batch in zip(range(int(sys.argv[2])), get_loader(dataset)):
    if hasattr(batch, "sequence"):
        seen.append([part if isinstance(part, str) else list(part.shape) for part in batch.sequence[0]])
    else:
        seen.append([batch.caption[0], list(batch.image.shape[1:])])
print(json.dumps(seen))
"""


@pytest.mark.parametrize("name", ["pairs", "pages", "interleaved"])
def test_energon_prepares_and_reads_our_shards(tmp_path, name):
    report = preprocess(
        [DATA / f"{name}.jsonl"],
        tmp_path,
        samples_per_shard=3,
        progress=False,
        validation_fraction=0.25,
        validation_seed=7,
    )
    assert report.validation > 0  # a held-out split, which energon must not read
    done = subprocess.run(
        [sys.executable, "tools/prepare_energon.py", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected_type = "InterleavedSample" if name == "interleaved" else "CaptioningSample"
    assert expected_type in done.stdout
    done = subprocess.run(
        [sys.executable, "-c", READER, str(tmp_path), str(report.written)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seen = json.loads(done.stdout.strip().splitlines()[-1])

    # What each training sample should read as, from our own shards' members (texts, image sizes).
    def expected(sample) -> list:
        parts = [s if isinstance(s, str) else [3, *Image.open(io.BytesIO(s)).size[::-1]] for s in sample.segments]
        return parts if name == "interleaved" else [parts[1], parts[0]]

    training = [expected(s) for path in shard_paths(tmp_path) for s in Shard(path)]
    held_out = [expected(s) for path in shard_paths(tmp_path / "validation") for s in Shard(path)]
    assert len(seen) == len(training) == report.written
    assert sorted(map(json.dumps, seen)) == sorted(map(json.dumps, training))  # every one once, in order inside
    assert not any(s in seen for s in held_out)
    if name == "interleaved":  # the documents themselves, as the input file has them
        rows = [json.loads(line) for line in (DATA / "interleaved.jsonl").read_text().splitlines()]
        texts = {tuple(t for t in row["texts"] if t is not None) for row in rows}
        assert all(tuple(p for p in s if isinstance(p, str)) in texts for s in seen)
        assert any(sum(not isinstance(p, str) for p in s) > 1 for s in seen)  # documents with several images
