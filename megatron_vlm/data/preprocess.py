"""Any supported input -> indexed webdataset shards (``shards.py``), streamed, on one or many MPI ranks.

Inputs and their layouts are described in ``readers.py`` (jsonl, parquet, `datasets` Arrow
directories, img2dataset tars, PDFs). Every image is fully decoded and checked; rows that fail are
rejected with a reason and counted, never written. Images DALI would decode differently are stored
re-encoded (``images.canonical_encoding``; the index says which and why).

Output is deterministic and does not depend on the number of MPI ranks or worker processes:
* The inputs become *units* (one file each) in command-line order. Rank r of R takes units
  r, r+R, ...; a unit's samples go, in file order, into shards of ``samples_per_shard`` samples that
  hold that unit's samples only. Rank 0 then names all shards in unit order, NAME-00000.tar, ...
  (one input file gives exactly the shards it gave before units existed).
* An img2dataset tar whose samples are all usable as they are (decodable, nothing to convert, keys
  that are valid sample keys) is not rewritten: the output shard is a hard link to it (a symbolic
  link across file systems) with our index (``tar_mode="auto"``; "reindex" insists, "rewrite" copies).
* ``validation_fraction`` F: a sample goes to the validation split when a hash of ``validation_seed``
  and its key (a PDF's pages: its document's key) falls below F, whatever the ranks, workers or shard size. The split is
  its own shard set in ``OUT/validation/`` (same names and index format), never in the training
  shards; the loader reads it as the source's validation split by default.
* Memory: a table is read in record batches of ``readers.BATCH_BYTES``; at most ``WINDOW_BYTES`` of
  records are in flight to the workers at a time; shards are written to disk as samples arrive.
* A rerun into the same OUT replaces the earlier run's NAME-*.tar (training and validation).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import io
import json
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Any

from PIL import Image

from megatron_vlm.data.chat import check_conversation
from megatron_vlm.data.images import ImageLimits, canonical_encoding, size_problem
from megatron_vlm.data.readers import (
    Columns,
    InputError,
    Record,
    Unit,
    UrlMirror,
    expand_inputs,
    image_cell,
    records,
    render_pdf,
)
from megatron_vlm.data.shards import INDEX_SUFFIX, Sample, ShardWriter

IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
DEFAULT_LIMITS = ImageLimits()  # frozen, so one shared default is safe
VALIDATION_DIR = "validation"  # the loader's default place for a source's validation split
WINDOW_BYTES = 16 << 20  # records handed to the workers at a time (their bytes, images included)
TAR_MODES = ("auto", "reindex", "rewrite")


class Rejected(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class PreprocessReport:
    rows: int = 0
    written: int = 0  # samples in the training shards
    shards: list[str] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    validation: int = 0  # samples held out in OUT/validation/
    validation_shards: list[str] = field(default_factory=list)
    converted: Counter = field(default_factory=Counter)  # images stored re-encoded, by reason
    reindexed: list[str] = field(default_factory=list)  # input tars taken as they are
    # Per rank: the units it read, their rows and the samples it wrote (training + validation). Not
    # in NAME.report.json (that file is the same whatever the ranks); the tool's summary prints it.
    ranks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "written": self.written,
            "validation": self.validation,
            "shards": self.shards,
            "validation_shards": self.validation_shards,
            "rejected": dict(self.rejected),
            "converted": dict(self.converted),
            "reindexed": self.reindexed,
            "rejects": self.rejects,
        }


@dataclass(frozen=True)
class Options:
    samples_per_shard: int = 1000
    columns: Columns = Columns()
    limits: ImageLimits = DEFAULT_LIMITS
    pdf_dpi: float = 150.0
    validation_fraction: float = 0.0
    tar_mode: str = "auto"
    url_mirror: str | None = None
    validation_seed: int = 0


def load_image(path: Path | bytes, limits: ImageLimits, where: str | None = None) -> tuple[bytes, str]:
    """The bytes to store (a file's, or the encoded bytes given; ``where`` names them in messages)
    and their extension, after a full decode and the size checks."""
    if isinstance(path, bytes):
        data, path = path, where or "image bytes"
    else:
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
            # Stored as every backend decodes it the same: formats and modes DALI reads differently
            # become the PNG of Pillow's pixels, which carries why (shards.py records it in the index).
            data, converted = canonical_encoding(data)
            if converted:
                image_format = "PNG"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise Rejected("absurd_size", f"{path}: {error}") from error
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for bad files
        raise Rejected("corrupt_image", f"{path}: {error}") from error
    problem = size_problem(width, height, limits)
    if problem:
        raise Rejected("absurd_size", f"{path}: {problem}")
    return data, IMAGE_FORMATS.get(image_format or "", "img")


# --- records -> samples (in the worker processes) -------------------------------------------------

_CONTEXT: dict[str, Any] = {}  # per process: options and the URL mirror (set by _start_worker)


def _start_worker(options: Options, mirror: UrlMirror | None) -> None:
    _CONTEXT.update(options=options, mirror=mirror)


def _image(reference: Any, base: str, limits: ImageLimits) -> tuple[bytes, str]:
    """An image value of any supported form -> checked bytes and extension."""
    reference = image_cell(reference)
    if isinstance(reference, bytes):
        return load_image(reference, limits, where="embedded image")
    if not isinstance(reference, str) or not reference:
        raise Rejected("missing_field", f"image {reference!r}")
    if reference.startswith(("http://", "https://")):
        mirror: UrlMirror | None = _CONTEXT.get("mirror")
        if mirror is None:
            raise Rejected("missing_image", f"{reference}: a URL, and no --url-mirror to find it in")
        try:
            data = mirror.read(reference)
        except KeyError as error:
            raise Rejected("missing_image", f"{reference}: not in the mirror {mirror.source}") from error
        except OSError as error:
            raise Rejected("missing_image", f"{reference}: mirrored file unreadable: {error}") from error
        return load_image(data, limits, where=reference)
    return load_image(Path(base) / reference, limits)


def record_samples(record: Record, options: Options) -> list[Sample | Rejected]:
    """A record's samples (a PDF: one per page; otherwise one), or why it was rejected."""
    try:
        if record.invalid is not None:
            reason, _, detail = record.invalid.partition(":")
            raise Rejected(reason, detail)
        if record.pdf is not None:
            return _pdf_samples(record, options)
        segments: list[str | bytes] = []
        extensions: list[str] = []
        for text, image in record.positions:
            if (text is None) == (image is None):
                raise Rejected("missing_field", "each position must hold exactly one of a text or an image")
            if image is None:
                if not isinstance(text, str) or not text.strip():
                    raise Rejected("missing_field", f"text {text!r}")
                segments.append(text)
            else:
                data, extension = _image(image, record.base, options.limits)
                segments.append(data)
                extensions.append(extension)
        if record.turns is not None:  # a conversation: text-only ones too, but something to train on
            sample = Sample(record.key, record.kind, segments, extensions, record.turns)
            try:
                check_conversation(sample.conversation())
            except ValueError as error:
                raise Rejected("missing_field", str(error)) from error
            return [sample]
        if not any(isinstance(s, bytes) for s in segments) or not any(isinstance(s, str) for s in segments):
            raise Rejected("missing_field", "a sample needs at least one image and one text")
        return [Sample(record.key, record.kind, segments, extensions)]
    except Rejected as rejected:
        return [rejected]


def _pdf_samples(record: Record, options: Options) -> list[Sample | Rejected]:
    try:
        pages = list(render_pdf(record.pdf or b"", options.pdf_dpi))
    except Exception as error:  # noqa: BLE001 - PDFium raises PdfiumError and others for broken files
        raise Rejected("corrupt_pdf", f"{record.key}: {error}") from error
    texts = record.page_texts
    if texts is not None and len(texts) != len(pages):
        raise Rejected("missing_field", f"{record.key}: {len(texts)} page texts for {len(pages)} pages")
    out: list[Sample | Rejected] = []
    for number, (png, layer_text, error) in enumerate(pages):
        key = f"{record.key}-p{number:04d}"
        text = texts[number] if texts is not None else layer_text
        try:
            if png is None:
                raise Rejected("corrupt_pdf", f"{key}: {error}")
            if not text or not text.strip():
                raise Rejected("missing_field", f"{key}: the page has no text")
            data, extension = load_image(png, options.limits, where=key)
            out.append(Sample(key, "page", [data, text], [extension]))
        except Rejected as rejected:
            out.append(rejected)
    return out


def _convert(record: Record) -> list[Sample | Rejected]:
    return record_samples(record, _CONTEXT["options"])


def is_validation(key: str, fraction: float, seed: int = 0) -> bool:
    """Whether a sample key is held out: a hash of the seed and the key, so the choice depends on
    nothing else (another seed holds out another set of the same size)."""
    if fraction <= 0.0:
        return False
    value = int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "big") / 2.0**64
    return value < fraction


# --- one unit -> shard parts -----------------------------------------------------------------------


class _Series:
    """Shards of at most ``per_shard`` samples named PREFIX-00000.tar, ... in a parts directory."""

    def __init__(self, directory: Path, prefix: str, per_shard: int) -> None:
        self.directory, self.prefix, self.per_shard = directory, prefix, per_shard
        self.names: list[str] = []
        self.written = 0
        self.converted: Counter[str] = Counter()
        self._writer: ShardWriter | None = None
        self._in_shard = 0

    def write(self, sample: Sample) -> None:
        if self._writer is None:
            name = f"{self.prefix}-{len(self.names):05d}.tar"
            self._writer, self._in_shard = ShardWriter(self.directory / name), 0
            self.names.append(name)
        self._writer.write(sample)
        self.written += 1
        self._in_shard += 1
        if self._in_shard == self.per_shard:
            self._close_writer()

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self.converted.update(self._writer.converted)
            self._writer = None

    def close(self) -> None:
        self._close_writer()

    def discard(self) -> None:
        self._close_writer()
        for name in self.names:
            for path in (self.directory / name, Path(str(self.directory / name) + INDEX_SUFFIX)):
                path.unlink(missing_ok=True)
        self.names, self.written, self.converted = [], 0, Counter()


def _record_bytes(record: Record) -> int:
    size = len(record.pdf or b"")
    for text, image in record.positions:
        if isinstance(image, dict):
            image = image.get("bytes")
        size += len(image) if isinstance(image, (bytes, bytearray)) else 64
        size += len(text) if isinstance(text, str) else 0
    return size + 256


def _windows(stream: Iterator[Record], limit: int) -> Iterator[list[Record]]:
    window: list[Record] = []
    size = 0
    for record in stream:
        window.append(record)
        size += _record_bytes(record)
        if size >= limit or len(window) >= 4096:
            yield window
            window, size = [], 0
    if window:
        yield window


def _converted_records(unit: Unit, options: Options, pool: Any, workers: int, progress: Any) -> Iterator[Any]:
    """(record, its samples or rejections) in file order, ``WINDOW_BYTES`` of records at a time."""
    for window in _windows(records(unit, options.columns), WINDOW_BYTES):
        chunk = max(1, len(window) // (workers * 4))
        for record, results in zip(window, pool.imap(_convert, window, chunksize=chunk), strict=True):
            progress.update(1)
            yield record, results


class _NotAsIs(Exception):
    """An input tar that cannot be used as it is (the reason is the message)."""


def _process_unit(number: int, unit: Unit, parts: Path, options: Options, pool: Any, workers: int) -> dict[str, Any]:
    from tqdm import tqdm

    progress = tqdm(desc=f"preprocess {unit.path.name}", unit="row", disable=not _CONTEXT.get("progress"))
    try:
        if unit.format == "tar-pairs" and options.tar_mode != "rewrite":
            try:
                return _reindex_unit(number, unit, parts, options, pool, workers, progress)
            except _NotAsIs as why:
                if options.tar_mode == "reindex":
                    raise InputError(f"{unit.path} cannot be used as it is: {why}") from None
                progress.reset()
        return _rewrite_unit(number, unit, parts, options, pool, workers, progress)
    finally:
        progress.close()


def _unit_report(number: int, unit: Unit) -> dict[str, Any]:
    return {"unit": number, "input": str(unit.path), "rows": 0, "rejects": [], "reindexed": False}


def _reject(report: dict[str, Any], row: int, rejected: Rejected) -> None:
    report["rejects"].append({"input": report["input"], "row": row, "reason": rejected.reason, "detail": str(rejected)})


def _rewrite_unit(
    number: int, unit: Unit, parts: Path, options: Options, pool: Any, workers: int, progress: Any
) -> dict[str, Any]:
    report = _unit_report(number, unit)
    train = _Series(parts / "train", f"{number:06d}", options.samples_per_shard)
    held = _Series(parts / VALIDATION_DIR, f"{number:06d}", options.samples_per_shard)
    for row, (record, results) in enumerate(_converted_records(unit, options, pool, workers, progress)):
        report["rows"] += 1
        to_validation = is_validation(record.key, options.validation_fraction, options.validation_seed)
        for result in results:
            if isinstance(result, Rejected):
                _reject(report, row, result)
            else:
                (held if to_validation else train).write(result)
    train.close()
    held.close()
    report.update(
        shards=train.names,
        written=train.written,
        validation_shards=held.names,
        validation=held.written,
        converted=dict(train.converted + held.converted),
    )
    return report


def _reindex_unit(
    number: int, unit: Unit, parts: Path, options: Options, pool: Any, workers: int, progress: Any
) -> dict[str, Any]:
    """An img2dataset tar taken as it is: our index over its samples (rejected and held-out ones left
    out of it; held-out ones copied into the validation split)."""
    report = _unit_report(number, unit)
    held = _Series(parts / VALIDATION_DIR, f"{number:06d}", options.samples_per_shard)
    entries: list[dict[str, Any]] = []
    try:
        for row, (record, results) in enumerate(_converted_records(unit, options, pool, workers, progress)):
            report["rows"] += 1
            (result,) = results
            if isinstance(result, Rejected):
                _reject(report, row, result)
                continue
            if is_validation(record.key, options.validation_fraction, options.validation_seed):
                held.write(result)
                continue
            if result.images[0] != record.positions[0][1]:
                raise _NotAsIs(f"sample {record.key}'s image must be re-encoded ({result.image_extensions[0]})")
            if any(not name.startswith(f"{record.key}.") for name in record.member_names):
                raise _NotAsIs(f"sample {record.key}: member names {record.member_names} are not KEY.ext")
            offset, size = record.span or (0, 0)
            entries.append({"key": record.key, "offset": offset, "size": size})
    except _NotAsIs:
        held.discard()
        raise
    held.close()
    names: list[str] = []
    if entries:
        name = f"{number:06d}-00000.tar"
        target = parts / "train" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(unit.path, target)  # no copy, and the shard outlives a move of the input
        except OSError:
            target.symlink_to(unit.path.resolve())
        index = {"count": len(entries), "tar_bytes": unit.path.stat().st_size, "samples": entries}
        Path(str(target) + INDEX_SUFFIX).write_text(json.dumps(index))
        names.append(name)
    report.update(
        shards=names,
        written=len(entries),
        validation_shards=held.names,
        validation=held.written,
        converted=dict(held.converted),
        reindexed=True,
    )
    return report


# --- all units, on this rank, then the merge on rank 0 ---------------------------------------------


def _merge(unit_reports: list[dict[str, Any]], parts: Path, out_dir: Path, name: str) -> PreprocessReport:
    report = PreprocessReport()
    # Shards of this name from an earlier run would be read with the new ones: replaced, not mixed.
    for directory in (out_dir, out_dir / VALIDATION_DIR):
        for stale in [*directory.glob(f"{name}-[0-9]*.tar"), *directory.glob(f"{name}-[0-9]*.tar{INDEX_SUFFIX}")]:
            stale.unlink()
    rows_before = 0
    for unit in sorted(unit_reports, key=lambda u: u["unit"]):
        for split, names, final in (
            ("train", unit["shards"], report.shards),
            (VALIDATION_DIR, unit["validation_shards"], report.validation_shards),
        ):
            target_dir = out_dir if split == "train" else out_dir / VALIDATION_DIR
            target_dir.mkdir(parents=True, exist_ok=True)
            for part in names:
                shard = f"{name}-{len(final):05d}.tar"
                os.replace(parts / split / part, target_dir / shard)
                os.replace(Path(str(parts / split / part) + INDEX_SUFFIX), Path(str(target_dir / shard) + INDEX_SUFFIX))
                final.append(shard)
        report.rows += unit["rows"]
        report.written += unit["written"]
        report.validation += unit["validation"]
        report.converted.update(unit["converted"])
        if unit["reindexed"]:
            report.reindexed.append(unit["input"])
        for reject in unit["rejects"]:
            report.rejected[reject["reason"]] += 1
            report.rejects.append({**reject, "row": rows_before + reject["row"]})
        rows_before += unit["rows"]
    shutil.rmtree(parts, ignore_errors=True)
    (out_dir / f"{name}.report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report


def _rank_report(rank: int, unit_reports: list[dict[str, Any]]) -> dict[str, Any]:
    """What one rank did, from the unit reports it sent (comm.gather orders them by rank)."""
    return {
        "rank": rank,
        "units": [u["unit"] for u in unit_reports],
        "rows": sum(u["rows"] for u in unit_reports),
        "samples": sum(u["written"] + u["validation"] for u in unit_reports),
    }


def _release_big_buffers_at_once() -> None:
    """glibc only: allocations above 128 KiB (image bytes, decoded pixels, Arrow pages) are mmapped
    and go back to the OS when freed. By default glibc raises that threshold after the first such
    free (up to 32 MiB), and the per-thread heaps the buffers then land in keep what they once held:
    measured ~100 MiB more peak memory on the 1 GiB benchmark (bench/preprocess_memory.py). Forked
    workers inherit the setting. Elsewhere (musl, macOS) nothing is changed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD; a fixed value also ends the dynamic raising


def preprocess(
    inputs: list[Path],
    out_dir: Path,
    samples_per_shard: int = 1000,
    workers: int = 1,
    kind: str | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    name: str | None = None,
    progress: bool = True,
    *,
    image_column: str | None = None,
    text_column: str | None = None,
    pdf_dpi: float = 150.0,
    validation_fraction: float = 0.0,
    validation_seed: int = 0,
    tar_mode: str = "auto",
    url_mirror: Path | None = None,
    comm: Any = None,
) -> PreprocessReport:
    """Validate every input's records and write ``NAME-00000.tar`` ... with indexes and
    ``NAME.report.json`` (and ``validation/NAME-00000.tar`` ... with a validation fraction).

    ``comm``: an mpi4py communicator when launched as an MPI job: every rank calls this with the same
    arguments and gets the same report; rank 0 writes the final names and the report."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if tar_mode not in TAR_MODES:
        raise ValueError(f"tar_mode must be one of {TAR_MODES}, got {tar_mode!r}")
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    units = expand_inputs([Path(p) for p in inputs])
    first = Path(inputs[0])
    name = name or (first.stem if first.is_file() else first.resolve().name)  # a directory: its name
    options = Options(
        samples_per_shard,
        Columns(image_column, text_column, kind),
        limits,
        pdf_dpi,
        validation_fraction,
        tar_mode,
        str(url_mirror) if url_mirror else None,
        validation_seed,
    )
    out_dir = Path(out_dir)
    parts = out_dir / f".parts-{name}"
    if rank == 0:
        shutil.rmtree(parts, ignore_errors=True)  # left by a run that died
        (parts / "train").mkdir(parents=True)
        (parts / VALIDATION_DIR).mkdir(parents=True)
    if comm is not None:
        comm.Barrier()
    mirror = UrlMirror(Path(url_mirror)) if url_mirror else None
    _release_big_buffers_at_once()
    _start_worker(options, mirror)
    _CONTEXT["progress"] = progress
    mine: list[dict[str, Any]] = []
    error: str | None = None
    # Forked workers share the parent's pages until something writes to them, and the garbage
    # collector writes to every object it scans (torch alone is ~100 MB of them): frozen objects
    # are never scanned, so the workers do not each copy the parent's heap.
    gc.freeze()
    try:
        with Pool(workers, _start_worker, (options, mirror)) if workers > 1 else _InProcess() as pool:
            for number in range(rank, len(units), size):  # a fixed slice: unit order decides the output
                mine.append(_process_unit(number, units[number], parts, options, pool, max(workers, 1)))
    except Exception as failure:  # noqa: BLE001 - reported to rank 0 so no rank waits forever
        if comm is None:
            shutil.rmtree(parts, ignore_errors=True)
            raise
        error = f"rank {rank}: {type(failure).__name__}: {failure}"
    finally:
        gc.unfreeze()
    gathered = comm.gather((mine, error), root=0) if comm is not None else [(mine, None)]
    report: PreprocessReport | None = None
    errors: list[str] = []
    if rank == 0:
        errors = [e for _, e in gathered if e]
        if errors:
            shutil.rmtree(parts, ignore_errors=True)
        else:
            report = _merge([u for reports, _ in gathered for u in reports], parts, out_dir, name)
            report.ranks = [_rank_report(number, reports) for number, (reports, _) in enumerate(gathered)]
    if comm is not None:
        report, errors = comm.bcast((report, errors), root=0)
    if errors:
        raise RuntimeError("preprocessing failed on " + "; ".join(errors))
    assert report is not None
    return report


class _InProcess:
    """Pool stand-in for workers=1 (no process start-up)."""

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def imap(self, function: Any, items: Any, chunksize: int = 1) -> Iterator[Any]:
        return map(function, items)
