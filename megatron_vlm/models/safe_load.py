"""Safe unpickling of model checkpoints: nothing a library reads from a checkpoint directory is
unpickled before its pickles were checked (``check_library_pickles``). Used wherever a checkpoint
from elsewhere is loaded: the trainer's start weights and resumes (``training/integrity.py``, which
re-exports these), generation and evaluation.

- torch DCP's ``.metadata`` (read by the library with a plain ``pickle.load``): first read here
  by :class:`RestrictedUnpickler`, which only resolves DCP's own dataclasses and enums, ``torch.Size``,
  dtypes/layouts/memory formats and a few builtins; a file naming anything else is refused before the
  library opens it;
- Megatron's ``common.pt``: its pickled globals are listed without executing anything
  (``torch.serialization.get_unsafe_globals_in_checkpoint``) and must be none, and torch >= 2.6 loads it
  ``weights_only`` by default.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import io
import pickle
from pathlib import Path
from typing import Any


class CheckpointDamaged(RuntimeError):
    """A damaged checkpoint: files that do not match its manifest, or a pickle that cannot be read."""


class UnsafePickle(RuntimeError):
    """A pickle in a checkpoint that names code outside the allow-list."""


_DCP_PREFIX = "torch.distributed.checkpoint."
_ALLOWED_BUILTINS = {
    ("builtins", name) for name in ("set", "frozenset", "slice", "complex", "bytearray", "range", "tuple", "list")
} | {("collections", "OrderedDict"), ("collections", "defaultdict"), ("torch", "Size")}
_ALLOWED_FUNCTIONS = {("torch.serialization", "_get_layout")}  # returns a layout by name


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the types a torch DCP ``.metadata`` holds; anything else is refused, unresolved."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_BUILTINS | _ALLOWED_FUNCTIONS:
            return super().find_class(module, name)
        if module == "torch" or module.startswith(_DCP_PREFIX):
            obj = getattr(importlib.import_module(module), name, None)
            import torch

            if isinstance(obj, torch.dtype | torch.layout | torch.memory_format):
                return obj
            if (
                module.startswith(_DCP_PREFIX)
                and isinstance(obj, type)
                and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
            ):
                return obj
        raise UnsafePickle(f"names {module}.{name}, which a checkpoint's metadata never holds")


def check_dcp_metadata(path: Path) -> None:
    """Unpickle a DCP ``.metadata`` with :class:`RestrictedUnpickler`; raises naming the file if unsafe."""
    try:
        RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
    except UnsafePickle as error:
        raise UnsafePickle(f"{path} {error}: refused (it would run code when loaded)") from None
    except Exception as error:  # noqa: BLE001 - any other failure: damaged, name it
        raise CheckpointDamaged(f"{path} is not a readable checkpoint metadata pickle: {error}") from None


def check_torch_pickle(path: Path) -> None:
    """A torch-saved file (``common.pt``) must pickle no globals beyond torch's weights_only set."""
    import torch

    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as error:  # noqa: BLE001 - not a torch zip file
        raise CheckpointDamaged(f"{path} is not a readable torch file: {error}") from None
    if unsafe:
        raise UnsafePickle(f"{path} names {', '.join(unsafe)}: refused (it would run code when loaded)")


def check_library_pickles(directory: str | Path) -> None:
    """Every pickle a library will read from a checkpoint directory, checked before it does."""
    directory = Path(directory)
    for path in sorted(directory.rglob(".metadata")):
        check_dcp_metadata(path)
    for path in sorted(directory.rglob("common.pt")):
        check_torch_pickle(path)
