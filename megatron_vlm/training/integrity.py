"""Checkpoint integrity and safe unpickling.

**Manifest.** ``manifest.json`` is the last file written into a checkpoint: every other file's
size and CRC-32, computed after all ranks finished writing. At load a missing, extra, truncated or
altered file is found and named, and the trainer falls back to the previous complete checkpoint.
CRC-32 (zlib, in the standard library of every supported Python): it detects every truncation
(the size) and every single-bit flip or burst up to 32 bits, and it is twice as fast as SHA-256 —
measured on a 512 MiB file on this project's CPU host: crc32 1.9-2.2 GB/s, sha256 1.0 GB/s,
blake2b 0.5 GB/s, xxh3 4.5 GB/s (a dependency that the Python 3.12 environment lacks), page-cache
read 6.6 GB/s. The files are hashed in parallel, each rank a share, so an 8B checkpoint (~110 GB with
the optimizer state) on 32 ranks costs about 2 s at save and at load. The manifest guards against
damage (cut-off copies, bit rot), not against someone who can write the directory: that person can
rewrite the manifest too, hence the pickle rules below apply to every checkpoint regardless.

**Pickles.** Nothing in a checkpoint directory is unpickled without restriction: our per-rank
files are read with ``torch.load(weights_only=True)`` (files written before this change hold NumPy's
RNG state as an ndarray, so NumPy's array reconstruction types are allow-listed for them); what the
libraries read (DCP's ``.metadata``, Megatron's ``common.pt``) is checked first by the rules of
``models/safe_load.py``, re-exported here.
What remains: the library re-reads ``.metadata`` after our check, so a file swapped in between
(by someone with write access to the directory during the load) would be unpickled by it.
"""

from __future__ import annotations

import json
import os
import pickle
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_vlm.models.safe_load import (  # noqa: F401  (re-exported: the pickle rules live with the loaders)
    CheckpointDamaged,
    RestrictedUnpickler,
    UnsafePickle,
    check_dcp_metadata,
    check_library_pickles,
    check_torch_pickle,
)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_BLOCK = 8 << 20


def crc32_of(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def checkpoint_files(directory: Path) -> list[str]:
    """Every file below ``directory`` (relative, sorted) except the manifest."""
    return sorted(
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and path.relative_to(directory) != Path(MANIFEST)
    )


def describe_files(directory: Path, names: Sequence[str]) -> dict[str, dict[str, int]]:
    return {name: {"size": (directory / name).stat().st_size, "crc32": crc32_of(directory / name)} for name in names}


def write_manifest(directory: Path, entries: dict[str, dict[str, int]]) -> Path:
    """Write the manifest atomically (temporary file, fsync, rename): it is the checkpoint's last file."""
    target = directory / MANIFEST
    temporary = directory / (MANIFEST + ".tmp")
    document = {"format": MANIFEST_FORMAT, "algorithm": "crc32", "files": dict(sorted(entries.items()))}
    with open(temporary, "w") as handle:
        json.dump(document, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)
    return target


def read_manifest(directory: Path) -> dict[str, dict[str, int]] | None:
    """The manifest's file entries; None when the checkpoint has none (written before manifests)."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
        files = document["files"]
        if document.get("algorithm") != "crc32" or not isinstance(files, dict):
            raise ValueError(f"unknown manifest algorithm {document.get('algorithm')!r}")
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointDamaged(f"{path} is unreadable: {error}") from None
    return files


def check_files(directory: Path, manifest: dict[str, dict[str, int]], names: Sequence[str]) -> list[str]:
    """Problems (empty if none) of the named files against the manifest: missing, truncated, altered."""
    problems = []
    for name in names:
        expected = manifest[name]
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != expected["size"]:
            problems.append(f"{name}: {size} bytes, the manifest says {expected['size']} (truncated or replaced)")
        elif crc32_of(path) != expected["crc32"]:
            problems.append(f"{name}: checksum mismatch (corrupted or altered)")
    return problems


def unlisted_files(directory: Path, manifest: dict[str, dict[str, int]]) -> list[str]:
    return [f"{name}: not in the manifest" for name in checkpoint_files(directory) if name not in manifest]


def numpy_safe_globals() -> list[Any]:
    """What a per-rank file written before this change needs beyond weights_only: NumPy's RNG state array."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    uint32 = type(np.dtype(np.uint32))
    # Named as NumPy 1 and 2 pickle them (numpy.core became numpy._core).
    return [
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        uint32,
        (uint32, "numpy.dtypes.UInt32DType"),
    ]


def load_rank_file(path: Path) -> Any:
    """Our per-rank state with ``weights_only=True`` (NumPy arrays allowed for older files)."""
    import torch

    with torch.serialization.safe_globals(numpy_safe_globals()):
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as error:
            raise UnsafePickle(
                f"{path} holds more than tensors and plain values, refused (weights_only): {error}"
            ) from None
