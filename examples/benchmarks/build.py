"""Build tiny offline copies of the four evaluation benchmarks in both layouts users download.

    python examples/benchmarks/build.py OUT [--benchmarks vqav2,okvqa,textvqa,coco]

writes, from the hand-written questions / answers / captions in this folder (vqav2.json,
okvqa.json, textvqa.json, coco.json) and the repository's photos:

    OUT/<benchmark>/hub/data/<split>-NNNNN-of-MMMMM.parquet   the lmms-lab parquet layout, images
                                                             embedded as the `datasets` Image struct
    OUT/<benchmark>/release/...                               the original release: JSON files with
                                                             the official names + image folders

Images are downscaled to at most 256 px on the long side and re-encoded as JPEG; the output is the
same bytes on every run (fixed order, no timestamps, row groups of 4 rows so that readers meet
several row groups and, for VQAv2's validation split, two files).
"""

from __future__ import annotations

import argparse
import io
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PHOTOS = ROOT / "examples" / "data" / "images"
MAX_SIDE = 256
JPEG_QUALITY = 85
ROW_GROUP_ROWS = 4
BENCHMARKS = ("vqav2", "okvqa", "textvqa", "coco")
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."


# --- photos -------------------------------------------------------------------------------------


def photo_path(name: str) -> Path:
    """A photo of examples/data/images, or Matplotlib's sample grace_hopper.jpg."""
    for extension in (".jpg", ".png"):
        if (PHOTOS / f"{name}{extension}").is_file():
            return PHOTOS / f"{name}{extension}"
    if name == "grace_hopper":
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    raise FileNotFoundError(f"no photo {name!r} in {PHOTOS}")


@cache
def photo_jpeg(name: str) -> tuple[bytes, int, int]:
    """(JPEG bytes, width, height) of the photo at most MAX_SIDE px on its long side."""
    from PIL import Image

    with Image.open(photo_path(name)) as source:
        image = source.convert("L" if source.mode in ("L", "1", "I;16") else "RGB")
    scale = MAX_SIDE / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    output = io.BytesIO()
    image.save(output, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return output.getvalue(), image.width, image.height


def source(benchmark: str) -> dict[str, Any]:
    return json.loads((HERE / f"{benchmark}.json").read_text(encoding="utf-8"))


# --- writers ------------------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def write_image(path: Path, photo: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(photo_jpeg(photo)[0])


def _value(dtype: str) -> dict[str, Any]:
    return {"dtype": dtype, "_type": "Value"}


def _sequence(dtype: str) -> dict[str, Any]:
    return {"feature": _value(dtype), "_type": "Sequence"}


def write_hub(
    directory: Path, split: str, rows: list[dict[str, Any]], schema: Any, features: dict, shards: int = 1
) -> None:
    """data/<split>-NNNNN-of-MMMMM.parquet as `datasets` pushes them (contiguous shards), with the
    `huggingface` schema metadata that lets `datasets` decode the image column."""
    import pyarrow as pa
    import pyarrow.parquet as parquet

    schema = schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    (directory / "data").mkdir(parents=True, exist_ok=True)
    size = -(-len(rows) // shards)
    for shard in range(shards):
        table = pa.Table.from_pylist(rows[shard * size : (shard + 1) * size], schema=schema)
        file = directory / "data" / f"{split}-{shard:05d}-of-{shards:05d}.parquet"
        parquet.write_table(table, file, row_group_size=ROW_GROUP_ROWS, compression="snappy")


def _image_struct(photo: str, name: str) -> dict[str, Any]:
    return {"bytes": photo_jpeg(photo)[0], "path": name}


def _image_type() -> Any:
    import pyarrow as pa

    return pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _vqa_info(description: str, subtype: str) -> dict[str, Any]:
    return {
        "info": {
            "description": description,
            "url": "",
            "version": "tiny",
            "year": 2024,
            "contributor": "megatron-vlm",
            "date_created": "",
        },
        "license": {"name": "written for this repository", "url": ""},
        "data_type": "mscoco",
        "data_subtype": subtype,
    }


# --- VQAv2 and OK-VQA ---------------------------------------------------------------------------


def _most_common(answers: list[str]) -> str:
    return max(answers, key=answers.count)  # max keeps the first of equal counts


def _vqa_annotation(item: dict[str, Any], okvqa: bool) -> dict[str, Any]:
    confidences = item.get("answer_confidence") or ["yes"] * len(item["answers"])
    answers = []
    for index, answer in enumerate(item["answers"]):
        entry: dict[str, Any] = {"answer": answer, "answer_confidence": confidences[index], "answer_id": index + 1}
        if okvqa:
            entry = {
                "answer_id": index + 1,
                "raw_answer": item["raw_answers"][index],
                "answer_confidence": confidences[index],
                "answer": answer,
            }
        answers.append(entry)
    annotation = {
        "question_type": item["question_type"],
        "answer_type": item["answer_type"],
        "image_id": item["image_id"],
        "question_id": item["question_id"],
        "answers": answers,
    }
    if okvqa:
        annotation["confidence"] = item["confidence"]
    else:
        annotation["multiple_choice_answer"] = _most_common(item["answers"])
    return annotation


def build_vqa(out: Path, benchmark: str) -> None:
    """VQAv2 (v2_ file names, multiple_choice_answer) or OK-VQA (raw_answer, confidence)."""
    import pyarrow as pa

    okvqa = benchmark == "okvqa"
    data = source(benchmark)
    prefix = "" if okvqa else "v2_"
    hub_split = (
        {"val2014": "val2014", "train2014": "train2014"} if okvqa else {"val2014": "validation", "train2014": "train"}
    )
    release = out / benchmark / "release"
    for subtype, items in data["splits"].items():
        head = _vqa_info(data["description"], subtype)
        questions = {
            **head,
            "task_type": "Open-Ended",
            "questions": [
                {"image_id": q["image_id"], "question": q["question"], "question_id": q["question_id"]} for q in items
            ],
        }
        annotations = {**head, "annotations": [_vqa_annotation(q, okvqa) for q in items]}
        write_json(release / f"{prefix}OpenEnded_mscoco_{subtype}_questions.json", questions)
        write_json(release / f"{prefix}mscoco_{subtype}_annotations.json", annotations)
        for q in items:
            write_image(release / subtype / f"COCO_{subtype}_{q['image_id']:012d}.jpg", q["photo"])
        rows = []
        for q, annotation in zip(items, annotations["annotations"], strict=True):
            image = _image_struct(q["photo"], f"COCO_{subtype}_{q['image_id']:012d}.jpg")
            if okvqa:  # lmms-lab/OK-VQA: question_id a string, answers the annotations' answer strings
                rows.append(
                    {
                        "question_id": str(q["question_id"]),
                        "image": image,
                        "question": q["question"],
                        "answers": [a["answer"] for a in annotation["answers"]],
                        "question_type": q["question_type"],
                        "answer_type": q["answer_type"],
                    }
                )
            else:
                rows.append(
                    {
                        "question_type": q["question_type"],
                        "multiple_choice_answer": annotation["multiple_choice_answer"],
                        "answers": annotation["answers"],
                        "image_id": q["image_id"],
                        "answer_type": q["answer_type"],
                        "question_id": q["question_id"],
                        "question": q["question"],
                        "image": image,
                    }
                )
        if okvqa:
            schema = pa.schema(
                [
                    ("question_id", pa.string()),
                    ("image", _image_type()),
                    ("question", pa.string()),
                    ("answers", pa.list_(pa.string())),
                    ("question_type", pa.string()),
                    ("answer_type", pa.string()),
                ]
            )
            features = {
                "question_id": _value("string"),
                "image": {"_type": "Image"},
                "question": _value("string"),
                "answers": _sequence("string"),
                "question_type": _value("string"),
                "answer_type": _value("string"),
            }
        else:
            answer = pa.struct([("answer", pa.string()), ("answer_confidence", pa.string()), ("answer_id", pa.int64())])
            schema = pa.schema(
                [
                    ("question_type", pa.string()),
                    ("multiple_choice_answer", pa.string()),
                    ("answers", pa.list_(answer)),
                    ("image_id", pa.int64()),
                    ("answer_type", pa.string()),
                    ("question_id", pa.int64()),
                    ("question", pa.string()),
                    ("image", _image_type()),
                ]
            )
            features = {
                "question_type": _value("string"),
                "multiple_choice_answer": _value("string"),
                "answers": [
                    {"answer": _value("string"), "answer_confidence": _value("string"), "answer_id": _value("int64")}
                ],
                "image_id": _value("int64"),
                "answer_type": _value("string"),
                "question_id": _value("int64"),
                "question": _value("string"),
                "image": {"_type": "Image"},
            }
        shards = 2 if (benchmark == "vqav2" and subtype == "val2014") else 1
        write_hub(out / benchmark / "hub", hub_split[subtype], rows, schema, features, shards)


# --- TextVQA ------------------------------------------------------------------------------------


def question_tokens(question: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:['.\-_][a-z0-9]+)*", question.lower())


def build_textvqa(out: Path) -> None:
    import pyarrow as pa

    data = source("textvqa")
    images = data["images"]
    release = out / "textvqa" / "release"
    hub_split = {"val": "validation", "train": "train"}
    for split, items in data["splits"].items():
        entries, rows = [], []
        for q in items:
            image = images[q["photo"]]
            _, width, height = photo_jpeg(q["photo"])
            entry = {
                "question": q["question"],
                "image_id": image["image_id"],
                "image_classes": image["image_classes"],
                "flickr_original_url": "",
                "flickr_300k_url": "",
                "image_width": width,
                "image_height": height,
                "answers": q["answers"],
                "question_tokens": question_tokens(q["question"]),
                "question_id": q["question_id"],
                "set_name": split,
            }
            entries.append(entry)
            write_image(release / "train_images" / f"{image['image_id']}.jpg", q["photo"])
            rows.append(
                {
                    "image_id": image["image_id"],
                    "question_id": q["question_id"],
                    "question": q["question"],
                    "question_tokens": entry["question_tokens"],
                    "image": _image_struct(q["photo"], f"{image['image_id']}.jpg"),
                    "image_width": width,
                    "image_height": height,
                    "flickr_original_url": "",
                    "flickr_300k_url": "",
                    "answers": q["answers"],
                    "image_classes": image["image_classes"],
                    "set_name": split,
                    "ocr_tokens": image["ocr_tokens"],
                }
            )
        head = {"dataset_name": "textvqa", "dataset_version": "0.5.1", "dataset_type": split}
        write_json(release / f"TextVQA_0.5.1_{split}.json", {**head, "data": entries})
        photos = dict.fromkeys(q["photo"] for q in items)
        ocr = [{"image_id": images[p]["image_id"], "ocr_tokens": images[p]["ocr_tokens"]} for p in photos]
        ocr_head = {"dataset_name": "textvqa", "dataset_version": "0.2", "dataset_type": split}
        write_json(release / f"TextVQA_Rosetta_OCR_v0.2_{split}.json", {**ocr_head, "data": ocr})
        schema = pa.schema(
            [
                ("image_id", pa.string()),
                ("question_id", pa.int32()),
                ("question", pa.string()),
                ("question_tokens", pa.list_(pa.string())),
                ("image", _image_type()),
                ("image_width", pa.int32()),
                ("image_height", pa.int32()),
                ("flickr_original_url", pa.string()),
                ("flickr_300k_url", pa.string()),
                ("answers", pa.list_(pa.string())),
                ("image_classes", pa.list_(pa.string())),
                ("set_name", pa.string()),
                ("ocr_tokens", pa.list_(pa.string())),
            ]
        )
        features = {
            "image_id": _value("string"),
            "question_id": _value("int32"),
            "question": _value("string"),
            "question_tokens": _sequence("string"),
            "image": {"_type": "Image"},
            "image_width": _value("int32"),
            "image_height": _value("int32"),
            "flickr_original_url": _value("string"),
            "flickr_300k_url": _value("string"),
            "answers": _sequence("string"),
            "image_classes": _sequence("string"),
            "set_name": _value("string"),
            "ocr_tokens": _sequence("string"),
        }
        write_hub(out / "textvqa" / "hub", hub_split[split], rows, schema, features)


# --- COCO captions ------------------------------------------------------------------------------


def caption_tokens(sentence: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", sentence.lower())


def build_coco(out: Path) -> None:
    """The Karpathy file (dataset_coco.json + val2014/, train2014/) and lmms-lab/COCO-Caption2017's
    columns: test images -> its val split, train + restval -> a train split."""
    import pyarrow as pa

    data = source("coco")
    release = out / "coco" / "release"
    images, sentid = [], 0
    hub_rows: dict[str, list[dict[str, Any]]] = {"val": [], "train": []}
    for imgid, item in enumerate(data["images"]):
        folder = "train2014" if item["split"] == "train" else "val2014"
        filename = f"COCO_{folder}_{item['cocoid']:012d}.jpg"
        sentences = []
        for raw in item["sentences"]:
            sentences.append({"tokens": caption_tokens(raw), "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append(
            {
                "filepath": folder,
                "sentids": [s["sentid"] for s in sentences],
                "filename": filename,
                "imgid": imgid,
                "split": item["split"],
                "sentences": sentences,
                "cocoid": item["cocoid"],
            }
        )
        write_image(release / folder / filename, item["photo"])
        _, width, height = photo_jpeg(item["photo"])
        name = f"{item['cocoid']:012d}.jpg"
        hub_rows["val" if item["split"] == "test" else "train"].append(
            {
                "question_id": name,
                "image": _image_struct(item["photo"], name),
                "question": CAPTION_PROMPT,
                "answer": item["sentences"],
                "id": item["cocoid"],
                "license": None,
                "file_name": name,
                "coco_url": "",
                "height": height,
                "width": width,
                "date_captured": "",
            }
        )
    write_json(release / "dataset_coco.json", {"images": images, "dataset": "coco"})
    schema = pa.schema(
        [
            ("question_id", pa.string()),
            ("image", _image_type()),
            ("question", pa.string()),
            ("answer", pa.list_(pa.string())),
            ("id", pa.int64()),
            ("license", pa.int8()),
            ("file_name", pa.string()),
            ("coco_url", pa.string()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("date_captured", pa.string()),
        ]
    )
    features = {
        "question_id": _value("string"),
        "image": {"_type": "Image"},
        "question": _value("string"),
        "answer": _sequence("string"),
        "id": _value("int64"),
        "license": _value("int8"),
        "file_name": _value("string"),
        "coco_url": _value("string"),
        "height": _value("int32"),
        "width": _value("int32"),
        "date_captured": _value("string"),
    }
    for split, rows in hub_rows.items():
        write_hub(out / "coco" / "hub", split, rows, schema, features)


def build(out: str | Path, benchmarks: tuple[str, ...] = BENCHMARKS) -> Path:
    """Write the chosen benchmarks under ``out``; returns ``out``."""
    out = Path(out)
    for benchmark in benchmarks:
        if benchmark in ("vqav2", "okvqa"):
            build_vqa(out, benchmark)
        elif benchmark == "textvqa":
            build_textvqa(out)
        elif benchmark == "coco":
            build_coco(out)
        else:
            raise ValueError(f"unknown benchmark {benchmark!r} (one of {', '.join(BENCHMARKS)})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--benchmarks", default=",".join(BENCHMARKS), help="comma-separated subset")
    args = parser.parse_args()
    build(args.out, tuple(b for b in args.benchmarks.split(",") if b))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
