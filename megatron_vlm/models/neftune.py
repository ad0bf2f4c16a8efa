"""NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"), which the
Idefics2 paper's instruction fine-tuning uses against over-fitting (Appendix A.2): while training,
uniform noise in ±alpha / sqrt(L · d) is added to the input embeddings of the text tokens, L the
number of tokens of the token's own sample (its document: packed conversations each keep their own
scale) and d the embedding width. Image positions (their embeddings are replaced by image features)
and padding get none; evaluation and generation none.

The noise of a micro-batch is drawn from a generator seeded by what the micro-batch holds (the
training seed, its data lane, source and stream positions: ``noise_seed``), so a resumed run draws
the noise the uninterrupted one drew, at any layout, and every tensor-parallel rank the same.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any

import torch

from megatron_vlm.data.batch import document_lengths_per_token


def noise_seed(training_seed: int, meta: Mapping[str, Any]) -> int:
    """A micro-batch's noise seed from the loader's description of it (lane, source, positions)."""
    identity = json.dumps([training_seed, meta["lane"], meta["source"], list(meta["positions"])])
    return zlib.crc32(identity.encode())


def neftune_noise(
    embeddings: torch.Tensor, document_ids: torch.Tensor, is_text: torch.Tensor, alpha: float, seed: int
) -> torch.Tensor:
    """The noise to add to ``embeddings`` [s, b, h] (Megatron's layout): uniform in
    ±alpha / sqrt(L h) at text positions (``is_text`` [b, s]), zero elsewhere."""
    length, batch, hidden = embeddings.shape
    generator = torch.Generator(device=embeddings.device).manual_seed(seed)
    uniform = torch.rand(length, batch, hidden, generator=generator, device=embeddings.device) * 2 - 1
    lengths = document_lengths_per_token(document_ids).to(torch.float32)
    magnitude = alpha / torch.sqrt(lengths.clamp(min=1) * hidden)
    magnitude = torch.where(is_text & (document_ids >= 0), magnitude, torch.zeros_like(magnitude))
    return (uniform * magnitude.t()[:, :, None]).to(embeddings.dtype)
