"""jsonl / parquet rows with local image paths -> indexed webdataset shards.

Row layouts (one kind per row, detected from its fields or forced with ``kind``):
  pair         {"image": PATH, "caption": TEXT}
  page         {"image": PATH, "text": TEXT}
  interleaved  {"texts": [TEXT | null, ...], "images": [PATH | null, ...]}   (OBELICS layout)
Image paths are relative to the input file. Every image is opened and fully decoded; rows that
fail are rejected with a reason, never written. Output is deterministic: rows keep input order,
shards hold ``samples_per_shard`` samples each, image bytes are copied unchanged.
"""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Any

from PIL import Image

from megatron_vlm.data.images import ImageLimits, size_problem
from megatron_vlm.data.shards import Sample, ShardWriter

IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
DEFAULT_LIMITS = ImageLimits()  # frozen, so one shared default is safe


class Rejected(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class PreprocessReport:
    rows: int = 0
    written: int = 0
    shards: list[str] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)
    rejects: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "written": self.written,
            "shards": self.shards,
            "rejected": dict(self.rejected),
            "rejects": self.rejects,
        }


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError("reading parquet needs pyarrow: pip install pyarrow") from error
        yield from parquet.read_table(path).to_pylist()
        return
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as error:
                    yield {"__invalid__": f"{path.name} line {number}: {error}"}


def detect_kind(row: dict[str, Any]) -> str:
    if "texts" in row and "images" in row:
        return "interleaved"
    if "image" in row and "caption" in row:
        return "pair"
    if "image" in row and "text" in row:
        return "page"
    raise Rejected("missing_field", f"cannot tell the layout from fields {sorted(row)}")


def load_image(path: Path, limits: ImageLimits) -> tuple[bytes, str]:
    """The file's bytes and extension, after a full decode and the size checks."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise Rejected("missing_image", f"{path}: {error.strerror or error}") from error
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                width, height, image_format = image.width, image.height, image.format
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise Rejected("absurd_size", f"{path}: {error}") from error
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for bad files
        raise Rejected("corrupt_image", f"{path}: {error}") from error
    problem = size_problem(width, height, limits)
    if problem:
        raise Rejected("absurd_size", f"{path}: {problem}")
    return data, IMAGE_FORMATS.get(image_format or "", "img")


def row_to_sample(key: str, row: dict[str, Any], base: Path, kind: str | None, limits: ImageLimits) -> Sample:
    if "__invalid__" in row:
        raise Rejected("invalid_row", row["__invalid__"])
    kind = kind or detect_kind(row)
    segments: list[str | bytes] = []
    extensions: list[str] = []

    def add_image(path: Any) -> None:
        if not isinstance(path, str) or not path:
            raise Rejected("missing_field", f"image path {path!r}")
        data, extension = load_image(base / path, limits)
        segments.append(data)
        extensions.append(extension)

    def add_text(text: Any) -> None:
        if not isinstance(text, str) or not text.strip():
            raise Rejected("missing_field", f"text {text!r}")
        segments.append(text)

    if kind == "interleaved":
        texts, images = row.get("texts"), row.get("images")
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            raise Rejected("missing_field", "texts and images must be lists of equal length")
        for text, image in zip(texts, images, strict=True):
            if (text is None) == (image is None):
                raise Rejected("missing_field", "each position must hold exactly one of a text or an image")
            add_text(text) if image is None else add_image(image)
    elif kind in ("pair", "page"):
        add_image(row.get("image"))
        add_text(row.get("caption" if kind == "pair" else "text"))
    else:
        raise Rejected("invalid_row", f"unknown kind {kind!r}")
    if not any(isinstance(s, bytes) for s in segments) or not any(isinstance(s, str) for s in segments):
        raise Rejected("missing_field", "a sample needs at least one image and one text")
    return Sample(key, kind, segments, extensions)


def _convert(task: tuple[str, dict[str, Any], str, str | None, ImageLimits]) -> Sample | Rejected:
    key, row, base, kind, limits = task
    try:
        return row_to_sample(key, row, Path(base), kind, limits)
    except Rejected as rejected:
        return rejected


def preprocess(
    inputs: list[Path],
    out_dir: Path,
    samples_per_shard: int = 1000,
    workers: int = 1,
    kind: str | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    name: str | None = None,
    progress: bool = True,
) -> PreprocessReport:
    """Validate rows and write ``NAME-00000.tar`` ... with indexes and ``NAME.report.json``."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or inputs[0].stem
    tasks = (
        (f"{path.stem}-{index:08d}", row, str(path.parent), kind, limits)
        for path in inputs
        for index, row in enumerate(read_rows(path))
    )
    report = PreprocessReport()
    writer: ShardWriter | None = None
    in_shard = 0
    with Pool(workers) if workers > 1 else _InProcess() as pool:
        results = pool.imap(_convert, tasks, chunksize=8)  # ordered: output is deterministic
        for result in tqdm(results, desc=f"preprocess {name}", unit="row", disable=not progress):
            report.rows += 1
            if isinstance(result, Rejected):
                report.rejected[result.reason] += 1
                report.rejects.append({"row": report.rows - 1, "reason": result.reason, "detail": str(result)})
                continue
            if writer is None:
                shard = out_dir / f"{name}-{len(report.shards):05d}.tar"
                writer, in_shard = ShardWriter(shard), 0
                report.shards.append(shard.name)
            writer.write(result)
            report.written += 1
            in_shard += 1
            if in_shard == samples_per_shard:
                writer.close()
                writer = None
    if writer is not None:
        writer.close()
    (out_dir / f"{name}.report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report


class _InProcess:
    """Pool stand-in for workers=1 (no process start-up)."""

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def imap(self, function: Any, items: Any, chunksize: int = 1) -> Iterator[Any]:
        return map(function, items)
