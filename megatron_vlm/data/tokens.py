"""Tokenizers with Idefics2's three image tokens (ids 32000-32002 for Mistral-7B's).

Which tokenizer a model uses is its text recipe's choice (``tokenizer``, a name in ``TOKENIZERS``).
Mistral-7B's ships in the ``mistral-common`` wheel, so nothing is downloaded at run time.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
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


def _mistral() -> Any:
    from transformers import LlamaTokenizer

    # Mistral's tokenizer_config adds BOS (add_bos_token), as the released Idefics2's does; a bare
    # tokenizer.model loads without it, and prompts would then start differently from training data.
    return LlamaTokenizer.from_pretrained(str(_mistral_directory()), legacy=False, add_bos_token=True)


# Tokenizers available offline, by the name a text recipe gives.
TOKENIZERS = {"mistral": _mistral}


def load_tokenizer(directory: str | Path | None = None, name: str = "mistral") -> Any:
    """A transformers tokenizer: from ``directory`` if given, else the named one (``TOKENIZERS``).
    The three image tokens are added (and checked) when missing."""
    from transformers import AutoTokenizer

    if directory is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    elif name in TOKENIZERS:
        tokenizer = TOKENIZERS[name]()
    else:
        raise ValueError(f"unknown tokenizer {name!r}; available offline: {sorted(TOKENIZERS)} (or give a directory)")
    if tokenizer.pad_token is None:  # Idefics2 pads with <unk> (id 0)
        tokenizer.pad_token = tokenizer.unk_token
    missing = [t for t in IMAGE_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return tokenizer


def image_token_ids(tokenizer: Any) -> dict[str, int]:
    return dict(zip(IMAGE_TOKENS, tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS)), strict=True))


def image_prompt(image_seq_len: int, split: bool) -> str:
    """What one <image> in a prompt becomes: fake, image x N, fake (x5 with splitting)."""
    single = f"{FAKE_IMAGE_TOKEN}{IMAGE_TOKEN * image_seq_len}{FAKE_IMAGE_TOKEN}"
    return single * 5 if split else single


_WORD_AFTER_CLOSING_FAKE = re.compile(rf"{re.escape(FAKE_IMAGE_TOKEN)}(?=[^\s<])")


def _substitute(pattern: re.Pattern[str], replacement: str, text: str, flags: list[int]) -> tuple[str, list[int]]:
    """``pattern.sub(replacement, text)`` carrying one flag (an int: bits) per character along:
    replaced text gets 0, except a trailing space the replacement adds, which takes the flag of the
    character after it (the space joins that word's token)."""
    pieces, out_flags, last = [], [], 0
    for match in pattern.finditer(text):
        pieces.append(text[last : match.start()])
        out_flags += flags[last : match.start()]
        added = match.expand(replacement)
        pieces.append(added)
        following = flags[match.end()] if match.end() < len(flags) else 0
        core = len(added.rstrip(" "))
        out_flags += [0] * core + [following] * (len(added) - core)
        last = match.end()
    pieces.append(text[last:])
    out_flags += flags[last:]
    return "".join(pieces), out_flags


def expand_image_placeholders_with_flags(
    text: str, flags: list[int], image_seq_len: int, split: bool = False
) -> tuple[str, list[int]]:
    """``expand_image_placeholders`` with a flag per character carried to the expanded text (the
    chat data marks its answers' characters so; image tokens get 0)."""
    if len(flags) != len(text):
        raise ValueError(f"{len(flags)} flags for {len(text)} characters")
    text, flags = _substitute(re.compile(re.escape(IMAGE_TOKEN)), image_prompt(image_seq_len, split), text, flags)
    text, flags = _substitute(re.compile(re.escape(FAKE_IMAGE_TOKEN * 2)), FAKE_IMAGE_TOKEN, text, flags)
    return _substitute(_WORD_AFTER_CLOSING_FAKE, f"{FAKE_IMAGE_TOKEN} ", text, flags)


def expand_image_placeholders(text: str, image_seq_len: int, split: bool = False) -> str:
    """Expand each <image> as Idefics2 does: adjacent fake tokens merged, and a word glued to a
    closing fake token separated by a space (so it tokenizes as a word start)."""
    return expand_image_placeholders_with_flags(text, [0] * len(text), image_seq_len, split)[0]


def tokenize_prompts(tokenizer: Any, texts: list[str], image_seq_len: int, split: bool = False) -> list[list[int]]:
    """Token ids of prompts with <image> placeholders, laid out as Idefics2Processor lays them."""
    expanded = [expand_image_placeholders(text, image_seq_len, split) for text in texts]
    return [list(ids) for ids in tokenizer(expanded, add_special_tokens=True)["input_ids"]]
