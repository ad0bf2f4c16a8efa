"""Shared by the parity tests and their multi-process workers: tiny configs, HF oracle, batches."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from megatron_vlm.config import ModelConfig, load_model_preset  # noqa: E402
from megatron_vlm.conversion.verify import hf_inputs, hf_logits, random_hf_model  # noqa: E402, F401  (re-exported)
from megatron_vlm.data.batch import (  # noqa: E402, F401  (re-exported for tests and workers)
    IMAGE_SIZES,
    Batch,
    forward_inputs,
    make_batch,
    megatron_inputs,
    micro_batch,
    training_inputs,
)
from megatron_vlm.distributed import free_port  # noqa: E402, F401

hf_model = random_hf_model

# make_batch's four rows as documents, two per packed row.
DOCUMENT_PAIRS = ((0, 1), (2, 3))


def packed_documents(documents: Batch) -> tuple[dict, list[int]]:
    """The rows of a right-padded batch as documents packed two per row (``DOCUMENT_PAIRS``), the
    images kept in batch-major order -> (the model's forward inputs, each document's length)."""
    import torch

    lengths = documents.padding.sum(dim=1).tolist()
    seq = max(lengths[a] + lengths[b] for a, b in DOCUMENT_PAIRS)
    input_ids = torch.zeros(len(DOCUMENT_PAIRS), seq, dtype=torch.long)
    document_ids = torch.full((len(DOCUMENT_PAIRS), seq), -1)
    for row, (a, b) in enumerate(DOCUMENT_PAIRS):
        tokens = torch.cat([documents.input_ids[a, : lengths[a]], documents.input_ids[b, : lengths[b]]])
        input_ids[row, : tokens.numel()] = tokens
        document_ids[row, : lengths[a]] = 0
        document_ids[row, lengths[a] : tokens.numel()] = 1
    packed = micro_batch(
        input_ids, document_ids, documents.pixel_values, documents.pixel_mask, documents.image_token_id
    )
    return forward_inputs(packed), lengths


def document_errors(packed_logits, reference, lengths: list[int]) -> list[float]:
    """Max |difference| of each document's logits, packed vs its own row of ``reference``."""
    errors = []
    for row, (a, b) in enumerate(DOCUMENT_PAIRS):
        errors.append(float((packed_logits[row, : lengths[a]] - reference[a, : lengths[a]]).abs().max()))
        span = slice(lengths[a], lengths[a] + lengths[b])
        errors.append(float((packed_logits[row, span] - reference[b, : lengths[b]]).abs().max()))
    return errors


def tiny_config(**text_overrides: int) -> ModelConfig:
    config = load_model_preset("tiny")
    # A small vocabulary keeps HF and Megatron fast; the image tokens sit at its end.
    text = dataclasses.replace(config.text, vocab_size=259, **text_overrides)
    return dataclasses.replace(
        config,
        text=text,
        fake_image_token_id=256,
        image_token_id=257,
        end_of_utterance_token_id=258,
        make_vocab_size_divisible_by=16,
    )


def run_torchrun(script: str, nproc: int, args: list[str], timeout: int = 600) -> None:
    """Launch ``tests/workers/<script>`` on ``nproc`` real processes; raise with its output on failure."""
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).resolve().parent / "workers" / script
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(worker),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode:
        raise RuntimeError(
            f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
        )


def run_tool(tool: str, *args: str, timeout: int = 600) -> str:
    """Run ``tools/<tool>`` as a user would; return its stdout, raise with its output on failure."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / tool
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)  # the tool picks its own rendezvous
    done = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode:
        raise RuntimeError(
            f"{tool} {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
        )
    return done.stdout


@contextlib.contextmanager
def counted_checkpoints() -> Iterator[list[int]]:
    """Count the activation checkpoints Megatron-Core takes while inside: full recompute checkpoints
    each layer's forward, selective each core attention, both through ``tensor_parallel.checkpoint``
    (what ``TransformerBlock`` and ``Attention`` call). The list's one element is the count; the
    function itself still runs, so the numbers computed inside are the real ones."""
    from megatron.core import tensor_parallel

    original, count = tensor_parallel.checkpoint, [0]

    def checkpoint(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        count[0] += 1
        return original(*args, **kwargs)

    tensor_parallel.checkpoint = checkpoint
    try:
        yield count
    finally:
        tensor_parallel.checkpoint = original


def recompute_granularities(chunks: list) -> set[str]:
    """The recompute setting every Megatron-Core module of the model chunks was built with
    (``TransformerConfig.recompute_granularity``; "none" for None)."""
    from megatron.core.transformer import TransformerConfig

    return {
        module.config.recompute_granularity or "none"
        for chunk in chunks
        for module in chunk.modules()
        if isinstance(getattr(module, "config", None), TransformerConfig)
    }


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real filesystem of ``size`` (tmpfs) mounted at ``path``: a disk that fills up. The
    disk-full tests need it, so a machine that cannot mount one fails them, naming why (CI runs as
    root; they are not skipped, or a full disk would go untested unseen)."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        pytest.fail(
            f"mount -t tmpfs failed ({done.stderr.decode().strip()}): the disk-full tests need root (CAP_SYS_ADMIN)"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# --------------------------------------------------------------------------------------------
# Tiny models of each converter family (tests/test_families.py, tests/workers/family_worker.py)
# --------------------------------------------------------------------------------------------


def _tiny_idefics2_llama() -> ModelConfig:
    """Idefics2 with a Llama decoder: no sliding window, Llama-3 RoPE scaling."""
    config = tiny_config()
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    }
    text = dataclasses.replace(config.text, kind="llama", sliding_window=None, rope_scaling=scaling)
    return dataclasses.replace(config, text=text)


def _tiny_idefics3() -> ModelConfig:
    """The tiny_idefics3 preset with tiny_config's small vocabulary."""
    config = load_model_preset("tiny_idefics3")
    return dataclasses.replace(
        config,
        text=dataclasses.replace(config.text, vocab_size=259),
        fake_image_token_id=256,
        image_token_id=257,
        end_of_utterance_token_id=258,
        make_vocab_size_divisible_by=16,
    )


def _tiny_idefics1() -> ModelConfig:
    """The tiny_idefics1 preset (cross-attention) with tiny_config's small vocabulary, its three
    image tokens the additional (separately stored) vocabulary."""
    config = load_model_preset("tiny_idefics1")
    return dataclasses.replace(
        config,
        text=dataclasses.replace(config.text, vocab_size=259, additional_vocab_size=3),
        fake_image_token_id=256,
        image_token_id=257,
        end_of_utterance_token_id=258,
        make_vocab_size_divisible_by=16,
    )


# name -> builder of the tiny config (the worker's --family-config).
TINY_FAMILY_CONFIGS = {"idefics2-llama": _tiny_idefics2_llama, "idefics3": _tiny_idefics3, "idefics1": _tiny_idefics1}


def family_config(name: str) -> ModelConfig:
    if name not in TINY_FAMILY_CONFIGS:
        raise ValueError(f"unknown family config {name!r}; known: {sorted(TINY_FAMILY_CONFIGS)}")
    return TINY_FAMILY_CONFIGS[name]()


def family_batch(config: ModelConfig, seed: int = 0, images_per_row: list | None = None) -> Batch:
    """The synthetic parity batch of the config's family: its own maker when its inputs differ from
    Idefics2's (``synthetic_batch``), else ``make_batch``."""
    from megatron_vlm.conversion.families import family_of

    maker = getattr(family_of(config), "synthetic_batch", None)
    if maker is not None:
        return maker(config, seed=seed, images_per_row=images_per_row)
    return make_batch(config, seed=seed, images_per_row=images_per_row)
