"""Streamed readers for every input format of ``tools/preprocess_data.py``: records, never whole files.

An input is a file or a directory; ``expand_inputs`` turns the command line into *units* (one file
each, in a fixed order), the granularity at which MPI ranks share the work. Formats, detected from the
file type and, for tables, the columns:

  *.jsonl                      one row per line (the layouts below)
  *.json                       a JSON array of rows (LLaVA's instruction files; read whole)
  *.parquet                    read by record batches of a bounded byte size, never a whole row group
  *.arrow / a `datasets` directory
                               ``save_to_disk`` output (data-*.arrow IPC streams + state.json), read by
                               record batch with pyarrow.ipc; `datasets` itself is not needed
  *.tar (img2dataset)          webdataset pairs KEY.jpg + KEY.txt (+ KEY.json), member by member
  *.tar / a directory of PDFs  KEY.pdf (+ KEY.json or KEY.txt with the page texts); each page rendered
                               at ``pdf_dpi`` with pypdfium2 and paired with its text: a "page" sample

Table layouts (the columns pick one; ``--image-column`` / ``--text-column`` / ``--kind`` override):
  interleaved  ``texts`` + ``images``: lists of equal length, each position one text or one image and a
               None hole (OBELICS); other columns (url, metadata, ...) are ignored
  pair         an image column (image, jpg, png, webp, img, image_url, url) + caption / txt / alt_text
  page         an image column + ``text`` (the existing jsonl convention for page + its text)
  conversation (instruction data; turns and roles kept) one of
               - The Cauldron: ``images`` (a list) + ``texts``, a list of {user, assistant, source};
                 the images go at the start of the first user turn (as transformers' Idefics2
                 fine-tuning examples put them)
               - LLaVA / ShareGPT: ``conversations``, a list of {from: human | gpt | system, value} with
                 ``<image>`` placeholders, and ``image``: a path or a list of paths (none: text only);
                 images without placeholders go at the start of the first user turn, and the newline
                 LLaVA puts beside a placeholder (or mere spacing between two) is dropped
                 (OpenHermes-2.5's layout too); or a list of
                 texts, user and assistant in turn (LIMA's)
               - chat messages: ``messages``, a list of {role, content}, content a text or a list of
                 {type: text, text} / {type: image} parts, and ``images`` for those parts in order
               - one question and its answer: a question column (instruction, query, question,
                 message_1), an optional context (input, context) and an answer column (output,
                 response, answer, message_2): Alpaca, MathInstruct, Goat, Atlas (instruction + input
                 + output), Dolly (instruction + context + response), MetaMathQA (query + response),
                 Orca-Math (question + answer), CAMEL math (message_1 + message_2); an image column's
                 image, where a row has one (VQA-style rows), leads the question
An image value is the encoded bytes, a ``{"bytes", "path"}`` struct (the `datasets` Image feature;
``path`` is used when ``bytes`` is null), a path relative to the input file, or an http(s) URL looked up
in a local mirror (``UrlMirror``): nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "image_url", "url", "URL")
TEXT_COLUMNS = {"caption": "pair", "txt": "pair", "alt_text": "pair", "TEXT": "pair", "text": "page"}
BATCH_BYTES = 8 << 20  # a table is read this many bytes at a time (rows are what workers get)
TAR_BLOCK = 512


def image_cell(value: Any) -> Any:
    """An image value as tables hold it -> its encoded bytes, or its path / URL string (anything else
    as it is): the `datasets` Image feature's ``{"bytes", "path"}`` struct gives its bytes when it has
    them, else its path."""
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    return bytes(value) if isinstance(value, bytearray | memoryview) else value


class InputError(ValueError):
    """An input that cannot be read at all (not one bad row: those are rejected and counted)."""


@dataclass
class Record:
    """One input row or document before its images are checked. ``positions`` are (text, image)
    pairs in document order, exactly one of them set; ``pdf`` replaces them for a PDF document."""

    key: str
    kind: str
    positions: list[tuple[Any, Any]] = field(default_factory=list)
    base: str = "."  # directory that relative image paths are relative to
    invalid: str | None = None  # why the row could not even be parsed
    pdf: bytes | None = None
    page_texts: list[str] | None = None
    span: tuple[int, int] | None = None  # (offset, size) of its members in a tar taken as it is
    member_names: tuple[str, ...] = ()
    turns: list[tuple[str, int]] | None = None  # a conversation's (role, positions) per turn


@dataclass(frozen=True)
class Unit:
    """One file to read (ranks share units); ``format`` names its reader."""

    path: Path
    format: str  # jsonl | parquet | arrow | tar-pairs | tar-pdf | pdf-dir

    @property
    def stem(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name


@dataclass(frozen=True)
class Columns:
    """Overrides from the command line; None fields are detected."""

    image: str | None = None
    text: str | None = None
    kind: str | None = None


def safe_key(text: str) -> str:
    """Sample keys may not hold '.' or '/' (tar members are KEY.ext)."""
    return re.sub(r"[./\\\s]", "_", text)


# --- inputs -------------------------------------------------------------------------------------


def _tar_format(path: Path) -> str:
    with tarfile.open(path, mode="r:") as tar:
        for info in tar_members(tar):
            extension = info.name.rsplit("/", 1)[-1].partition(".")[2].lower()
            if extension == "pdf":
                return "tar-pdf"
            if extension in IMAGE_EXTENSIONS:
                return "tar-pairs"
    raise InputError(f"{path}: a tar with neither images nor PDFs")


def _file_unit(path: Path) -> Unit:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return Unit(path, "jsonl")
    if suffix == ".json":
        return Unit(path, "json")
    if suffix == ".parquet":
        return Unit(path, "parquet")
    if suffix == ".arrow":
        return Unit(path, "arrow")
    if suffix == ".tar":
        return Unit(path, _tar_format(path))
    if suffix == ".pdf":
        return Unit(path, "pdf-file")
    raise InputError(f"{path}: unknown input type {suffix!r} (jsonl, json, parquet, arrow, tar, pdf or a directory)")


def _arrow_files(directory: Path) -> list[Path]:
    """A `datasets` save_to_disk directory's files in their order (state.json lists them)."""
    state = directory / "state.json"
    if state.is_file():
        files = [directory / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
        if files:
            return files
    return sorted(directory.glob("*.arrow"))


def expand_inputs(inputs: list[Path]) -> list[Unit]:
    """Command-line inputs -> units in a fixed order (the order given; a directory's files sorted)."""
    units: list[Unit] = []
    for path in inputs:
        if not path.exists():
            raise InputError(f"input {path} does not exist")
        if path.is_file():
            units.append(_file_unit(path))
            continue
        if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
            units += [Unit(f, "arrow") for f in _arrow_files(path)]
            if not any(u.path.parent == path for u in units):
                raise InputError(f"{path}: a datasets directory without .arrow files")
            continue
        if any(path.glob("*.pdf")):
            units.append(Unit(path, "pdf-dir"))
            continue
        # An img2dataset output directory holds NNNNN.tar plus NNNNN.parquet metadata (no images): its
        # tars are the data. Otherwise every readable file, sorted.
        tars = sorted(path.glob("*.tar"))
        found = tars or sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet", ".arrow"))
        if not found:
            raise InputError(f"{path}: no jsonl, json, parquet, arrow, tar or pdf files in this directory")
        units += [_file_unit(p) for p in found]
    return units


# --- table rows ---------------------------------------------------------------------------------


def _layout(fields: list[str], columns: Columns) -> tuple[str, str, str]:
    """(kind, image column, text column) for a table's fields."""
    if columns.kind == "interleaved" or (columns.kind is None and {"texts", "images"} <= set(fields)):
        return "interleaved", columns.image or "images", columns.text or "texts"
    image = columns.image or next((c for c in IMAGE_COLUMNS if c in fields), None)
    text = columns.text or next((c for c in TEXT_COLUMNS if c in fields), None)
    if image is None or text is None:
        raise KeyError(f"cannot tell the layout from fields {sorted(fields)} (use --image-column / --text-column)")
    return columns.kind or TEXT_COLUMNS.get(text, "pair"), image, text


CONVERSATION_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# Text-only instruction sets of one question and its answer: the first column of each list a row has.
QUESTION_COLUMNS = ("instruction", "query", "question", "message_1")
CONTEXT_COLUMNS = ("input", "context")
ANSWER_COLUMNS = ("output", "response", "answer", "message_2")


def _conversation_layout(row: dict[str, Any]) -> str | None:
    """Which conversation layout a row is in, if any."""
    if "conversations" in row:
        return "llava"
    if "messages" in row:
        return "messages"
    texts = row.get("texts")
    if isinstance(texts, list) and texts and isinstance(texts[0], dict):
        return "cauldron"
    if any(c in row for c in QUESTION_COLUMNS) and any(c in row for c in ANSWER_COLUMNS):
        return "question"
    return None


def _listed(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, list | tuple) else [value]


def _conversation_record(key: str, row: dict[str, Any], base: str, layout: str) -> Record:
    """A conversation row -> Record (positions in order, ``turns`` saying whose); a malformed one
    becomes an invalid Record naming what is wrong."""
    turns: list[tuple[str, list[tuple[Any, Any]]]] = []  # (role, positions)
    images: list[Any] = []
    if layout == "cauldron":
        images = _listed(row.get("images"))
        for number, pair in enumerate(row["texts"]):
            if (
                not isinstance(pair, dict)
                or not isinstance(pair.get("user"), str)
                or not isinstance(pair.get("assistant"), str)
            ):
                raise ValueError(f"texts[{number}] is not a {{user, assistant}} pair of texts")
            turns += [("user", [(pair["user"], None)]), ("assistant", [(pair["assistant"], None)])]
        turns[0] = ("user", [(None, image) for image in images] + turns[0][1]) if turns else ("user", [])
        images = []
    elif layout == "llava":
        images = _listed(row.get("image"))
        messages = row["conversations"] or []
        if messages and all(isinstance(m, str) for m in messages):  # LIMA: texts, user and assistant in turn
            messages = [{"from": ("human", "gpt")[n % 2], "value": m} for n, m in enumerate(messages)]
        for number, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("from") not in CONVERSATION_ROLES:
                raise ValueError(f"conversations[{number}] has no known 'from' (one of {sorted(CONVERSATION_ROLES)})")
            value = message.get("value")
            if not isinstance(value, str):
                raise ValueError(f"conversations[{number}] has no text 'value'")
            parts: list[tuple[Any, Any]] = []
            for index, piece in enumerate(value.split("<image>")):
                if index:
                    parts.append((None, "<image>"))
                piece = piece.removeprefix("\n") if index else piece
                piece = piece.removesuffix("\n") if index < value.count("<image>") else piece
                if piece.strip():  # only spacing between two placeholders ("<image> <image>"): nothing to keep
                    parts.append((piece, None))
            turns.append((CONVERSATION_ROLES[message["from"]], parts))
    elif layout == "messages":
        images = _listed(row.get("images"))
        for number, message in enumerate(row["messages"] or []):
            if not isinstance(message, dict) or message.get("role") not in CONVERSATION_ROLES:
                raise ValueError(f"messages[{number}] has no known 'role'")
            content = message.get("content")
            parts = []
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else _listed(content):
                if isinstance(part, dict) and part.get("type") == "image":
                    parts.append((None, "<image>"))
                elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    parts.append((part["text"], None))
                else:
                    raise ValueError(f"messages[{number}] has a content part that is neither a text nor an image")
            turns.append((CONVERSATION_ROLES[message["role"]], parts))
    else:  # one question and its answer
        ask = next(c for c in QUESTION_COLUMNS if c in row)
        answer = next(c for c in ANSWER_COLUMNS if c in row)
        extra = next((row[c] for c in CONTEXT_COLUMNS if c in row), None)
        if not isinstance(row[ask], str) or not isinstance(row[answer], str):
            raise ValueError(f"{ask} and {answer} must be texts")
        question = f"{row[ask]}\n\n{extra}" if isinstance(extra, str) and extra.strip() else row[ask]
        turns = [("user", [(question, None)]), ("assistant", [(row[answer], None)])]
        # An image column (a VQA-style row) leads the question, as The Cauldron's images do.
        images = _listed(next((row[c] for c in IMAGE_COLUMNS if row.get(c) is not None), None))
    # Placeholders take the row's images in order; images without any go to the first user turn.
    placeholders = sum(1 for _, parts in turns for _, image in parts if image == "<image>")
    if placeholders == 0 and images:
        first = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
        if first is None:
            raise ValueError("images but no user turn to put them in")
        turns[first] = ("user", [(None, "<image>")] * len(images) + turns[first][1])
        placeholders = len(images)
    if placeholders != len(images):
        raise ValueError(f"{placeholders} <image> placeholders for {len(images)} images")
    queue = iter(images)
    positions = [(text, next(queue) if image == "<image>" else image) for _, parts in turns for text, image in parts]
    return Record(key, "conversation", positions, base, turns=[(role, len(parts)) for role, parts in turns])


def row_record(key: str, row: dict[str, Any], base: str, columns: Columns) -> Record:
    """A table row -> Record; a row that does not fit its layout becomes an invalid Record (rejected
    later, counted as ``missing_field``) rather than an exception."""
    layout = _conversation_layout(row) if columns.kind in (None, "conversation") else None
    if columns.kind == "conversation" and layout is None:
        return Record(key, "conversation", base=base, invalid="missing_field:no conversation layout in its fields")
    if layout is not None:
        try:
            return _conversation_record(key, row, base, layout)
        except (ValueError, TypeError, KeyError) as error:
            return Record(key, "conversation", base=base, invalid=f"missing_field:{layout} row: {error}")
    try:
        kind, image_column, text_column = _layout(list(row), columns)
    except KeyError as error:
        return Record(key, "?", base=base, invalid=f"missing_field:{error.args[0]}")
    if kind == "interleaved":
        texts, images = row.get(text_column), row.get(image_column)
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            return Record(key, kind, base=base, invalid="missing_field:texts and images must be lists of equal length")
        return Record(key, kind, list(zip(texts, images, strict=True)), base)
    return Record(key, kind, [(None, row.get(image_column)), (row.get(text_column), None)], base)


def _jsonl_records(path: Path, columns: Columns) -> Iterator[Record]:
    base = str(path.parent)
    with path.open() as handle:
        for number, line in enumerate(handle):
            if not line.strip():
                continue
            key = safe_key(f"{path.stem}-{number:08d}")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                yield Record(key, "?", base=base, invalid=f"invalid_row:{path.name} line {number + 1}: {error}")
                continue
            if not isinstance(row, dict):
                yield Record(key, "?", base=base, invalid=f"invalid_row:{path.name} line {number + 1}: not an object")
                continue
            yield row_record(key, row, base, columns)


def _json_records(path: Path, columns: Columns) -> Iterator[Record]:
    """A JSON array of rows (LLaVA ships its instruction data so): read whole, as it must be."""
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not JSON ({error})") from error
    if not isinstance(rows, list):
        raise InputError(f"{path}: a .json input must be an array of rows (or use JSON Lines: .jsonl)")
    base = str(path.parent)
    for number, row in enumerate(rows):
        key = safe_key(f"{path.stem}-{number:08d}")
        if not isinstance(row, dict):
            yield Record(key, "?", base=base, invalid=f"invalid_row:{path.name} item {number}: not an object")
            continue
        yield row_record(key, row, base, columns)


def _table_records(batches: Iterator[Any], path: Path, columns: Columns) -> Iterator[Record]:
    base, index = str(path.parent), 0
    for batch in batches:
        for row in batch.to_pylist():  # one small batch at a time: the file is never whole in memory
            yield row_record(safe_key(f"{path.stem}-{index:08d}"), row, base, columns)
            index += 1


def _rows_per_batch(bytes_per_row: float) -> int:
    return max(1, min(65536, int(BATCH_BYTES / max(bytes_per_row, 1.0))))


def _parquet_batches(path: Path) -> Iterator[Any]:
    import pyarrow.parquet as parquet

    # buffer_size streams each column chunk page by page instead of reading a whole row group's
    # chunk first; batches are sized in bytes from the file's own statistics.
    with parquet.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False) as handle:
        meta = handle.metadata
        rows = max(meta.num_rows, 1)
        size = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
        yield from handle.iter_batches(batch_size=_rows_per_batch(size / rows), use_threads=False)


def _arrow_batches(path: Path) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    # memory_map: record batches are views of the mapped file, paged in as they are read; datasets
    # writes the IPC *stream* format, a plain .arrow file may be the random-access *file* format.
    with pa.memory_map(str(path)) as source:
        try:
            reader = ipc.open_stream(source)
            for batch in reader:
                yield from _split_batch(batch)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = ipc.open_file(source)
            for index in range(reader.num_record_batches):
                yield from _split_batch(reader.get_batch(index))


def _split_batch(batch: Any) -> Iterator[Any]:
    step = _rows_per_batch(batch.nbytes / max(batch.num_rows, 1))
    for start in range(0, batch.num_rows, step):
        yield batch.slice(start, step)


# --- tars ---------------------------------------------------------------------------------------


def tar_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The tar's file members in order, forgetting each once read: TarFile otherwise keeps every
    TarInfo it has seen (tens of MB for a tar of 100k members)."""
    while (info := tar.next()) is not None:
        tar.members.clear()
        if info.isfile():
            yield info


def _member_groups(path: Path) -> Iterator[tuple[str, dict[str, bytes], tuple[int, int], tuple[str, ...]]]:
    """(key, {extension: bytes}, (offset, size), member names) per webdataset sample, member by
    member; members of one key must be adjacent (webdataset's own rule)."""
    key: str | None = None
    members: dict[str, bytes] = {}
    names: list[str] = []
    start = end = 0
    with tarfile.open(path, mode="r:") as tar:
        for info in tar_members(tar):
            directory, _, name = info.name.rpartition("/")
            base, _, extension = name.partition(".")
            member_key = f"{directory}/{base}" if directory else base
            if member_key != key:
                if key is not None:
                    yield key, members, (start, end - start), tuple(names)
                key, members, names, start = member_key, {}, [], info.offset
            handle = tar.extractfile(info)
            members[extension.lower()] = handle.read() if handle else b""
            names.append(info.name)
            end = info.offset_data + -(-info.size // TAR_BLOCK) * TAR_BLOCK
        if key is not None:
            yield key, members, (start, end - start), tuple(names)


def _tar_pair_records(path: Path) -> Iterator[Record]:
    for key, members, span, names in _member_groups(path):
        images = [e for e in members if e in IMAGE_EXTENSIONS]
        caption = members.get("txt")
        if len(images) != 1 or caption is None:
            yield Record(
                safe_key(key), "pair", invalid=f"missing_field:{path.name}:{key} has members {sorted(members)}"
            )
            continue
        text = caption.decode("utf-8", errors="replace")
        yield Record(safe_key(key), "pair", [(None, members[images[0]]), (text, None)], span=span, member_names=names)


# --- PDFs ---------------------------------------------------------------------------------------


def page_texts(members: dict[str, bytes]) -> list[str] | None:
    """Per-page texts from KEY.json ({"pages": [TEXT | {"text": TEXT}]}, a list, or {"text": [...]})
    or KEY.txt (pages split by form feeds, as pdftotext writes them); None: use the PDF's text layer."""
    if "json" in members:
        meta = json.loads(members["json"])
        pages = meta.get("pages", meta.get("text")) if isinstance(meta, dict) else meta
        if isinstance(pages, list):
            return [p.get("text", "") if isinstance(p, dict) else str(p) for p in pages]
    if "txt" in members:
        return members["txt"].decode("utf-8", errors="replace").rstrip("\f").split("\f")
    return None


def _pdf_record(key: str, members: dict[str, bytes]) -> Record:
    try:
        texts = page_texts(members)
    except (json.JSONDecodeError, AttributeError) as error:
        return Record(safe_key(key), "page", invalid=f"invalid_row:{key}.json: {error}")
    return Record(safe_key(key), "page", pdf=members["pdf"], page_texts=texts)


def _tar_pdf_records(path: Path) -> Iterator[Record]:
    for key, members, _, _ in _member_groups(path):
        if "pdf" not in members:
            yield Record(safe_key(key), "page", invalid=f"missing_field:{path.name}:{key} has no .pdf")
            continue
        yield _pdf_record(key, members)


def _pdf_dir_records(path: Path) -> Iterator[Record]:
    for pdf in sorted(path.glob("*.pdf")) if path.is_dir() else [path]:
        members = {"pdf": pdf.read_bytes()}  # one document at a time
        for extension in ("json", "txt"):
            if pdf.with_suffix(f".{extension}").is_file():
                members[extension] = pdf.with_suffix(f".{extension}").read_bytes()
        yield _pdf_record(pdf.stem, members)


def render_pdf(data: bytes, dpi: float) -> Iterator[tuple[bytes | None, str | None, str | None]]:
    """(PNG of the page rendered at ``dpi``, the text layer's text, error) per page, with pypdfium2
    (Apache-2.0 / BSD-3-Clause; PDFium itself is BSD): rendered in grey when the page has no colour."""
    try:
        import pypdfium2 as pdfium
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("rendering PDFs needs pypdfium2: pip install pypdfium2") from error
    document = pdfium.PdfDocument(data)
    try:
        for index in range(len(document)):
            page = document[index]
            try:
                image = page.render(scale=dpi / 72.0).to_pil()
                if image.mode != "RGB":
                    image = image.convert("RGB")
                if image.getextrema()[0] == image.getextrema()[1] == image.getextrema()[2]:
                    image = image.convert("L")  # a page with all three channels equal: grey, a third of the bytes
                output = io.BytesIO()
                image.save(output, format="PNG", compress_level=6)
                textpage = page.get_textpage()
                text = textpage.get_text_range()
                textpage.close()
                yield output.getvalue(), text, None
            except Exception as error:  # noqa: BLE001 - PDFium reports page errors in several types
                yield None, None, f"page {index}: {error}"
            finally:
                page.close()
    finally:
        document.close()


# --- URL mirror ---------------------------------------------------------------------------------


class UrlMirror:
    """URL -> image bytes from a local copy, never the network: a mapping file (``.json`` object
    {url: path}, ``.jsonl`` lines {"url", "path"}, or ``.tsv`` url<TAB>path; paths relative to the
    file) or an img2dataset output directory (its NNNNN.parquet or per-sample .json metadata map
    url -> key; the images are KEY.<ext> files below it or members of its NNNNN.tar). The mapping is
    held in memory: about 150 bytes per URL."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.files: dict[str, str] = {}  # url -> file path
        self.members: dict[str, tuple[str, int, int]] = {}  # url -> (tar, data offset, size)
        if source.is_dir():
            self._load_img2dataset(source)
        elif source.suffix == ".json":
            self.files = {u: str(source.parent / p) for u, p in json.loads(source.read_text()).items()}
        elif source.suffix == ".jsonl":
            for line in source.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.files[entry["url"]] = str(source.parent / entry["path"])
        elif source.suffix in (".tsv", ".txt"):
            for line in source.read_text().splitlines():
                if line.strip():
                    url, _, path = line.partition("\t")
                    self.files[url] = str(source.parent / path.strip())
        else:
            raise InputError(f"--url-mirror {source}: a .json, .jsonl or .tsv mapping or an img2dataset directory")

    def _load_img2dataset(self, root: Path) -> None:
        url_of: dict[str, str] = {}  # key -> url
        metadata = sorted(root.glob("*.parquet"))
        if metadata:
            import pyarrow.parquet as parquet

            for path in metadata:
                names = parquet.ParquetFile(path).schema_arrow.names
                wanted = [c for c in ("url", "key", "status") if c in names]
                for batch in parquet.ParquetFile(path).iter_batches(columns=wanted):
                    for row in batch.to_pylist():
                        if row.get("status", "success") == "success" and row.get("key") is not None:
                            url_of[str(row["key"])] = row["url"]
        located: dict[str, Any] = {}
        for tar_path in sorted(root.glob("*.tar")):
            with tarfile.open(tar_path, mode="r:") as tar:
                for info in tar_members(tar):
                    base, _, extension = info.name.rsplit("/", 1)[-1].partition(".")
                    if extension.lower() in IMAGE_EXTENSIONS:
                        located[base] = (str(tar_path), info.offset_data, info.size)
                    elif extension == "json" and not metadata:
                        handle = tar.extractfile(info)
                        entry = json.loads(handle.read()) if handle else {}
                        if entry.get("url"):
                            url_of[base] = entry["url"]
        for path in sorted(root.rglob("*")):
            base, _, extension = path.name.partition(".")
            if extension.lower() in IMAGE_EXTENSIONS:
                located[base] = str(path)
            elif extension == "json" and not metadata and path.parent != root:
                entry = json.loads(path.read_text())
                if isinstance(entry, dict) and entry.get("url"):
                    url_of[base] = entry["url"]
        for key, url in url_of.items():
            place = located.get(key)
            if isinstance(place, tuple):
                self.members[url] = place
            elif isinstance(place, str):
                self.files[url] = place

    def __len__(self) -> int:
        return len(self.files) + len(self.members)

    def read(self, url: str) -> bytes:
        """The mirrored bytes; KeyError when the URL is not mirrored, OSError when its file is gone."""
        if url in self.files:
            return Path(self.files[url]).read_bytes()
        tar, offset, size = self.members[url]
        with open(tar, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)


def records(unit: Unit, columns: Columns) -> Iterator[Record]:
    """The unit's records in file order, streamed."""
    if unit.format == "jsonl":
        return _jsonl_records(unit.path, columns)
    if unit.format == "json":
        return _json_records(unit.path, columns)
    if unit.format == "parquet":
        return _table_records(_parquet_batches(unit.path), unit.path, columns)
    if unit.format == "arrow":
        return _table_records(_arrow_batches(unit.path), unit.path, columns)
    if unit.format == "tar-pairs":
        return _tar_pair_records(unit.path)
    if unit.format == "tar-pdf":
        return _tar_pdf_records(unit.path)
    if unit.format in ("pdf-dir", "pdf-file"):
        return _pdf_dir_records(unit.path)
    raise InputError(f"{unit.path}: no reader for format {unit.format!r}")
