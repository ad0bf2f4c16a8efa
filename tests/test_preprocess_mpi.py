"""tools/preprocess_data.py as an MPI job (mpich's mpiexec, mpi4py): 1 and 3 ranks and a plain run give
the same output directory byte for byte (shards, indexes, validation split, report), and on 3 ranks
each rank reads its own slice of the input files (the summary's per-rank counts)."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as parquet
from PIL import Image
from skimage import data as photos

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def jpeg(pixels, size: int = 64) -> bytes:
    image = Image.fromarray(pixels)
    image.thumbnail((size, size))
    output = io.BytesIO()
    image.save(output, format="JPEG", quality=85)
    return output.getvalue()


def build_inputs(root: Path) -> list[Path]:
    """Four inputs of four formats: jsonl with paths, parquet with bytes, an img2dataset tar, PDFs."""
    from reportlab.pdfgen import canvas

    pictures = [jpeg(p) for p in (photos.astronaut(), photos.chelsea(), photos.coffee(), photos.rocket())]
    rows = [{"image": {"bytes": pictures[i % 4], "path": None}, "caption": f"Photo {i}."} for i in range(9)]
    parquet.write_table(pa.Table.from_pylist(rows), root / "photos.parquet", row_group_size=4)
    with tarfile.open(root / "00000.tar", "w") as tar:
        for i in range(5):
            meta = json.dumps({"url": f"https://x/{i}.jpg", "key": f"{i:09d}", "status": "success"}).encode()
            for extension, payload in (("jpg", pictures[i % 4]), ("txt", f"Caption {i}.".encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{i:09d}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    with tarfile.open(root / "docs.tar", "w") as tar:
        for i in range(2):
            output = io.BytesIO()
            document = canvas.Canvas(output, pagesize=(200, 260), invariant=1)
            for page in range(2):
                document.drawString(20, 200, f"Document {i} page {page}")
                document.showPage()
            document.save()
            info = tarfile.TarInfo(f"doc{i}.pdf")
            info.size = len(output.getvalue())
            tar.addfile(info, io.BytesIO(output.getvalue()))
    return [ROOT / "examples" / "data" / "pairs.jsonl", root / "photos.parquet", root / "00000.tar", root / "docs.tar"]


def run_tool(inputs: list[Path], out: Path, ranks: int | None) -> dict:
    command = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), *map(str, inputs), "--out", str(out)]
    command += ["--samples-per-shard", "3", "--validation-fraction", "0.3", "--pdf-dpi", "36", "--name", "mix"]
    if ranks is not None:
        command = [str(MPIEXEC), "-n", str(ranks), *command, "--mpi"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_"))}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    summaries = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # rank 0 alone prints the summary
    return json.loads(summaries[0])


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_output_is_the_same_on_1_and_3_ranks(tmp_path):
    assert MPIEXEC.exists(), f"no mpiexec at {MPIEXEC}: the 'test' extra installs mpich (pip install -e '.[test]')"
    inputs = build_inputs(tmp_path)
    plain = run_tool(inputs, tmp_path / "plain", None)
    one = run_tool(inputs, tmp_path / "one", 1)
    three = run_tool(inputs, tmp_path / "three", 3)
    # Who did the work: the units (input files, by number) each rank read, their rows and the samples it
    # wrote. Rank r of 3 takes units r, r + 3: pairs.jsonl (13 rows) and docs.tar (2 PDFs, 4 pages) on
    # rank 0, photos.parquet (9) on rank 1, the img2dataset tar (5) on rank 2.
    everything = [{"rank": 0, "units": [0, 1, 2, 3], "rows": 13 + 9 + 5 + 2, "samples": 13 + 9 + 5 + 4}]
    assert plain.pop("ranks") == one.pop("ranks") == everything
    assert three.pop("ranks") == [
        {"rank": 0, "units": [0, 3], "rows": 13 + 2, "samples": 13 + 4},
        {"rank": 1, "units": [1], "rows": 9, "samples": 9},
        {"rank": 2, "units": [2], "rows": 5, "samples": 5},
    ]
    assert plain == one == three
    assert plain["rows"] == 13 + 9 + 5 + 2 and plain["written"] + plain["validation"] == 13 + 9 + 5 + 4
    assert plain["validation"] > 0 and plain["reindexed"] == [str(tmp_path / "00000.tar")]
    reference = tree(tmp_path / "plain")
    assert any(name.startswith("validation/mix-") for name in reference)
    assert not any(".parts" in name for name in reference)  # the ranks' parts were all renamed
    for other in ("one", "three"):
        assert tree(tmp_path / other) == reference, other
