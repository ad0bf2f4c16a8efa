"""Readers for the paper's four evaluation benchmarks (VQAv2, TextVQA, OK-VQA, COCO captions) in the
two layouts users download: the Hub's parquet copies that lmms-eval's task files name, and the
original releases. Both layouts of one benchmark give the same ``Example`` list (same ids, questions,
references in order, same images), so the harness never needs to know which one a user has.

Metadata is read whole (an evaluation split has at most ~200k questions); images stay lazy
(``ImageRef``: a file path, or the (parquet file, row group, row) where the bytes are) and are only
read and decoded by ``Example.load_images``. A Hub split embeds one image per *question* (lmms-lab's
VQAv2 validation is 34 GB), so keeping the bytes in memory is not an option.

Hub layouts (parquet; the image column is the `datasets` Image feature, a struct ``{bytes, path}``):

  lmms-lab/VQAv2          splits validation (214,354 rows), testdev, test (no answers there);
                          files data/<split>-NNNNN-of-MMMMM.parquet (e.g. data/testdev-00006-of-00036)
      question_id int64, question string, image, image_id int64, question_type string,
      answer_type string, multiple_choice_answer string,
      answers list<{answer string, answer_confidence string, answer_id int64}> (null in test splits)
      -> id = question_id, references = [a["answer"] for a in answers] (annotation order)
  lmms-lab/textvqa        splits train, validation, test; data/train-000NN-of-00020.parquet, ...
      image_id string, question_id int32, question string, question_tokens list<string>, image,
      image_width int32, image_height int32, flickr_original_url string, flickr_300k_url string,
      answers list<string>, image_classes list<string>, set_name string, ocr_tokens list<string>
      -> id = question_id, references = answers
  lmms-lab/OK-VQA         split val2014 (5,046 rows); data/val2014-0000N-of-00002.parquet
      question_id string, image, question string, answers list<string>, question_type string,
      answer_type string  (no image_id column)
      -> id = question_id, references = answers
  lmms-lab/COCO-Caption2017  splits val (5,000 images), test (40,670; no captions); data/val-0000N-of-00002
      question_id string (the file name, e.g. "000000397133.jpg"), image, question string (the
      prompt), answer list<string> (the captions), id int64 (the COCO image id), license int8,
      file_name string, coco_url string, height int32, width int32, date_captured string
      -> id = id (or the image id in question_id, as lmms-eval derives it), references = answer

  Sources: lmms-eval (github.com/EvolvingLMMs-Lab/lmms-eval) task files before commit 4be7ee0e
  (2026-07-30, which moved the same datasets to lmms-lab-encoder/*): tasks/vqav2/
  _default_template_vqav2_yaml (dataset_path lmms-lab/VQAv2, test_split validation / test),
  vqav2/utils.py (doc["answers"][i]["answer"], doc["question_id"], doc["question"], doc["image"]),
  textvqa/utils.py (doc["answers"] as strings, doc["ocr_tokens"]), ok_vqa/ok_vqa_val2014.yaml
  (test_split val2014) and utils.py (doc["answers"] as strings), coco_cap/coco2017_cap_val.yaml
  (test_split val) and utils.py (image_id = int(question_id.split("_")[-1].split(".")[0]),
  doc["answer"], doc["id"]); the dataset cards' dataset_info on huggingface.co
  (lmms-lab/VQAv2 README.md at d138bef, lmms-lab/OK-VQA and lmms-lab/COCO-Caption2017 README.md,
  lmms-lab/textvqa's as copied in pppop7/textvqa "Duplicate from lmms-lab/textvqa") and the
  repositories' file listings (tree/main/data). Whether OK-VQA's ``answers`` strings are the
  annotations' ``answer`` or ``raw_answer`` is not stated; this module assumes ``answer`` (the
  field VQA scoring uses), as the tiny copies in examples/benchmarks do.

Original releases:

  VQA v2 (visualqa.org/download.html, "Input Questions Format" / "Annotation Format"):
      v2_OpenEnded_mscoco_<subtype>_questions.json: {info, task_type, data_type, data_subtype,
        license, questions: [{image_id, question, question_id}]}
      v2_mscoco_<subtype>_annotations.json: {info, data_type, data_subtype, license,
        annotations: [{question_id, image_id, question_type, answer_type, multiple_choice_answer,
        answers: [{answer, answer_confidence, answer_id}] x10}]}
      images <subtype>/COCO_<subtype>_<image_id:012d>.jpg (GT-Vision-Lab/VQA
      PythonHelperTools/vqaDemo.py); test-dev2015 questions use the test2015 images.
  OK-VQA (okvqa.allenai.org; read the same way by google-research/big_vision
      datasets/okvqa/okvqa.py): OpenEnded_mscoco_<subtype>_questions.json +
      mscoco_<subtype>_annotations.json in the VQA format, each answer with an extra
      ``raw_answer``, each annotation an extra ``confidence``; question_type is the knowledge
      category ("one".."ten", "other"); COCO 2014 images.
  TextVQA (textvqa.org; big_vision datasets/textvqa/textvqa.py): TextVQA_0.5.1_<split>.json =
      {dataset_name, dataset_version, dataset_type, data: [{question, image_id, question_id,
      answers (10 strings; absent in test), image_classes, flickr_original_url, flickr_300k_url,
      image_width, image_height, question_tokens, set_name}]}; images train_images/<image_id>.jpg
      for train *and* val, test_images/<image_id>.jpg for test. OCR tokens come from the
      companion TextVQA_Rosetta_OCR_v0.2_<split>.json ({data: [{image_id, ocr_tokens, ocr_info}]}),
      merged by image_id when it is next to the questions file.
  COCO Karpathy split (cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip):
      dataset_coco.json = {dataset: "coco", images: [{filepath, filename, imgid, split
      (train | restval | val | test), sentences: [{raw, tokens, imgid, sentid}], cocoid, sentids}]};
      images <root>/<filepath>/<filename>. In-context examples come from train + restval.

``read_benchmark`` is the single entry: it detects the layout and resolves a split, where the
purposes "eval" and "incontext" name each layout's standard split (``EVAL_SPLITS``,
``INCONTEXT_SPLITS``) and "a+b" reads several splits as one list.
"""

from __future__ import annotations

import io
import json
import re
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_vlm.data.readers import InputError, image_cell

if TYPE_CHECKING:
    from PIL import Image

BENCHMARKS = ("vqav2", "textvqa", "okvqa", "coco")
HUB_REPOS = {
    "vqav2": "lmms-lab/VQAv2",
    "textvqa": "lmms-lab/textvqa",
    "okvqa": "lmms-lab/OK-VQA",
    "coco": "lmms-lab/COCO-Caption2017",
}
# The split each layout evaluates on, and the one in-context (few-shot) examples are drawn from.
# lmms-lab's VQAv2, OK-VQA and COCO-Caption2017 have no train split: read the release's train files
# for their in-context examples (the tiny copies in examples/benchmarks add one for tests).
EVAL_SPLITS = {
    "vqav2": {"hub": "validation", "release": "val2014"},
    "textvqa": {"hub": "validation", "release": "val"},
    "okvqa": {"hub": "val2014", "release": "val2014"},
    "coco": {"hub": "val", "release": "test"},
}
INCONTEXT_SPLITS = {
    "vqav2": {"hub": "train", "release": "train2014"},
    "textvqa": {"hub": "train", "release": "train"},
    "okvqa": {"hub": "train2014", "release": "train2014"},
    "coco": {"hub": "train", "release": "train+restval"},
}
_ALIASES = {
    "vqav2": "vqav2", "vqa2": "vqav2", "vqa": "vqav2", "lmmslab/vqav2": "vqav2",
    "textvqa": "textvqa", "lmmslab/textvqa": "textvqa",
    "okvqa": "okvqa", "lmmslab/okvqa": "okvqa",
    "coco": "coco", "cococap": "coco", "cococaption": "coco", "cococaption2017": "coco",
    "lmmslab/cococaption2017": "coco", "cocokarpathy": "coco", "karpathy": "coco",
}  # fmt: skip
# Split names that mean the same thing in different layouts (tried when the name given has no files).
_SPLIT_GROUPS = (("validation", "val", "val2014"), ("train", "train2014"), ("testdev", "test-dev", "test-dev2015"))
_VQA_SUBTYPES = {
    "val": "val2014", "validation": "val2014", "val2014": "val2014",
    "train": "train2014", "train2014": "train2014",
    "test": "test2015", "test2015": "test2015",
    "testdev": "test-dev2015", "test-dev": "test-dev2015", "test-dev2015": "test-dev2015",
}  # fmt: skip
_VQA_FILES = {  # benchmark -> (questions, annotations) file names for a data subtype
    "vqav2": ("v2_OpenEnded_mscoco_{subtype}_questions.json", "v2_mscoco_{subtype}_annotations.json"),
    "okvqa": ("OpenEnded_mscoco_{subtype}_questions.json", "mscoco_{subtype}_annotations.json"),
}
COCO_IMAGE_PATTERN = "COCO_{subtype}_{image_id:012d}.jpg"
KARPATHY_SPLITS = ("train", "restval", "val", "test")


class BenchmarkError(InputError):
    """A benchmark input that cannot be read as asked: the message names the file and the problem."""


# --- examples -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """Where an image's encoded bytes are, without reading them: a file, bytes already in memory, or
    a cell of a parquet file (file, row group, row within the group, column), read on demand so a
    34 GB Hub split costs only its metadata in memory."""

    path: str | None = None
    data: bytes | None = None
    parquet: tuple[str, int, int, str] | None = None

    def where(self) -> str:
        """Human-readable location, for error messages."""
        if self.parquet is not None:
            file, group, row, column = self.parquet
            return f"{file} (row group {group}, row {row}, column {column!r})"
        return self.path if self.path is not None else "<embedded bytes>"

    def read(self) -> bytes:
        """The encoded bytes (OSError when the file is gone, ValueError when the cell holds none)."""
        if self.data is not None:
            return self.data
        if self.path is not None:
            return Path(self.path).read_bytes()
        if self.parquet is None:
            raise ValueError("an image reference with neither a path, bytes nor a parquet cell")
        file, group, row, column = self.parquet
        return _image_value_bytes(_row_group_column(file, group, column)[row].as_py(), Path(file).parent)


@dataclass
class Example:
    """One evaluation item. ``id`` is unique and stable within a split (question_id, or the COCO
    image id for captioning), ``references`` the human answers in annotation order (ten for VQA
    tasks) or the captions, ``question`` None for captioning; ``fields`` holds the rest (image_id,
    question_type, answer_type, ocr_tokens, image file name, ...)."""

    id: str
    images: list[ImageRef]
    question: str | None
    references: list[str]
    fields: dict[str, Any] = field(default_factory=dict)

    def load_images(self) -> list[Image.Image]:
        """Decode the images as stored (no RGB conversion: the processor does that)."""
        from PIL import Image

        decoded = []
        for ref in self.images:
            try:
                data = ref.read()
            except (OSError, ValueError, IndexError) as error:
                raise BenchmarkError(f"example {self.id}: image {ref.where()} cannot be read: {error}") from error
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
            except Exception as error:  # noqa: BLE001 - Pillow raises many types for bad files
                raise BenchmarkError(f"example {self.id}: image {ref.where()} cannot be decoded: {error}") from error
            decoded.append(image)
        return decoded


def missing_images(examples: Sequence[Example]) -> list[str]:
    """Image files the examples name that do not exist (a stat per distinct file, nothing read):
    call it before a long evaluation rather than failing at the first missing image."""
    seen: set[str] = set()
    missing = []
    for example in examples:
        for ref in example.images:
            if ref.path is not None and ref.path not in seen:
                seen.add(ref.path)
                if not Path(ref.path).is_file():
                    missing.append(ref.path)
    return missing


def _image_value_bytes(value: Any, base: Path) -> bytes:
    """An image cell (the `datasets` Image struct {bytes, path}, raw bytes, or a path) -> bytes."""
    value = image_cell(value)
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value:
        return (base / value).read_bytes()
    raise ValueError(f"the image cell holds no bytes and no path: {value!r}")


@lru_cache(maxsize=8)
def _row_group_column(file: str, group: int, column: str) -> Any:
    """One row group's image column (Hub image datasets write ~100 rows per group): cached so that
    reading the examples in order reads each group once."""
    import pyarrow.parquet as parquet

    return parquet.ParquetFile(file).read_row_group(group, columns=[column]).column(0)


def _unique(examples: list[Example], where: str) -> list[Example]:
    seen: set[str] = set()
    for example in examples:
        if example.id in seen:
            raise BenchmarkError(f"{where}: id {example.id} appears twice (ids must be unique within a split)")
        seen.add(example.id)
    return examples


def _drop_none(fields: dict[str, Any]) -> dict[str, Any]:
    """Absent and null are the same thing across layouts (a Hub test split has null columns where
    the release has no annotation file at all)."""
    return {key: value for key, value in fields.items() if value is not None}


# --- JSON files ---------------------------------------------------------------------------------


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise BenchmarkError(f"{path} does not exist")
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BenchmarkError(f"{path}: not a JSON file: {error}") from error


def _require(entry: dict[str, Any], keys: tuple[str, ...], where: str, shown: str | None = None) -> None:
    """Refuse an entry of a release file that lacks any of ``keys``, naming them and the entry
    (``shown``, default: the whole entry's repr)."""
    missing = [key for key in keys if key not in entry]
    if missing:
        raise BenchmarkError(f"{where} without {missing}: {repr(entry) if shown is None else shown}")


def json_kind(data: Any) -> str:
    """What a release JSON file is, from its keys: vqa-questions, vqa-annotations, textvqa,
    textvqa-ocr, textcaps, karpathy-<dataset>, coco-captions, coco-instances, or unknown."""
    if not isinstance(data, dict):
        return "unknown"
    if isinstance(data.get("questions"), list):
        return "vqa-questions"
    annotations = data.get("annotations")
    if isinstance(annotations, list):
        first = annotations[0] if annotations and isinstance(annotations[0], dict) else {}
        if "question_id" in first or "answers" in first:
            return "vqa-annotations"
        return "coco-captions" if "caption" in first else "coco-instances"
    if isinstance(data.get("images"), list) and "dataset" in data:
        return f"karpathy-{data['dataset']}"
    items = data.get("data")
    if isinstance(items, list):
        first = items[0] if items and isinstance(items[0], dict) else {}
        if "caption_str" in first or "reference_strs" in first:
            return "textcaps"
        if "question" in first:
            return "textvqa"
        if "ocr_tokens" in first or "ocr_info" in first:
            return "textvqa-ocr"
        if not first and str(data.get("dataset_name", "")).lower() == "textvqa":
            return "textvqa"
    return "unknown"


def _expect_kind(path: Path, data: Any, wanted: str, benchmark: str) -> None:
    kind = json_kind(data)
    if kind != wanted:
        raise BenchmarkError(f"{path}: not a {benchmark} {wanted} file: it looks like {kind}")


# --- VQA (VQAv2, OK-VQA) ------------------------------------------------------------------------


def _vqa_example(record: dict[str, Any], images: list[ImageRef], where: str) -> Example:
    """A question merged with its annotation (release) or a Hub row -> Example; the same fields come
    out of both layouts."""
    answers = record.get("answers") or []
    references = []
    for answer in answers:
        text = answer.get("answer") if isinstance(answer, dict) else answer
        if not isinstance(text, str):
            raise BenchmarkError(
                f"{where}: question {record.get('question_id')} has an answer without text: {answer!r}"
            )
        references.append(text)
    fields = {key: record.get(key) for key in ("image_id", "question_type", "answer_type", "multiple_choice_answer")}
    fields["confidence"] = record.get("confidence")
    if answers and isinstance(answers[0], dict):
        fields["answer_confidences"] = [a.get("answer_confidence") for a in answers]
        fields["answer_ids"] = [a.get("answer_id") for a in answers]
        if any("raw_answer" in a for a in answers):
            fields["raw_answers"] = [a.get("raw_answer") for a in answers]
    return Example(str(record["question_id"]), images, record["question"], references, _drop_none(fields))


def _is_okvqa(annotations: list[dict[str, Any]]) -> bool:
    """OK-VQA answers carry raw_answer (VQAv2's do not)."""
    return any(isinstance(a, dict) and "raw_answer" in a for ann in annotations[:50] for a in ann.get("answers") or [])


def read_vqa_release(
    questions: str | Path,
    annotations: str | Path | None = None,
    image_dir: str | Path | None = None,
    *,
    benchmark: str | None = None,
    image_pattern: str | None = None,
) -> list[Example]:
    """VQAv2 or OK-VQA questions (+ annotations; None for the test splits) -> Examples in the
    questions file's order. Images are ``image_dir/<pattern>``, the pattern formatted with
    ``subtype`` (the questions' data_subtype; test-dev2015 -> test2015) and ``image_id``
    (default COCO_{subtype}_{image_id:012d}.jpg); ``image_dir`` defaults to <questions dir>/<subtype>.
    ``benchmark`` ("vqav2" or "okvqa") makes a file of the other one an error."""
    questions = Path(questions)
    data = _load_json(questions)
    name = benchmark_name(benchmark) if benchmark else "VQA"
    _expect_kind(questions, data, "vqa-questions", name)
    subtype = str(data.get("data_subtype") or "")
    image_subtype = "test2015" if subtype.startswith("test") else subtype
    annotated: dict[Any, dict[str, Any]] = {}
    if annotations is not None:
        annotations = Path(annotations)
        notes = _load_json(annotations)
        _expect_kind(annotations, notes, "vqa-annotations", name)
        items = notes["annotations"]
        if benchmark is not None:
            found = "okvqa" if _is_okvqa(items) else "vqav2"
            if found != benchmark_name(benchmark):
                raise BenchmarkError(f"{annotations}: these are {found} annotations, not {benchmark_name(benchmark)}")
        annotated = {item["question_id"]: item for item in items}
    folder = Path(image_dir) if image_dir is not None else questions.parent / image_subtype
    pattern = image_pattern or COCO_IMAGE_PATTERN
    examples = []
    for question in data["questions"]:
        _require(question, ("question_id", "question", "image_id"), f"{questions}: a question")
        record = dict(question)
        if annotations is not None:
            note = annotated.get(question["question_id"])
            if note is None:
                raise BenchmarkError(
                    f"{annotations}: no annotation for question_id {question['question_id']} of {questions}"
                )
            if note.get("image_id", question["image_id"]) != question["image_id"]:
                raise BenchmarkError(
                    f"{annotations}: question_id {question['question_id']} has image_id {note.get('image_id')} "
                    f"there and {question['image_id']} in {questions}"
                )
            record.update(note)
        file = pattern.format(subtype=image_subtype, image_id=question["image_id"])
        example = _vqa_example(record, [ImageRef(path=str(folder / file))], str(annotations or questions))
        example.fields["image_file"] = file
        examples.append(example)
    return _unique(examples, str(questions))


# --- TextVQA ------------------------------------------------------------------------------------

_TEXTVQA_FIELDS = (
    "image_id", "image_classes", "ocr_tokens", "set_name", "image_width", "image_height",
    "flickr_original_url", "flickr_300k_url", "question_tokens",
)  # fmt: skip


def _textvqa_example(record: dict[str, Any], images: list[ImageRef], where: str) -> Example:
    answers = record.get("answers") or []
    if not all(isinstance(a, str) for a in answers):
        raise BenchmarkError(f"{where}: question {record.get('question_id')} has non-text answers: {answers!r}")
    fields = _drop_none({key: record.get(key) for key in _TEXTVQA_FIELDS})
    return Example(str(record["question_id"]), images, record["question"], list(answers), fields)


def read_textvqa_release(
    json_path: str | Path, image_dir: str | Path | None = None, ocr_path: str | Path | None = None
) -> list[Example]:
    """TextVQA_0.5.1_<split>.json -> Examples; images ``image_dir/<image_id>.jpg`` (default
    train_images/ next to the file, test_images/ for the test split). OCR tokens are merged from
    ``ocr_path`` or, when present, the TextVQA_Rosetta_OCR_v0.2_<split>.json next to it."""
    json_path = Path(json_path)
    data = _load_json(json_path)
    _expect_kind(json_path, data, "textvqa", "textvqa")
    split = str(data.get("dataset_type") or "")
    ocr_file = Path(ocr_path) if ocr_path is not None else json_path.parent / f"TextVQA_Rosetta_OCR_v0.2_{split}.json"
    tokens: dict[str, Any] = {}
    if ocr_path is not None or ocr_file.is_file():
        ocr = _load_json(ocr_file)
        _expect_kind(ocr_file, ocr, "textvqa-ocr", "textvqa")
        tokens = {str(item["image_id"]): item.get("ocr_tokens") for item in ocr["data"]}
    folder = (
        Path(image_dir)
        if image_dir is not None
        else json_path.parent / ("test_images" if split == "test" else "train_images")
    )
    examples = []
    for item in data["data"]:
        _require(item, ("question_id", "question", "image_id"), f"{json_path}: an entry")
        record = dict(item)
        if "ocr_tokens" not in record and str(item["image_id"]) in tokens:
            record["ocr_tokens"] = tokens[str(item["image_id"])]
        file = f"{item['image_id']}.jpg"
        example = _textvqa_example(record, [ImageRef(path=str(folder / file))], str(json_path))
        example.fields["image_file"] = file
        examples.append(example)
    return _unique(examples, str(json_path))


# --- COCO captions ------------------------------------------------------------------------------


def _split_parts(split: str | Sequence[str]) -> list[str]:
    return [p for p in split.split("+") if p] if isinstance(split, str) else list(split)


def read_karpathy(
    json_path: str | Path, image_root: str | Path | None = None, split: str | Sequence[str] = "test"
) -> list[Example]:
    """dataset_coco.json -> one Example per image of ``split`` ("test", "train+restval", or a list),
    in file order; id = cocoid, references = the raw sentences; images <image_root>/<filepath>/
    <filename> (image_root defaults to the JSON's directory)."""
    json_path = Path(json_path)
    data = _load_json(json_path)
    kind = json_kind(data)
    if kind != "karpathy-coco":
        raise BenchmarkError(f"{json_path}: not the Karpathy COCO split (dataset_coco.json): it looks like {kind}")
    parts = _split_parts(split)
    unknown = [p for p in parts if p not in KARPATHY_SPLITS]
    if unknown or not parts:
        raise BenchmarkError(f"{json_path}: unknown Karpathy split(s) {unknown or parts} (one of {KARPATHY_SPLITS})")
    root = Path(image_root) if image_root is not None else json_path.parent
    examples = []
    for image in data["images"]:
        if image.get("split") not in parts:
            continue
        _require(image, ("cocoid", "filename", "sentences"), f"{json_path}: an image", f"imgid {image.get('imgid')}")
        sentences = image["sentences"]
        fields = {
            "image_id": image["cocoid"],
            "filename": image["filename"],
            "filepath": image.get("filepath"),
            "imgid": image.get("imgid"),
            "sentids": image.get("sentids"),
            "split": image["split"],
            "tokens": [s.get("tokens") for s in sentences],
        }
        path = root / (image.get("filepath") or "") / image["filename"]
        references = [s["raw"] for s in sentences]
        examples.append(Example(str(image["cocoid"]), [ImageRef(path=str(path))], None, references, _drop_none(fields)))
    return _unique(examples, str(json_path))


def _coco_hub_example(record: dict[str, Any], images: list[ImageRef], where: str) -> Example:
    image_id = record.get("id")
    if image_id is None:  # lmms-eval's own derivation: the number in the file name
        try:
            image_id = int(str(record["question_id"]).split("_")[-1].split(".")[0])
        except (KeyError, ValueError) as error:
            raise BenchmarkError(f"{where}: a row with neither id nor an image id in question_id: {error}") from error
    captions = record.get("answer") or []
    fields = {key: record.get(key) for key in ("file_name", "coco_url", "height", "width", "license", "date_captured")}
    fields.update(image_id=image_id, question_id=record.get("question_id"), prompt=record.get("question"))
    return Example(str(image_id), images, None, list(captions), _drop_none(fields))


# --- Hub parquet --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HubSpec:
    repo: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    convert: Callable[[dict[str, Any], list[ImageRef], str], Example]
    image: str = "image"


_HUB_SPECS = {
    "vqav2": _HubSpec(
        "lmms-lab/VQAv2",
        ("question_id", "question", "image"),
        ("image_id", "question_type", "answer_type", "multiple_choice_answer", "answers"),
        _vqa_example,
    ),
    "okvqa": _HubSpec(
        "lmms-lab/OK-VQA",
        ("question_id", "question", "image"),
        ("answers", "question_type", "answer_type"),
        _vqa_example,
    ),
    "textvqa": _HubSpec(
        "lmms-lab/textvqa",
        ("question_id", "question", "image", "image_id"),
        ("answers", *_TEXTVQA_FIELDS),
        _textvqa_example,
    ),
    "coco": _HubSpec(
        "lmms-lab/COCO-Caption2017",
        ("image", "answer"),
        ("question_id", "id", "question", "file_name", "coco_url", "height", "width", "license", "date_captured"),
        _coco_hub_example,
    ),
}


def benchmark_name(name: str) -> str:
    """vqav2 | textvqa | okvqa | coco from a benchmark or Hub repository name (any case, with or
    without lmms-lab/, dashes or underscores)."""
    key = re.sub(r"[-_\s]", "", name.lower())
    if key not in _ALIASES:
        raise BenchmarkError(f"unknown benchmark {name!r}: one of {', '.join(BENCHMARKS)} (or their Hub repositories)")
    return _ALIASES[key]


def _split_aliases(split: str) -> list[str]:
    for group in _SPLIT_GROUPS:
        if split in group:
            return [split, *(s for s in group if s != split)]
    return [split]


def _hub_split_files(directory: Path, split: str) -> list[Path]:
    for name in _split_aliases(split):
        for pattern in (f"data/{name}-*.parquet", f"{name}-*.parquet", f"data/{name}.parquet", f"{name}.parquet",
                        f"{name}/*.parquet", f"default/{name}/*.parquet"):  # fmt: skip
            files = sorted(directory.glob(pattern))
            if files:
                return files
    return []


def hub_splits(directory: str | Path) -> list[str]:
    """The split names a downloaded Hub dataset directory holds (from its file names)."""
    directory = Path(directory)
    names = set()
    for file in [*directory.glob("*.parquet"), *directory.glob("data/*.parquet")]:
        names.add(re.sub(r"-\d+-of-\d+$", "", file.stem))
    for file in [*directory.glob("*/*.parquet"), *directory.glob("default/*/*.parquet")]:
        if file.parent.name != "data":
            names.add(file.parent.name)
    return sorted(names)


def hub_files(path: str | Path | Sequence[str | Path], split: str | None = None) -> list[Path]:
    """Parquet files of a split: the file given, the files given, or a directory's files for
    ``split`` (data/<split>-*.parquet as `huggingface-cli download` leaves them, <split>-*.parquet,
    <split>/*.parquet, or the parquet-converter's default/<split>/*.parquet); "a+b" joins splits."""
    if not isinstance(path, (str, Path)):
        files = [Path(p) for p in path]
    elif Path(path).is_dir():
        if not split:
            raise BenchmarkError(f"{path} is a directory: name a split (one of {hub_splits(path)})")
        files = []
        for part in _split_parts(split):
            found = _hub_split_files(Path(path), part)
            if not found:
                raise BenchmarkError(f"{path}: no parquet files for split {part!r} (splits there: {hub_splits(path)})")
            files += found
    else:
        files = [Path(path)]
    for file in files:
        if not file.is_file():
            raise BenchmarkError(f"{file} does not exist")
        if file.suffix != ".parquet":
            raise BenchmarkError(f"{file}: not a parquet file")
    return files


def _read_hub_file(file: Path, spec: _HubSpec, benchmark: str) -> list[Example]:
    import pyarrow as pa
    import pyarrow.parquet as parquet

    try:
        handle = parquet.ParquetFile(file)
    except (pa.ArrowInvalid, OSError) as error:
        raise BenchmarkError(f"{file}: not a readable parquet file: {error}") from error
    schema = handle.schema_arrow
    missing = [c for c in spec.required if c not in schema.names]
    if missing:
        raise BenchmarkError(
            f"{file}: missing column(s) {missing} of {spec.repo} ({benchmark}); its columns are {schema.names}"
        )
    image_type = schema.field(spec.image).type
    if not (pa.types.is_struct(image_type) or pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
            or pa.types.is_string(image_type)):  # fmt: skip
        raise BenchmarkError(
            f"{file}: column {spec.image!r} is {image_type}, not an image ({{bytes, path}} struct or bytes)"
        )
    columns = [c for c in (*spec.required, *spec.optional) if c in schema.names and c != spec.image]
    meta = handle.metadata
    starts = [0]
    for group in range(meta.num_row_groups):
        starts.append(starts[-1] + meta.row_group(group).num_rows)
    examples, row = [], 0
    # Only the metadata columns are read, a record batch at a time; the image column stays on disk.
    for batch in handle.iter_batches(batch_size=4096, columns=columns, use_threads=False):
        for record in batch.to_pylist():
            group = bisect_right(starts, row) - 1
            ref = ImageRef(parquet=(str(file), group, row - starts[group], spec.image))
            examples.append(spec.convert(record, [ref], str(file)))
            row += 1
    return examples


def read_hub_parquet(path: str | Path | Sequence[str | Path], dataset: str, split: str | None = None) -> list[Example]:
    """A Hub parquet layout (one file, a list of files, or a directory + split) -> Examples in file
    and row order. ``dataset`` (vqav2, textvqa, okvqa, coco or the lmms-lab repository name) picks
    the column mapping; images are read only by ``Example.load_images``."""
    benchmark = benchmark_name(dataset)
    spec = _HUB_SPECS[benchmark]
    files = hub_files(path, split)
    if not files:
        raise BenchmarkError(f"{path}: no parquet files")
    examples = []
    for file in files:
        examples += _read_hub_file(file, spec, benchmark)
    return _unique(examples, ", ".join(str(f) for f in files))


# --- layouts and the single entry ---------------------------------------------------------------


def detect_layout(path: str | Path) -> str:
    """The layout of ``path``: "hub" (a parquet file, or a directory holding parquet files as
    downloaded from the Hub) or "release" (a JSON file, or a directory holding the release's JSON
    files)."""
    path = Path(path)
    if not path.exists():
        raise BenchmarkError(f"{path} does not exist")
    if path.is_file():
        if path.suffix == ".parquet":
            return "hub"
        if path.suffix == ".json":
            return "release"
        raise BenchmarkError(f"{path}: neither a parquet file (Hub layout) nor a JSON file (original release)")
    for pattern in ("*.parquet", "data/*.parquet", "*/*.parquet", "default/*/*.parquet"):
        if any(path.glob(pattern)):
            return "hub"
    for pattern in ("*.json", "*/*.json"):
        if any(path.glob(pattern)):
            return "release"
    raise BenchmarkError(
        f"{path}: no parquet files (Hub layout) and no JSON files (original release) in this directory"
    )


def resolve_split(benchmark: str, layout: str, split: str) -> str:
    """The split "eval" / "incontext" stand for in that layout; any other name is returned as given."""
    benchmark = benchmark_name(benchmark)
    if split == "eval":
        return EVAL_SPLITS[benchmark][layout]
    if split == "incontext":
        return INCONTEXT_SPLITS[benchmark][layout]
    return split


def _find_file(root: Path, name: str) -> Path | None:
    """root/name or root/<one directory>/name (release archives unpack to flat files or folders)."""
    if (root / name).is_file():
        return root / name
    found = sorted(root.glob(f"*/{name}"))
    return found[0] if found else None


def _read_vqa_split(benchmark: str, path: Path, split: str, image_dir: Path | None) -> list[Example]:
    subtype = _VQA_SUBTYPES.get(split, split)
    questions_name, annotations_name = (n.format(subtype=subtype) for n in _VQA_FILES[benchmark])
    if path.is_file():
        questions = path
        data = _load_json(path)
        _expect_kind(path, data, "vqa-questions", benchmark)
        data_subtype = str(data.get("data_subtype", subtype))
        if data_subtype != subtype:
            raise BenchmarkError(f"{path}: holds split {data_subtype}, not {split!r} ({subtype})")
        annotations = _find_file(path.parent, annotations_name)
    else:
        questions = _find_file(path, questions_name)
        if questions is None:
            other = "okvqa" if benchmark == "vqav2" else "vqav2"
            hint = _find_file(path, _VQA_FILES[other][0].format(subtype=subtype))
            extra = f" (it holds {other}'s {hint.name})" if hint else ""
            raise BenchmarkError(f"{path}: no {questions_name} for {benchmark} split {split!r}{extra}")
        annotations = _find_file(questions.parent, annotations_name) or _find_file(path, annotations_name)
    if annotations is None and not subtype.startswith("test"):
        raise BenchmarkError(f"{path}: no {annotations_name} next to {questions.name} (split {split!r} has answers)")
    folder = image_dir
    if folder is None:
        image_subtype = "test2015" if subtype.startswith("test") else subtype
        base = path if path.is_dir() else path.parent
        folder = next((d for d in (questions.parent / image_subtype, base / image_subtype) if d.is_dir()), None)
    return read_vqa_release(questions, annotations, folder, benchmark=benchmark)


def _read_textvqa_split(path: Path, split: str, image_dir: Path | None) -> list[Example]:
    name = {"validation": "val"}.get(split, split)
    file = path if path.is_file() else _find_file(path, f"TextVQA_0.5.1_{name}.json")
    if file is None:
        raise BenchmarkError(f"{path}: no TextVQA_0.5.1_{name}.json for textvqa split {split!r}")
    examples = read_textvqa_release(file, image_dir)
    return examples


def read_benchmark(benchmark: str, path: str | Path, split: str, image_dir: str | Path | None = None) -> list[Example]:
    """Read one split of a benchmark (vqav2, textvqa, okvqa, coco) in whichever layout ``path`` is.
    ``split``: the layout's own split name (validation, val2014, test, ...), "eval" / "incontext"
    for the standard ones (``EVAL_SPLITS`` / ``INCONTEXT_SPLITS``), or "a+b" for several.
    ``image_dir`` overrides where a release's images are (the COCO image root for Karpathy)."""
    benchmark = benchmark_name(benchmark)
    path = Path(path)
    layout = detect_layout(path)
    split = resolve_split(benchmark, layout, split)
    if layout == "hub":
        return read_hub_parquet(path, benchmark, split)
    folder = Path(image_dir) if image_dir is not None else None
    if benchmark == "coco":
        file = path if path.is_file() else _find_file(path, "dataset_coco.json")
        if file is None:
            raise BenchmarkError(f"{path}: no dataset_coco.json (the Karpathy split of COCO captions)")
        parts = [{"validation": "val"}.get(p, p) for p in _split_parts(split)]
        return read_karpathy(file, folder, parts)
    examples: list[Example] = []
    for part in _split_parts(split):
        if benchmark == "textvqa":
            examples += _read_textvqa_split(path, part, folder)
        else:
            examples += _read_vqa_split(benchmark, path, part, folder)
    return _unique(examples, str(path))
