"""webdataset tar shards with an index, for the three layouts of the paper's data.

A sample is a list of segments in document order, each a text (str) or an encoded image (bytes),
with a ``kind``: "interleaved" (OBELICS-style web documents), "pair" (image + caption), "page"
(a document page image + its text) or "conversation" (turns of a role each: its segments are the
turns' contents in order, ``turns`` says whose and how many). In the tar, members sharing a key
form a sample:

    KEY.json            {"kind": ..., "layout": ["text", "image", ...], "texts": [...]}
                        (a conversation adds "turns": [[role, segments], ...])
    KEY.<i>.<ext>       the i-th image of an interleaved document
    KEY.<ext> + KEY.txt the image and text of a pair or a page, as webdataset captioning datasets
                        store them, so ``energon prepare --sample-type CaptioningSample`` reads
                        pair and page shards as they are

Each ``NAME.tar`` has ``NAME.tar.idx.json``: every sample's key and byte range, for random access
and exact resume. Tars are written deterministically (fixed metadata, input order).

Images that ``images.canonical_encoding`` re-encoded (formats or modes DALI decodes differently)
are stored as ``.png`` and recorded in the index: ``"converted": {"IMAGE INDEX": "REASON"}`` on
their sample's entry, and the count per reason under the index's own ``"converted"``. Indexes
written before this carry neither and read the same (nothing converted).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_vlm.data.images import conversion_note

KINDS = ("interleaved", "pair", "page", "conversation")
SINGLE_IMAGE_KINDS = ("pair", "page")  # stored in webdataset's captioning layout
INDEX_SUFFIX = ".idx.json"


@dataclass
class Sample:
    key: str
    kind: str
    segments: list[str | bytes]
    image_extensions: list[str] = field(default_factory=list)  # one per image segment
    turns: list[tuple[str, int]] | None = None  # a conversation's: (role, its number of segments) in order

    def __post_init__(self) -> None:
        if (self.kind == "conversation") != (self.turns is not None):
            raise ValueError(f"sample {self.key}: turns are given exactly for conversations (kind {self.kind!r})")
        if self.turns is not None and sum(count for _, count in self.turns) != len(self.segments):
            raise ValueError(
                f"sample {self.key}: its turns hold {sum(c for _, c in self.turns)} segments, not {len(self.segments)}"
            )

    def conversation(self) -> list[Any]:
        """A conversation's turns (``chat.Turn``), their images as the encoded bytes."""
        from megatron_vlm.data.chat import Turn

        if self.turns is None:
            raise ValueError(f"sample {self.key} is a {self.kind}, not a conversation")
        turns, start = [], 0
        for role, count in self.turns:
            turns.append(Turn(role, list(self.segments[start : start + count])))
            start += count
        return turns

    @property
    def images(self) -> list[bytes]:
        return [s for s in self.segments if isinstance(s, bytes)]

    @property
    def texts(self) -> list[str]:
        return [s for s in self.segments if isinstance(s, str)]


class CorruptSample(ValueError):
    """A sample that cannot be used; ``reason`` is a short category for the skip counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _member(name: str, payload: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
    return info, io.BytesIO(payload)


class ShardWriter:
    """Writes samples into one tar + its index (temporary names, renamed on close)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._temporary = self.path.with_name(self.path.name + ".incomplete")
        self._file = self._temporary.open("wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._entries: list[dict] = []
        self.converted: Counter[str] = Counter()  # images stored re-encoded, by reason

    def write(self, sample: Sample) -> None:
        if sample.kind not in KINDS:
            raise ValueError(f"unknown sample kind {sample.kind!r}")
        if "." in sample.key or "/" in sample.key:
            raise ValueError(f"sample key {sample.key!r} must not contain '.' or '/'")
        layout = ["image" if isinstance(s, bytes) else "text" for s in sample.segments]
        meta = {"kind": sample.kind, "layout": layout, "texts": sample.texts}
        if sample.turns is not None:
            meta["turns"] = [list(turn) for turn in sample.turns]
        members = [(f"{sample.key}.json", json.dumps(meta, ensure_ascii=False).encode())]
        extensions = list(sample.image_extensions) + ["jpg"] * len(sample.images)
        # A re-encoded image is a PNG whatever it was: its member must say so (webdataset decodes by
        # extension), and the index says what it was and why.
        converted = {}
        for index, image in enumerate(sample.images):
            note = conversion_note(image)
            if note is not None:
                converted[str(index)] = note
                extensions[index] = "png"
        if sample.kind in SINGLE_IMAGE_KINDS:
            if len(sample.images) != 1 or len(sample.texts) != 1:
                raise ValueError(f"{sample.kind} {sample.key} needs exactly one image and one text")
            members.append((f"{sample.key}.txt", sample.texts[0].encode()))
            members.append((f"{sample.key}.{extensions[0]}", sample.images[0]))
        else:
            for index, image in enumerate(sample.images):
                members.append((f"{sample.key}.{index}.{extensions[index]}", image))
        start = self._file.tell()
        for name, payload in members:
            self._tar.addfile(*_member(name, payload))
        entry = {"key": sample.key, "offset": start, "size": self._file.tell() - start}
        if converted:
            entry["converted"] = converted
            self.converted.update(converted.values())
        self._entries.append(entry)

    def close(self) -> int:
        self._tar.close()
        self._file.close()
        index = {"count": len(self._entries), "tar_bytes": self._temporary.stat().st_size, "samples": self._entries}
        if self.converted:
            index["converted"] = dict(sorted(self.converted.items()))
        index_path = Path(str(self.path) + INDEX_SUFFIX)
        index_path.with_name(index_path.name + ".incomplete").write_text(json.dumps(index))
        os.replace(self._temporary, self.path)
        os.replace(index_path.with_name(index_path.name + ".incomplete"), index_path)
        return len(self._entries)


class Shard:
    """Random access to the samples of one indexed tar."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index_path = Path(str(self.path) + INDEX_SUFFIX)
        if not self.path.is_file():
            raise FileNotFoundError(f"shard {self.path} does not exist")
        if not index_path.is_file():
            raise FileNotFoundError(f"shard index {index_path} is missing (rebuild with tools/preprocess_data.py)")
        index = json.loads(index_path.read_text())
        self.entries: list[dict] = index["samples"]
        self.converted: dict[str, int] = index.get("converted", {})  # absent from older indexes
        self.size_on_disk = self.path.stat().st_size

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, position: int) -> Sample:
        """The sample at ``position``; raises CorruptSample when it cannot be used."""
        entry = self.entries[position]
        key = entry["key"]
        if entry["offset"] + entry["size"] > self.size_on_disk:
            raise CorruptSample("truncated_shard", f"{self.path.name}:{key} lies past the end of the file")
        with self.path.open("rb") as handle:
            handle.seek(entry["offset"])
            payload = handle.read(entry["size"])
        members: dict[str, bytes] = {}
        try:
            with tarfile.open(fileobj=io.BytesIO(payload), mode="r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    base, _, extension = info.name.partition(".")
                    if base != key:
                        raise CorruptSample("broken_member", f"{self.path.name}:{key} holds a member of {base!r}")
                    data = tar.extractfile(info)
                    members[extension] = data.read() if data else b""
        except (tarfile.TarError, EOFError, OSError) as error:
            raise CorruptSample("broken_member", f"{self.path.name}:{key}: {error}") from error
        return _assemble(key, members, self.path.name)

    def __iter__(self) -> Iterator[Sample]:
        for position in range(len(self)):
            yield self.read(position)


def _assemble(key: str, members: dict[str, bytes], shard_name: str) -> Sample:
    where = f"{shard_name}:{key}"
    if "json" not in members:
        raise CorruptSample("missing_field", f"{where} has no .json member")
    try:
        meta = json.loads(members["json"])
        if isinstance(meta, dict) and "kind" not in meta and "txt" in members:
            # A plain webdataset captioning sample (an img2dataset tar taken as it is: its KEY.json
            # is img2dataset's own metadata): a pair of its one image and its caption.
            meta = {"kind": "pair", "layout": ["image", "text"], "texts": [members["txt"].decode("utf-8", "replace")]}
        kind, layout, texts = meta["kind"], meta["layout"], list(meta["texts"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CorruptSample("missing_field", f"{where}: bad .json ({error})") from error
    if kind not in KINDS:
        raise CorruptSample("missing_field", f"{where}: unknown kind {kind!r}")
    if kind in SINGLE_IMAGE_KINDS:
        found = [(data, ext) for ext, data in members.items() if ext not in ("json", "txt")]
        images = {0: found[0]} if len(found) == 1 else {}
    else:
        images = {
            int(ext.split(".")[0]): (data, ext.split(".", 1)[1])
            for ext, data in members.items()
            if ext[:1].isdigit() and "." in ext
        }
    segments: list[str | bytes] = []
    extensions: list[str] = []
    text_iter, image_index = iter(texts), 0
    for slot in layout:
        if slot == "text":
            text = next(text_iter, None)
            if not isinstance(text, str):
                raise CorruptSample("missing_field", f"{where}: layout names more texts than it has")
            segments.append(text)
        else:
            if image_index not in images:
                raise CorruptSample("missing_field", f"{where}: image {image_index} is missing")
            data, extension = images[image_index]
            segments.append(data)
            extensions.append(extension)
            image_index += 1
    turns = meta.get("turns") if kind == "conversation" else None
    try:
        return Sample(key, kind, segments, extensions, [(role, count) for role, count in turns] if turns else turns)
    except (ValueError, TypeError) as error:
        raise CorruptSample("missing_field", f"{where}: {error}") from error


def shard_paths(pattern_or_dir: str | Path) -> list[Path]:
    """A directory (its *.tar), a glob pattern, or one tar -> sorted shard paths."""
    path = Path(pattern_or_dir)
    if path.is_dir():
        found = sorted(path.glob("*.tar"))
    elif any(ch in str(path) for ch in "*?["):
        found = sorted(Path(path.anchor or ".").glob(str(path.relative_to(path.anchor)) if path.anchor else str(path)))
    else:
        found = [path]
    if not found:
        raise FileNotFoundError(f"no shards at {pattern_or_dir}")
    return found


class ShardSet:
    """The samples of a shard set (a directory, a glob or one tar) by position, in storage order:
    sorted shards, each in index order. The training stream and the validation split both read
    through it."""

    def __init__(self, pattern_or_dir: str | Path) -> None:
        self.shards = [Shard(path) for path in shard_paths(pattern_or_dir)]
        self.locations = [(s, p) for s, shard in enumerate(self.shards) for p in range(len(shard))]

    def __len__(self) -> int:
        return len(self.locations)

    def read(self, position: int) -> Sample:
        shard, index = self.locations[position]
        return self.shards[shard].read(index)

    def where(self, position: int) -> str:
        shard, index = self.locations[position]
        return f"{self.shards[shard].path.name}[{index}]"
