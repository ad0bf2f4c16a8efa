"""Hugging Face checkpoint directories: streamed reads and sharded, atomic writes (safetensors).

Tensors are read and written one at a time with plain file I/O rather than memory maps: a mapped
checkpoint stays resident (and counted) while a converter also holds the model, so a streamed
conversion would need twice the model's memory.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The tensor table of a safetensors file and the offset where its data starts."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 2**20:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(handle.read(length))
        size = path.stat().st_size
    except (OSError, struct.error, ValueError) as error:
        raise ValueError(f"cannot read {path}: not a safetensors file ({error})") from error
    header.pop("__metadata__", None)
    for name, entry in header.items():
        if entry["dtype"] not in _DTYPES or 8 + length + entry["data_offsets"][1] > size:
            raise ValueError(f"cannot read {path}: tensor {name} is truncated or of unknown dtype {entry['dtype']}")
    return header, 8 + length


def host_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy (or the tensor itself when it already is one) without autograd
    history: what the byte view below needs, whatever device or layout the tensor comes from
    (on a GPU host the exported model lives on CUDA)."""
    return tensor.detach().to("cpu").contiguous()


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file, each tensor's bytes written from a host copy of it."""
    tensors = {name: host_tensor(tensor) for name, tensor in tensors.items()}
    header, offset = {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for tensor in tensors.values():
            handle.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


class HFCheckpoint:
    """A transformers checkpoint directory: ``config.json`` plus one safetensors file or several
    with an index. Tensors are read one at a time (memory-mapped), never the whole model."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"HF checkpoint directory {self.directory} does not exist")
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}") from error
        self._headers: dict[Path, tuple[dict[str, Any], int]] = {}
        self.file_of: dict[str, Path] = self._weight_map()

    def _weight_map(self) -> dict[str, Path]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise ValueError(f"{index} is not a safetensors index: {error}") from error
            missing = sorted({f for f in weight_map.values() if not (self.directory / f).is_file()})
            if missing:
                raise FileNotFoundError(f"{index} names shard files that do not exist: {missing}")
            return {name: self.directory / file for name, file in weight_map.items()}
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            hint = (
                " (only PyTorch .bin weights: re-save with safe_serialization=True)"
                if any(self.directory.glob("*.bin"))
                else ""
            )
            raise FileNotFoundError(f"no safetensors weights in {self.directory}{hint}")
        return {name: file for file in files for name in self._header(file)[0]}

    def _header(self, file: Path) -> tuple[dict[str, Any], int]:
        if file not in self._headers:
            self._headers[file] = read_safetensors_header(file)
        return self._headers[file]

    @property
    def names(self) -> set[str]:
        return set(self.file_of)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise KeyError(f"{name} is not in {self.directory}")
        file = self.file_of[name]
        header, data_start = self._header(file)
        if name not in header:
            raise ValueError(f"cannot read tensor {name} from {file}: the file does not contain it")
        entry = header[name]
        start, end = entry["data_offsets"]
        buffer = bytearray(end - start)
        with file.open("rb") as handle:
            handle.seek(data_start + start)
            if handle.readinto(buffer) != len(buffer):
                raise ValueError(f"cannot read tensor {name} from {file}: the file is truncated")
        if not buffer:
            return torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
        return torch.frombuffer(buffer, dtype=_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.file_of.values()))

    def dtype(self) -> torch.dtype | None:
        """The dtype the weights are stored in: config.json's ``dtype`` (``torch_dtype`` before
        transformers 5), else the floating dtype of the tensors when they all agree; None when
        neither says."""
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        if isinstance(name, str):
            dtype = getattr(torch, name.removeprefix("torch."), None)
            if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
                return dtype
        stored = {self._header(file)[0][name]["dtype"] for name, file in self.file_of.items()}
        floating = {_DTYPES[entry] for entry in stored if _DTYPES[entry].is_floating_point}
        return floating.pop() if len(floating) == 1 else None


class ShardedSafetensorsWriter:
    """Writes tensors as they come into ``model-0000i-of-0000N.safetensors`` files of at most
    ``max_shard_bytes`` plus the index, in a temporary directory renamed into place by ``commit``."""

    def __init__(self, directory: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
        self.directory = Path(directory)
        if self.directory.exists():
            raise FileExistsError(f"{self.directory} exists; refusing to overwrite it")
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        self.temporary = Path(tempfile.mkdtemp(prefix=f".{self.directory.name}.", dir=self.directory.parent))
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in shard for shard in self._shards):
            raise ValueError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        # Pending tensors wait in host memory (bounded by the shard size), not on the GPU.
        self._pending[name] = host_tensor(tensor)
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        index = len(self._shards)
        write_safetensors(self.temporary / f"shard-{index:05d}.safetensors", self._pending)
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def write_file(self, name: str, content: str) -> None:
        (self.temporary / name).write_text(content)

    def copy_in(self, source: Path) -> None:
        shutil.copy2(source, self.temporary / source.name)

    def commit(self) -> Path:
        if self._pending:
            self._flush()
        count = len(self._shards)
        weight_map = {}
        for index, names in enumerate(self._shards):
            final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.temporary / f"shard-{index:05d}.safetensors", self.temporary / final)
            weight_map.update(dict.fromkeys(names, final))
        index_content = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.temporary / INDEX_FILE).write_text(json.dumps(index_content, indent=2))
        os.replace(self.temporary, self.directory)
        return self.directory

    def abort(self) -> None:
        shutil.rmtree(self.temporary, ignore_errors=True)


def write_json(writer: ShardedSafetensorsWriter, name: str, content: dict[str, Any]) -> None:
    writer.write_file(name, json.dumps(content, indent=2, sort_keys=True) + "\n")
