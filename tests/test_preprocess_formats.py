"""Every input format of tools/preprocess_data.py on real files the tests build: parquet with embedded
image bytes (and paths, and URLs through a local mirror), a `datasets` Arrow directory, OBELICS
documents, img2dataset tars (indexed as they are, or rewritten), PDFs rendered page by page; the
validation split; and the loader reading every output."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as parquet
import pytest
from PIL import Image
from skimage import data as photos

from megatron_vlm.data.images import ImageConfig
from megatron_vlm.data.loader import DataConfig, MultimodalLoader, SourceConfig
from megatron_vlm.data.preprocess import is_validation, preprocess
from megatron_vlm.data.shards import Shard, shard_paths
from megatron_vlm.data.tokens import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SMALL_IMAGES = ImageConfig(longest_edge=112, shortest_edge=56)
CAPTIONS = ["An astronaut in a suit.", "A cat looking up.", "A cup of coffee.", "A rocket on its pad.", "A cameraman."]


def jpeg(pixels: np.ndarray, size: int = 96) -> bytes:
    image = Image.fromarray(pixels)
    image.thumbnail((size, size))
    output = io.BytesIO()
    image.save(output, format="JPEG", quality=90)
    return output.getvalue()


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return [jpeg(p) for p in (photos.astronaut(), photos.chelsea(), photos.coffee(), photos.rocket(), photos.camera())]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def read_all(directory: Path) -> list:
    return [sample for path in shard_paths(directory) for sample in Shard(path)]


def loader_yields(directory: Path, tokenizer, seq_len: int = 256) -> dict:
    """A micro-batch the loader makes from a preprocessed shard set (what training consumes)."""
    config = DataConfig(
        sources=(SourceConfig("src", str(directory), 1.0, seq_len),), image=SMALL_IMAGES, micro_batch_size=1
    )
    batch = next(MultimodalLoader(config, tokenizer, image_seq_len=8, image_token_id=32001))
    assert batch["pixel_values"].shape[0] >= 1 and int(batch["loss_mask"].sum()) > 0
    return batch


# --- parquet and arrow ------------------------------------------------------------------------------


def test_parquet_with_embedded_bytes_paths_and_mirrored_urls(tmp_path, jpegs, tokenizer):
    (tmp_path / "local.jpg").write_bytes(jpegs[3])
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "cam.jpg").write_bytes(jpegs[4])
    (tmp_path / "mirror" / "urls.json").write_text(json.dumps({"https://example.org/cam.jpg": "cam.jpg"}))
    images = [
        {"bytes": jpegs[0], "path": "astronaut.jpg"},
        {"bytes": jpegs[1], "path": None},
        {"bytes": jpegs[2], "path": "coffee.jpg"},
        {"bytes": None, "path": "local.jpg"},  # the datasets Image feature of a file on disk
        {"bytes": None, "path": "https://example.org/cam.jpg"},
        {"bytes": b"not an image", "path": "broken.jpg"},
        {"bytes": None, "path": "https://example.org/not-mirrored.jpg"},
    ]
    captions = [*CAPTIONS, "Broken bytes.", "Nowhere."]
    table = pa.table({"image": images, "caption": captions, "similarity": [0.3] * len(captions)})
    parquet.write_table(table, tmp_path / "pairs.parquet", row_group_size=3)  # several row groups

    report = preprocess(
        [tmp_path / "pairs.parquet"],
        tmp_path / "out",
        samples_per_shard=2,
        progress=False,
        url_mirror=tmp_path / "mirror" / "urls.json",
    )
    assert report.rows == 7 and report.written == 5
    assert report.rejected == {"corrupt_image": 1, "missing_image": 1}
    assert [r["row"] for r in report.rejects] == [5, 6]
    assert report.shards == ["pairs-00000.tar", "pairs-00001.tar", "pairs-00002.tar"]
    samples = read_all(tmp_path / "out")
    assert [s.kind for s in samples] == ["pair"] * 5
    assert [s.texts[0] for s in samples] == CAPTIONS
    assert [s.images[0] for s in samples] == jpegs  # JPEG bytes stored unchanged
    loader_yields(tmp_path / "out", tokenizer)


def test_obelics_documents_from_parquet_and_a_datasets_arrow_directory(tmp_path, jpegs, tokenizer):
    """OBELICS' schema: texts / images lists with None holes plus metadata columns; the same rows
    as parquet and as `datasets` save_to_disk directories (written by `datasets` itself, the 'test'
    extra installs it: one data file, and two with num_shards=2) give the same shards."""
    import datasets

    rows = {
        "images": [[{"bytes": jpegs[0], "path": None}, None, None], [None, {"bytes": jpegs[2], "path": None}]],
        "texts": [[None, "An astronaut.", "Then space."], ["Morning coffee:", None]],
        "metadata": ['[{"document_url": "a"}]', '[{"document_url": "b"}]'],
        "general_metadata": ['{"url": "https://a"}', '{"url": "https://b"}'],
    }
    parquet.write_table(pa.table(rows), tmp_path / "obelics.parquet")
    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "texts": datasets.Sequence(datasets.Value("string")),
            "metadata": datasets.Value("string"),
            "general_metadata": datasets.Value("string"),
        }
    )
    dataset = datasets.Dataset.from_dict(rows, features=features)
    arrow_dirs = {1: tmp_path / "obelics_arrow", 2: tmp_path / "obelics_arrow_2"}
    for shards, directory in arrow_dirs.items():
        dataset.save_to_disk(str(directory), num_shards=shards)
        # What save_to_disk writes: its data files (IPC streams), state.json listing them in order,
        # and dataset_info.json with the features (the Image feature inside the images list).
        data_files = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
        assert sorted(p.name for p in directory.iterdir()) == [*data_files, "dataset_info.json", "state.json"]
        state = json.loads((directory / "state.json").read_text())
        assert state["_data_files"] == [{"filename": name} for name in data_files] and state["_fingerprint"]
        info = json.loads((directory / "dataset_info.json").read_text())
        assert info["features"]["images"]["feature"] == {"_type": "Image"}, info["features"]
        lengths = [pa.ipc.open_stream(directory / name).read_all().num_rows for name in data_files]
        assert lengths == ([2] if shards == 1 else [1, 1])  # with two files, one document in each

    one = preprocess([tmp_path / "obelics.parquet"], tmp_path / "pq", samples_per_shard=4, progress=False)
    two = preprocess([arrow_dirs[1]], tmp_path / "arrow", samples_per_shard=4, name="obelics", progress=False)
    three = preprocess([arrow_dirs[2]], tmp_path / "arrow2", samples_per_shard=4, name="obelics", progress=False)
    assert one.written == two.written == three.written == 2
    assert not one.rejected and not two.rejected and not three.rejected
    first, second = read_all(tmp_path / "pq")
    assert first.kind == "interleaved" and first.segments == [jpegs[0], "An astronaut.", "Then space."]
    assert second.segments == ["Morning coffee:", jpegs[2]]
    assert [s.segments for s in read_all(tmp_path / "arrow")] == [first.segments, second.segments]
    assert three.shards == ["obelics-00000.tar", "obelics-00001.tar"]  # one per data file, in state.json's order
    assert [s.segments for s in read_all(tmp_path / "arrow2")] == [first.segments, second.segments]
    loader_yields(tmp_path / "pq", tokenizer, seq_len=384)


def test_column_overrides(tmp_path, jpegs):
    table = pa.table({"picture": [jpegs[0], jpegs[1]], "alt": ["One.", "Two."], "caption": ["x", "y"]})
    parquet.write_table(table, tmp_path / "odd.parquet")
    report = preprocess([tmp_path / "odd.parquet"], tmp_path / "out", progress=False)
    assert report.written == 0 and report.rejected == {"missing_field": 2}  # no image column it knows
    assert "--image-column" in report.rejects[0]["detail"]
    report = preprocess(
        [tmp_path / "odd.parquet"],
        tmp_path / "out2",
        progress=False,
        image_column="picture",
        text_column="alt",
        kind="page",
    )
    assert report.written == 2
    assert [(s.kind, s.texts) for s in read_all(tmp_path / "out2")] == [("page", ["One."]), ("page", ["Two."])]


# --- img2dataset tars -------------------------------------------------------------------------------


def img2dataset_dir(root: Path, images: list[bytes], captions: list[str], first_key: int = 0) -> Path:
    """A directory as img2dataset writes it with output_format=webdataset: 00000.tar holding
    KEY.jpg, KEY.txt, KEY.json per sample (in that order), and 00000.parquet with the metadata."""
    root.mkdir(parents=True)
    metadata = []
    with tarfile.open(root / "00000.tar", "w") as tar:
        for number, (image, caption) in enumerate(zip(images, captions, strict=True)):
            key = f"{first_key + number:09d}"
            url = f"https://img.example.org/{key}.jpg"
            meta = {"url": url, "caption": caption, "key": key, "status": "success", "width": 96, "height": 96}
            metadata.append(meta)
            for extension, payload in (("jpg", image), ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    parquet.write_table(pa.Table.from_pylist(metadata), root / "00000.parquet")
    return root


def test_img2dataset_tars_are_indexed_as_they_are(tmp_path, jpegs, tokenizer):
    source = img2dataset_dir(tmp_path / "laion", jpegs, CAPTIONS)
    report = preprocess([source], tmp_path / "out", samples_per_shard=2, name="laion", progress=False)
    assert report.written == 5 and report.reindexed == [str(source / "00000.tar")]
    assert report.shards == ["laion-00000.tar"]  # one shard per input tar: nothing rewritten
    assert (tmp_path / "out" / "laion-00000.tar").stat().st_ino == (source / "00000.tar").stat().st_ino
    samples = read_all(tmp_path / "out")
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(5)]
    assert [(s.kind, s.texts[0], s.images[0]) for s in samples] == [
        ("pair", c, j) for c, j in zip(CAPTIONS, jpegs, strict=True)
    ]
    loader_yields(tmp_path / "out", tokenizer)

    # With a validation split the tar is still not rewritten: its index leaves the held-out samples
    # out, and they are copied into the validation shards.
    split = preprocess([source], tmp_path / "split", validation_fraction=0.5, progress=False)
    held = {f"{i:09d}" for i in range(5) if is_validation(f"{i:09d}", 0.5)}
    assert split.reindexed and split.validation == len(held) > 0 and split.written == 5 - len(held)
    assert {s.key for s in read_all(tmp_path / "split")} == {f"{i:09d}" for i in range(5)} - held
    assert {s.key for s in read_all(tmp_path / "split" / "validation")} == held

    rewritten = preprocess([source], tmp_path / "copy", samples_per_shard=2, tar_mode="rewrite", progress=False)
    assert rewritten.shards == ["laion-00000.tar", "laion-00001.tar", "laion-00002.tar"] and not rewritten.reindexed
    assert [(s.texts, s.images) for s in read_all(tmp_path / "copy")] == [(s.texts, s.images) for s in samples]


def test_img2dataset_tar_needing_conversion_is_rewritten(tmp_path, jpegs):
    rgba = Image.fromarray(photos.chelsea()).convert("RGBA")
    rgba.putalpha(128)
    output = io.BytesIO()
    rgba.resize((64, 48)).save(output, format="PNG")
    source = img2dataset_dir(tmp_path / "set", [jpegs[0], output.getvalue()], CAPTIONS[:2])
    with pytest.raises(
        ValueError, match="00000.tar cannot be used as it is: sample 000000001's image must be re-encoded"
    ):
        preprocess([source], tmp_path / "strict", tar_mode="reindex", progress=False)
    assert not list((tmp_path / "strict").iterdir())  # nothing half-written left behind
    report = preprocess([source], tmp_path / "out", progress=False)  # auto: falls back to a rewrite
    assert report.written == 2 and not report.reindexed
    assert list(report.converted.values()) == [1] and next(iter(report.converted)).startswith("transparency")
    (first, second) = read_all(tmp_path / "out")
    assert first.images[0] == jpegs[0] and second.images[0].startswith(b"\x89PNG")


def test_urls_resolved_through_an_img2dataset_mirror(tmp_path, jpegs):
    mirror = img2dataset_dir(tmp_path / "mirror", jpegs[:3], CAPTIONS[:3], first_key=100)
    rows = [{"url": f"https://img.example.org/{100 + i:09d}.jpg", "caption": CAPTIONS[i]} for i in (2, 0)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    report = preprocess([tmp_path / "rows.jsonl"], tmp_path / "out", progress=False, url_mirror=mirror)
    assert report.written == 2
    assert [s.images[0] for s in read_all(tmp_path / "out")] == [jpegs[2], jpegs[0]]

    # img2dataset's output_format=files: NNNNN/KEY.jpg with a KEY.json naming its URL, no parquet.
    files = tmp_path / "files" / "00000"
    files.mkdir(parents=True)
    for i in range(3):
        (files / f"{100 + i:09d}.jpg").write_bytes(jpegs[i])
        (files / f"{100 + i:09d}.json").write_text(json.dumps({"url": f"https://img.example.org/{100 + i:09d}.jpg"}))
    report = preprocess([tmp_path / "rows.jsonl"], tmp_path / "out2", progress=False, url_mirror=tmp_path / "files")
    assert [s.images[0] for s in read_all(tmp_path / "out2")] == [jpegs[2], jpegs[0]]


# --- PDFs -------------------------------------------------------------------------------------------


def make_pdf(pages: list[tuple[str, np.ndarray]]) -> bytes:
    """A PDF with reportlab (BSD): per page a line of text and a photo."""
    from reportlab.lib.utils import ImageReader
    from reportlab.pdfgen import canvas

    output = io.BytesIO()
    document = canvas.Canvas(output, pagesize=(300, 400), invariant=1)  # invariant: no timestamps
    for text, pixels in pages:
        document.setFont("Helvetica", 14)
        document.drawString(30, 360, text)
        document.drawImage(ImageReader(Image.fromarray(pixels)), 30, 60, width=240, height=240)
        document.showPage()
    document.save()
    return output.getvalue()


def test_pdfs_rendered_page_by_page_from_a_tar_and_a_directory(tmp_path, tokenizer):
    first = make_pdf([("Page one about an astronaut", photos.astronaut()), ("Page two, a cat", photos.chelsea())])
    second = make_pdf([("A single page with coffee", photos.coffee())])
    texts = ["The astronaut page.", "The cat page."]
    with tarfile.open(tmp_path / "docs.tar", "w") as tar:
        for name, payload in (
            ("doc-a.pdf", first),
            ("doc-a.json", json.dumps({"pages": [{"text": t} for t in texts]}).encode()),
            ("doc-b.pdf", second),
            ("doc-b.txt", b"Coffee page text.\f"),
            ("doc-c.pdf", b"%PDF-1.4 broken"),
            ("doc-c.txt", b"Nothing."),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    report = preprocess([tmp_path / "docs.tar"], tmp_path / "out", pdf_dpi=72, progress=False)
    assert report.rows == 3 and report.written == 3 and report.rejected == {"corrupt_pdf": 1}
    samples = read_all(tmp_path / "out")
    assert [s.key for s in samples] == ["doc-a-p0000", "doc-a-p0001", "doc-b-p0000"]
    assert [s.kind for s in samples] == ["page"] * 3
    assert [s.texts[0] for s in samples] == [*texts, "Coffee page text."]
    with Image.open(io.BytesIO(samples[0].images[0])) as page:
        assert page.size == (300, 400)  # 300 x 400 points at 72 dpi
        pixels = np.asarray(page.convert("RGB"))
    assert pixels[100:300, 50:250].std() > 20 and pixels[:20].min() == 255  # the photo drawn, white margin

    (tmp_path / "pdfs").mkdir()
    (tmp_path / "pdfs" / "scan.pdf").write_bytes(first)  # no text file: the PDF's own text layer
    again = preprocess([tmp_path / "pdfs"], tmp_path / "dir", pdf_dpi=144, progress=False)
    pages = read_all(tmp_path / "dir")
    assert again.written == 2 and [p.texts[0].strip() for p in pages] == [
        "Page one about an astronaut",
        "Page two, a cat",
    ]
    with Image.open(io.BytesIO(pages[0].images[0])) as page:
        assert page.size == (600, 800)  # twice the resolution
    loader_yields(tmp_path / "out", tokenizer, seq_len=512)


# --- validation split ---------------------------------------------------------------------------------


def test_validation_fraction_is_held_out_by_key(tmp_path, jpegs):
    rows = [{"image": {"bytes": jpegs[i % 5], "path": None}, "caption": f"Caption {i}."} for i in range(40)]
    parquet.write_table(pa.Table.from_pylist(rows), tmp_path / "many.parquet", row_group_size=7)
    one = preprocess([tmp_path / "many.parquet"], tmp_path / "a", samples_per_shard=3, validation_fraction=0.25,
                     progress=False)  # fmt: skip
    preprocess([tmp_path / "many.parquet"], tmp_path / "b", samples_per_shard=11, workers=2,
                     validation_fraction=0.25, progress=False)  # fmt: skip
    train = {s.key for s in read_all(tmp_path / "a")}
    held = {s.key for s in read_all(tmp_path / "a" / "validation")}
    expected = {f"many-{i:08d}" for i in range(40) if is_validation(f"many-{i:08d}", 0.25)}
    assert held == expected and held and not train & held and len(train | held) == 40
    assert 230 < sum(is_validation(f"k-{i}", 0.25) for i in range(1000)) < 270  # the fraction holds
    assert {k for k in train | held if is_validation(k, 0.25, seed=1)} != held  # another seed, another set
    assert one.validation == len(held) and one.written == len(train)
    assert {s.key for s in read_all(tmp_path / "b" / "validation")} == held  # not the shard size, not the workers
    assert (tmp_path / "a" / "validation" / "many-00000.tar.idx.json").is_file()
    summary = json.loads((tmp_path / "a" / "many.report.json").read_text())
    assert summary["validation"] == len(held) and summary["validation_shards"][0] == "many-00000.tar"
    # A rerun with larger shards replaces the earlier shards instead of mixing with them.
    preprocess([tmp_path / "many.parquet"], tmp_path / "a", samples_per_shard=100, progress=False)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.tar")) == ["many-00000.tar"]
    assert not list((tmp_path / "a" / "validation").glob("*.tar"))


def test_help_documents_every_format():
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    for word in ("parquet", "arrow", "save_to_disk", "img2dataset", "PDF", "--pdf-dpi", "--url-mirror", "OBELICS",
                 "--image-column", "--text-column", "--validation-fraction", "--tar-mode", "mpiexec", "srun"):  # fmt: skip
        assert word in done.stdout, word


# --- what training consumes ---------------------------------------------------------------------------


def test_the_trainer_trains_on_shards_from_parquet_img2dataset_and_pdfs(tmp_path, jpegs):
    """The tiny mixture (obelics / pairs / pdfs) fed from the three shipped formats at once: OBELICS
    documents in a parquet with embedded bytes, an img2dataset tar indexed in place, and a tar of
    PDFs; the trainer runs, its loss finite, and reads every source (its data trace)."""
    from test_training import environment, trainer_args

    documents = {
        "images": [[{"bytes": j, "path": None}, None] for j in jpegs[:4]],
        "texts": [[None, f"Document {i}: {c}"] for i, c in enumerate(CAPTIONS[:4])],
    }
    parquet.write_table(pa.table(documents), tmp_path / "obelics.parquet", row_group_size=2)
    pdf = make_pdf([(f"Page {i}", p) for i, p in enumerate((photos.astronaut(), photos.chelsea(), photos.coffee()))])
    with tarfile.open(tmp_path / "pdfs.tar", "w") as tar:
        for name, payload in (("scan.pdf", pdf), ("scan.txt", b"One.\fTwo.\fThree.")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    root = tmp_path / "data"
    for inputs, directory in (
        ([tmp_path / "obelics.parquet"], "interleaved"),
        ([img2dataset_dir(tmp_path / "laion", jpegs, CAPTIONS)], "pairs"),
        ([tmp_path / "pdfs.tar"], "pages"),
    ):
        report = preprocess(inputs, root / directory, samples_per_shard=2, pdf_dpi=72, progress=False)
        assert report.written >= 3 and not report.rejected, (directory, report.to_dict())
    assert preprocess([tmp_path / "laion"], tmp_path / "again", progress=False).reindexed  # pairs: not rewritten

    run = tmp_path / "run"
    overrides = [
        "training.train_steps=3",
        "training.warmup_steps=1",
        "training.log_interval=1",
        "training.save_interval=3",
        # The data seed is the training seed; seed 0 draws all three sources in three steps (1234,
        # the preset's, leaves pdfs out until step 4).
        "training.seed=0",
        "data.trace=true",  # OUT/data_trace: the source and sample positions of every micro-batch
    ]
    command = trainer_args(run, root, *overrides)
    done = subprocess.run(
        [sys.executable, *command, "data.image_backend=pillow"],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment(),
        cwd=ROOT,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 3 and np.isfinite(results["loss"]), results
    assert "step      3/3" in done.stdout and "skipped samples 0" in done.stdout
    trace = [json.loads(line) for line in (run / "data_trace" / "rank00000.jsonl").read_text().splitlines()]
    assert len(trace) == 3 * 2 and {line["source"] for line in trace} == {"obelics", "pairs", "pdfs"}, trace
    assert all(line["positions"] for line in trace), trace
