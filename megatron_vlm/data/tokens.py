"""The Mistral-7B tokenizer with Idefics2's three image tokens (ids 32000-32002).

The real tokenizer ships in the ``mistral-common`` wheel, so nothing is downloaded at run time.
"""

from __future__ import annotations

import functools
import importlib.resources
import shutil
import tempfile
from pathlib import Path
from typing import Any

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
IMAGE_TOKENS = (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE_TOKEN)


def mistral_tokenizer_model() -> Path:
    """Path of the SentencePiece model of Mistral-7B (v1, 32,000 pieces) in mistral-common."""
    try:
        path = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the Mistral tokenizer ships in mistral-common: pip install mistral-common"
        ) from error
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed mistral-common")
    return Path(str(path))


@functools.cache
def _mistral_directory() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="megatron-vlm-tokenizer-"))
    shutil.copy(mistral_tokenizer_model(), directory / "tokenizer.model")
    return directory


def load_tokenizer(directory: str | Path | None = None) -> Any:
    """A transformers tokenizer: from ``directory`` if given, else Mistral-7B from mistral-common.
    The three image tokens are added (and checked) when missing."""
    from transformers import AutoTokenizer, LlamaTokenizer

    if directory is None:
        tokenizer = LlamaTokenizer.from_pretrained(str(_mistral_directory()), legacy=False)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token is None:  # Idefics2 pads with <unk> (id 0)
        tokenizer.pad_token = tokenizer.unk_token
    missing = [t for t in IMAGE_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return tokenizer


def image_token_ids(tokenizer: Any) -> dict[str, int]:
    return dict(zip(IMAGE_TOKENS, tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS)), strict=True))
