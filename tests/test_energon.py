"""Pair and page shards are readable by megatron-energon as they are (energon prepare + loader)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_data import DATA

from megatron_vlm.data.preprocess import preprocess

READER = """
import json, sys
from megatron.energon import WorkerConfig, get_loader, get_train_dataset
dataset = get_train_dataset(sys.argv[1], batch_size=1, shuffle_buffer_size=None, max_samples_per_sequence=None,
                            worker_config=WorkerConfig.default_worker_config(0))
seen = []
for _, batch in zip(range(int(sys.argv[2])), get_loader(dataset)):
    seen.append({"caption": batch.caption[0], "shape": list(batch.image.shape)})
print(json.dumps(seen))
"""


@pytest.mark.parametrize("name", ["pairs", "pages"])
def test_energon_prepares_and_reads_our_shards(tmp_path, name):
    report = preprocess([DATA / f"{name}.jsonl"], tmp_path, samples_per_shard=5, progress=False)
    (tmp_path / f"{name}.report.json").unlink()  # energon indexes every file of the directory
    energon = Path(sys.executable).parent / "energon"
    subprocess.run(
        [
            str(energon),
            "prepare",
            str(tmp_path),
            "--non-interactive",
            "--split-ratio",
            "1,0,0",
            "--sample-type",
            "CaptioningSample",
            "--field-map",
            json.dumps({"image": "jpg" if name == "pairs" else "png", "caption": "txt"}),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    done = subprocess.run(
        [sys.executable, "-c", READER, str(tmp_path), str(report.written)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]
    texts = {row.get("caption", row.get("text")) for row in rows}
    assert len(seen) == report.written
    assert {s["caption"] for s in seen} == texts  # every sample, once
    assert all(s["shape"][1] == 3 and min(s["shape"][2:]) > 0 for s in seen)
