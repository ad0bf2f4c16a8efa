"""Hugging Face checkpoint directories: streamed reads and sharded, atomic writes (safetensors)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


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
        self._handles: dict[Path, Any] = {}
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
        weight_map = {}
        for file in files:
            for name in self._open(file).keys():
                weight_map[name] = file
        return weight_map

    def _open(self, file: Path) -> Any:
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as error:  # noqa: BLE001 - safetensors raises several types
                raise ValueError(f"cannot read {file}: {error}") from error
        return self._handles[file]

    @property
    def names(self) -> set[str]:
        return set(self.file_of)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise KeyError(f"{name} is not in {self.directory}")
        try:
            return self._open(self.file_of[name]).get_tensor(name)
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"cannot read tensor {name} from {self.file_of[name]}: {error}") from error

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.file_of.values()))


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
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        index = len(self._shards)
        save_file(self._pending, str(self.temporary / f"shard-{index:05d}.safetensors"), metadata={"format": "pt"})
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


def iter_files(directory: Path, patterns: Iterable[str]) -> list[Path]:
    return sorted({p for pattern in patterns for p in directory.glob(pattern) if p.is_file()})
