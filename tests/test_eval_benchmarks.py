"""Benchmark readers (megatron_vlm/evaluation/benchmarks.py) on the tiny copies that
examples/benchmarks/build.py writes: both layouts of each benchmark give the same examples, the
readers give back the hand-written source exactly, and each kind of bad input is named."""

import hashlib
import importlib.util
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_vlm.evaluation import benchmarks as bm
from megatron_vlm.evaluation.benchmarks import BenchmarkError, detect_layout, read_benchmark, read_hub_parquet

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "examples" / "benchmarks"
BENCHMARKS = ("vqav2", "okvqa", "textvqa", "coco")
PURPOSES = ("eval", "incontext")
# The source file's splits for each purpose (COCO: the Karpathy splits of its images).
SOURCE_SPLITS = {
    "vqav2": {"eval": ["val2014"], "incontext": ["train2014"]},
    "okvqa": {"eval": ["val2014"], "incontext": ["train2014"]},
    "textvqa": {"eval": ["val"], "incontext": ["train"]},
    "coco": {"eval": ["test"], "incontext": ["train", "restval"]},
}


def _builder():
    spec = importlib.util.spec_from_file_location("benchmarks_build", SOURCES / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return _builder().build(tmp_path_factory.mktemp("benchmarks"))


def _source(benchmark):
    return json.loads((SOURCES / f"{benchmark}.json").read_text())


def _source_items(benchmark, purpose):
    """(id, question, references) of the hand-written source, in order."""
    data = _source(benchmark)
    splits = SOURCE_SPLITS[benchmark][purpose]
    if benchmark == "coco":
        return [(str(i["cocoid"]), None, i["sentences"]) for i in data["images"] if i["split"] in splits]
    return [(str(q["question_id"]), q["question"], q["answers"]) for s in splits for q in data["splits"][s]]


def _read(built, benchmark, layout, purpose):
    return read_benchmark(benchmark, built / benchmark / layout, purpose)


def _pixels(example):
    return [(image.mode, np.asarray(image)) for image in example.load_images()]


# --- the key property: both layouts give the same examples -----------------------------------------


@pytest.mark.parametrize("purpose", PURPOSES)
@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_both_layouts_give_the_same_examples(built, benchmark, purpose):
    hub = _read(built, benchmark, "hub", purpose)
    release = _read(built, benchmark, "release", purpose)
    assert len(hub) == len(release) > 0
    assert [e.id for e in hub] == [e.id for e in release]
    assert [e.question for e in hub] == [e.question for e in release]
    assert [e.references for e in hub] == [e.references for e in release]
    shared = {"vqav2": 6, "okvqa": 2, "textvqa": 9, "coco": 1}[benchmark]  # fields both layouts carry
    for h, r in zip(hub, release, strict=True):
        common = set(h.fields) & set(r.fields)
        assert len(common) >= shared, (h.fields, r.fields)
        assert {k: h.fields[k] for k in common} == {k: r.fields[k] for k in common}
        (mode_h, pixels_h), (mode_r, pixels_r) = _pixels(h)[0], _pixels(r)[0]
        assert mode_h == mode_r and np.array_equal(pixels_h, pixels_r), h.id


@pytest.mark.parametrize("purpose", PURPOSES)
@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_readers_round_trip_the_source(built, benchmark, purpose):
    expected = _source_items(benchmark, purpose)
    for layout in ("hub", "release"):
        got = [(e.id, e.question, e.references) for e in _read(built, benchmark, layout, purpose)]
        assert got == expected, layout


def test_fields_tasks_need(built):
    vqa = _read(built, "vqav2", "release", "eval")[0]
    assert vqa.fields["image_id"] == 42 and vqa.fields["question_type"] == "what color is the"
    assert vqa.fields["answer_type"] == "other" and vqa.fields["image_file"] == "COCO_val2014_000000000042.jpg"
    assert vqa.fields["multiple_choice_answer"] == "orange" and vqa.fields["answer_ids"] == list(range(1, 11))
    okvqa = _read(built, "okvqa", "release", "eval")[0]
    assert okvqa.fields["raw_answers"][0] == "NASA" and okvqa.references[0] == "nasa"
    source_text = _source("textvqa")
    for layout in ("hub", "release"):
        for example in _read(built, "textvqa", layout, "eval"):
            photo = next(i for i in source_text["images"].values() if i["image_id"] == example.fields["image_id"])
            assert example.fields["ocr_tokens"] == photo["ocr_tokens"]
    coco = _read(built, "coco", "release", "eval")[0]
    assert coco.question is None and len(coco.references) == 5 and coco.fields["image_id"] == int(coco.id)


# --- independent readings: pyarrow / json.load, not our reader ----------------------------------------


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_hub_layout_against_pyarrow(built, benchmark):
    split = bm.EVAL_SPLITS[benchmark]["hub"]
    files = sorted((built / benchmark / "hub" / "data").glob(f"{split}-*.parquet"))
    rows = pq.read_table(files).to_pylist()  # pyarrow reads a list of files as one table
    examples = read_hub_parquet(built / benchmark / "hub", benchmark, split)
    assert len(rows) == len(examples)
    for row, example in zip(rows, examples, strict=True):
        if benchmark == "coco":
            assert (str(row["id"]), row["answer"]) == (example.id, example.references)
        else:
            answers = [a["answer"] if isinstance(a, dict) else a for a in row["answers"]]
            assert (str(row["question_id"]), row["question"], answers) == (
                example.id,
                example.question,
                example.references,
            )
        assert example.images[0].data is None and example.images[0].read() == row["image"]["bytes"]


def test_release_layouts_against_json(built):
    release = built / "vqav2" / "release"
    questions = json.loads((release / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    notes = {
        a["question_id"]: a
        for a in json.loads((release / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    }
    examples = read_benchmark("vqav2", release, "val2014")
    assert [
        (str(q["question_id"]), q["question"], [a["answer"] for a in notes[q["question_id"]]["answers"]])
        for q in questions
    ] == [(e.id, e.question, e.references) for e in examples]
    for question, example in zip(questions, examples, strict=True):
        path = release / "val2014" / f"COCO_val2014_{question['image_id']:012d}.jpg"
        assert example.images[0].read() == path.read_bytes()
    karpathy = json.loads((built / "coco" / "release" / "dataset_coco.json").read_text())["images"]
    train = [i for i in karpathy if i["split"] in ("train", "restval")]
    examples = read_benchmark("coco", built / "coco" / "release", "train+restval")
    assert [(str(i["cocoid"]), [s["raw"] for s in i["sentences"]]) for i in train] == [
        (e.id, e.references) for e in examples
    ]
    data = json.loads((built / "textvqa" / "release" / "TextVQA_0.5.1_val.json").read_text())["data"]
    examples = read_benchmark("textvqa", built / "textvqa" / "release", "val")
    assert [(str(d["question_id"]), d["question"], d["answers"]) for d in data] == [
        (e.id, e.question, e.references) for e in examples
    ]


# --- the files themselves -----------------------------------------------------------------------------


def test_build_is_deterministic_small_and_named_as_the_hub(built, tmp_path):
    again = _builder().build(tmp_path / "again")

    def digest(root):
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
        }

    assert digest(built) == digest(again)
    hub = {str(p.relative_to(built)) for p in built.glob("*/hub/data/*.parquet")}
    assert {
        "vqav2/hub/data/validation-00000-of-00002.parquet",
        "vqav2/hub/data/validation-00001-of-00002.parquet",
        "okvqa/hub/data/val2014-00000-of-00001.parquet",
        "textvqa/hub/data/validation-00000-of-00001.parquet",
        "coco/hub/data/val-00000-of-00001.parquet",
    } <= hub
    assert pq.ParquetFile(built / "vqav2/hub/data/validation-00000-of-00002.parquet").metadata.num_row_groups == 2
    for path in built.rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG" and max(image.size) <= 256
    assert sum(p.stat().st_size for p in built.rglob("*") if p.is_file()) < 4 << 20


@pytest.mark.parametrize("benchmark", ("vqav2", "okvqa", "textvqa"))
def test_incontext_questions_differ_from_evaluation_questions(benchmark):
    evaluation = {q for _, q, _ in _source_items(benchmark, "eval")}
    incontext = {q for _, q, _ in _source_items(benchmark, "incontext")}
    assert not evaluation & incontext
    assert all(
        len(refs) == 10 for _, _, refs in _source_items(benchmark, "eval") + _source_items(benchmark, "incontext")
    )


def test_hub_reader_takes_a_file_a_list_or_a_directory(built):
    directory = built / "vqav2" / "hub"
    files = sorted((directory / "data").glob("validation-*.parquet"))
    whole = [e.id for e in read_hub_parquet(directory, "lmms-lab/VQAv2", "validation")]
    assert whole == [e.id for e in read_hub_parquet(files, "vqav2")]
    assert whole == [e.id for f in files for e in read_hub_parquet(f, "VQAv2")]
    assert whole == [e.id for e in read_hub_parquet(directory, "vqav2", "val")]  # same split, other name
    examples = read_benchmark("vqav2", directory, "eval")
    # Lazy: a parquet cell reference, no bytes; it pickles (DataLoader workers) and still decodes.
    assert all(e.images[0].data is None and e.images[0].parquet is not None for e in examples)
    copy = pickle.loads(pickle.dumps(examples[-1]))
    assert np.array_equal(_pixels(copy)[0][1], _pixels(examples[-1])[0][1])


def test_detect_layout(built):
    assert detect_layout(built / "vqav2" / "hub") == "hub"
    assert detect_layout(built / "coco" / "hub" / "data" / "val-00000-of-00001.parquet") == "hub"
    assert detect_layout(built / "okvqa" / "release") == "release"
    assert detect_layout(built / "coco" / "release" / "dataset_coco.json") == "release"
    with pytest.raises(BenchmarkError, match="does not exist"):
        detect_layout(built / "nowhere")
    (built / "empty").mkdir(exist_ok=True)
    with pytest.raises(BenchmarkError, match="no parquet files .* and no JSON files"):
        detect_layout(built / "empty")


def test_release_json_files_read_directly(built):
    release = built / "vqav2" / "release"
    direct = bm.read_vqa_release(
        release / "v2_OpenEnded_mscoco_train2014_questions.json",
        release / "v2_mscoco_train2014_annotations.json",
        benchmark="vqav2",
    )
    assert [e.id for e in direct] == [e.id for e in read_benchmark("vqav2", release, "incontext")]
    assert direct[0].images[0].path == str(release / "train2014" / "COCO_train2014_000000000009.jpg")
    assert bm.missing_images(direct) == []
    assert [
        e.id for e in read_benchmark("coco", release.parent.parent / "coco" / "release" / "dataset_coco.json", "test")
    ] == [e.id for e in read_benchmark("coco", built / "coco" / "hub", "eval")]


# --- bad input: each kind names the problem and the file ---------------------------------------------


def test_missing_and_undecodable_image(built, tmp_path):
    release = shutil.copytree(built / "vqav2" / "release", tmp_path / "release")
    gone = release / "val2014" / "COCO_val2014_000000000073.jpg"
    gone.unlink()
    examples = read_benchmark("vqav2", release, "eval")  # reading never touches the images
    assert bm.missing_images(examples) == [str(gone)]
    broken = next(e for e in examples if e.id == "73000")
    with pytest.raises(BenchmarkError, match=r"example 73000: image .*COCO_val2014_000000000073\.jpg cannot be read"):
        broken.load_images()
    (release / "val2014" / "COCO_val2014_000000000074.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(BenchmarkError, match=r"example 74000: image .*000000000074\.jpg cannot be decoded"):
        next(e for e in examples if e.id == "74000").load_images()
    assert next(e for e in examples if e.id == "42000").load_images()[0].size[0] <= 256


def test_release_entry_missing_a_field(built, tmp_path):
    """A questions, TextVQA or Karpathy entry without a field the reader needs is refused, naming
    the file, the missing field(s) and the entry."""
    cases = (
        ("vqav2/release/v2_OpenEnded_mscoco_val2014_questions.json", "questions", "image_id", "a question"),
        ("textvqa/release/TextVQA_0.5.1_val.json", "data", "image_id", "an entry"),
        ("coco/release/dataset_coco.json", "images", "sentences", "an image"),
    )
    for relative, key, field, what in cases:
        folder = shutil.copytree((built / relative).parent, tmp_path / relative.split("/")[0])
        path = folder / Path(relative).name
        data = json.loads(path.read_text())
        entry = next(e for e in data[key] if e.get("split", "test") == "test")
        del entry[field]
        path.write_text(json.dumps(data))
        shown = f"imgid {entry['imgid']}" if key == "images" else repr(entry)
        reader = {"questions": bm.read_vqa_release, "data": bm.read_textvqa_release, "images": bm.read_karpathy}[key]
        with pytest.raises(BenchmarkError) as caught:
            reader(path)
        assert str(caught.value) == f"{path}: {what} without ['{field}']: {shown}"


def test_missing_column(built, tmp_path):
    source = built / "textvqa" / "hub" / "data" / "validation-00000-of-00001.parquet"
    table = pq.read_table(source).drop_columns(["question"])
    broken = tmp_path / "validation-00000-of-00001.parquet"
    pq.write_table(table, broken)
    with pytest.raises(BenchmarkError, match=r"validation-00000-of-00001\.parquet: missing column\(s\) \['question'\]"):
        read_hub_parquet(broken, "textvqa")
    plain = tmp_path / "not_images.parquet"
    pq.write_table(pa.table({"question_id": [1], "question": ["q"], "image": [3]}), plain)
    with pytest.raises(BenchmarkError, match="column 'image' is int64, not an image"):
        read_hub_parquet(plain, "okvqa")


def test_wrong_benchmark_json(built):
    textvqa = built / "textvqa" / "release" / "TextVQA_0.5.1_val.json"
    with pytest.raises(
        BenchmarkError, match=r"TextVQA_0\.5\.1_val\.json: not a vqav2 vqa-questions file: it looks like textvqa"
    ):
        read_benchmark("vqav2", textvqa, "val2014")
    with pytest.raises(
        BenchmarkError, match=r"dataset_coco\.json: not a textvqa textvqa file: it looks like karpathy-coco"
    ):
        read_benchmark("textvqa", built / "coco" / "release" / "dataset_coco.json", "val")
    with pytest.raises(BenchmarkError, match="not the Karpathy COCO split .* it looks like vqa-annotations"):
        bm.read_karpathy(built / "okvqa" / "release" / "mscoco_val2014_annotations.json")
    with pytest.raises(
        BenchmarkError, match=r"no OpenEnded_mscoco_val2014_questions\.json for okvqa .*it holds vqav2's"
    ):
        read_benchmark("okvqa", built / "vqav2" / "release", "eval")
    release = built / "vqav2" / "release"
    with pytest.raises(
        BenchmarkError, match=r"mscoco_val2014_annotations\.json: these are okvqa annotations, not vqav2"
    ):
        bm.read_vqa_release(
            release / "v2_OpenEnded_mscoco_val2014_questions.json",
            built / "okvqa" / "release" / "mscoco_val2014_annotations.json",
            benchmark="vqav2",
        )


def test_bad_paths_and_splits(built):
    with pytest.raises(BenchmarkError, match="does not exist"):
        read_benchmark("coco", built / "coco" / "nowhere.json", "test")
    with pytest.raises(
        BenchmarkError, match=r"no parquet files for split 'test' \(splits there: \['train', 'validation'\]\)"
    ):
        read_benchmark("textvqa", built / "textvqa" / "hub", "test")
    with pytest.raises(BenchmarkError, match="unknown benchmark 'gqa'"):
        read_benchmark("gqa", built / "vqav2" / "hub", "eval")
    with pytest.raises(BenchmarkError, match=r"unknown Karpathy split\(s\) \['dev'\]"):
        read_benchmark("coco", built / "coco" / "release", "dev")
    with pytest.raises(BenchmarkError, match=r"holds split val2014, not 'train' \(train2014\)"):
        read_benchmark("vqav2", built / "vqav2" / "release" / "v2_OpenEnded_mscoco_val2014_questions.json", "train")
