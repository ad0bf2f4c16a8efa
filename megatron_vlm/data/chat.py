"""Conversations as a model family's chat template renders them, and which tokens are trained on.

A conversation is a list of turns (system, user, assistant), each a list of texts and images in
order. A family names its chat template here (the data pipeline renders training conversations with
it; the converters write the same template into an export's processor files, so that
``apply_chat_template`` on the exported model renders exactly what it was fine-tuned on):

  idefics2  the Hub processor's template of HuggingFaceM4/idefics2-8b: ``Role:`` (``Role: `` when the
            turn starts with text), its texts and ``<image>`` placeholders, ``<end_of_utterance>\\n``;
            ``Assistant:`` opens the answer. The tokenizer adds BOS (the template has none).
  idefics3  Idefics3-8B-Llama3's: the same after ``<|begin_of_text|>``, which the template writes
            itself (so the tokenizer must not add a second BOS).

Loss on answers only: every assistant turn's text and its ``<end_of_utterance>`` are trained on;
system and user turns, role prefixes, images and the newline after each turn never. The boundary is
defined on the characters of the rendered prompt: a token is trained on when any of its characters
lies in an answer (with SentencePiece the space after ``Assistant:`` merges into the answer's first
token, which is then trained on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_vlm.data.tokens import END_OF_UTTERANCE_TOKEN, IMAGE_TOKEN, expand_image_placeholders_with_flags

ROLES = ("system", "user", "assistant")
# Marks on the rendered characters (bits): an answer's, and the newline that ends an exchange.
ANSWER, EXCHANGE_END = 2, 1

# The chat template of HuggingFaceM4/idefics2-8b's processor (processor_config.json, as the issue quotes
# it); Idefics3-8B-Llama3's is the same after <|begin_of_text|>.
IDEFICS2_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_TEMPLATE = "<|begin_of_text|>" + IDEFICS2_TEMPLATE


@dataclass
class Turn:
    """One message: its role and its content in order, each a text (str) or an image (anything
    else: encoded bytes in shards, a PIL image or a processed tensor elsewhere)."""

    role: str
    content: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; a turn is one of {ROLES}")

    @property
    def images(self) -> list[Any]:
        return [part for part in self.content if not isinstance(part, str)]


def check_conversation(turns: list[Turn]) -> None:
    """A conversation that can be trained on: a non-empty turn each, and at least one answer."""
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    for number, turn in enumerate(turns):
        if not turn.content:
            raise ValueError(f"turn {number} ({turn.role}) is empty")
    if not any(
        turn.role == "assistant" and any(isinstance(p, str) and p.strip() for p in turn.content) for turn in turns
    ):
        raise ValueError("a conversation needs at least one assistant turn with text (nothing to train on)")


def messages(turns: list[Turn]) -> list[dict[str, Any]]:
    """The turns as transformers' ``apply_chat_template`` takes them (images as ``{"type": "image"}``)."""
    return [
        {
            "role": turn.role,
            "content": [
                {"type": "text", "text": part} if isinstance(part, str) else {"type": "image"} for part in turn.content
            ],
        }
        for turn in turns
    ]


@dataclass(frozen=True)
class ChatTemplate:
    family: str
    jinja: str  # what an export writes as its processor's chat_template
    prefix: str = ""  # text the template writes before the first turn (a BOS of its own)

    @property
    def tokenizer_adds_bos(self) -> bool:
        """Whether the tokenizer's BOS starts the sequence (else the template wrote its own)."""
        return not self.prefix

    def render(self, turns: list[Turn], add_generation_prompt: bool = False) -> tuple[str, list[int]]:
        """The rendered text (``<image>`` per image) and one mark per character: ``ANSWER`` on the
        answers (each assistant turn's content and its ``<end_of_utterance>``), ``EXCHANGE_END`` on
        the newline that closes an assistant turn (a conversation may be cut after it)."""
        pieces: list[tuple[str, int]] = [(self.prefix, 0)]
        for turn in turns:
            starts_with_image = not isinstance(turn.content[0], str)
            pieces.append((turn.role.capitalize() + (":" if starts_with_image else ": "), 0))
            answer = ANSWER if turn.role == "assistant" else 0
            for part in turn.content:
                pieces.append((part, answer) if isinstance(part, str) else (IMAGE_TOKEN, 0))
            pieces += [(END_OF_UTTERANCE_TOKEN, answer), ("\n", EXCHANGE_END if answer else 0)]
        if add_generation_prompt:
            pieces.append(("Assistant:", 0))
        text = "".join(piece for piece, _ in pieces)
        marks = [mark for piece, mark in pieces for _ in piece]
        return text, marks


CHAT_TEMPLATES = {
    "idefics2": ChatTemplate("idefics2", IDEFICS2_TEMPLATE),
    "idefics3": ChatTemplate("idefics3", IDEFICS3_TEMPLATE, prefix="<|begin_of_text|>"),
}


def chat_template(family: str) -> ChatTemplate:
    if family not in CHAT_TEMPLATES:
        raise ValueError(
            f"no chat template for the {family!r} family (fine-tuning on conversations supports {sorted(CHAT_TEMPLATES)})"
        )
    return CHAT_TEMPLATES[family]


@dataclass
class EncodedConversation:
    tokens: list[int]
    trained: list[bool]  # per token: an answer token (its label counts in the loss)
    exchange_ends: list[int]  # token counts after each assistant turn: where it may be cut


def encode_conversation(
    tokenizer: Any, template: ChatTemplate, turns: list[Turn], image_seq_len: int, split: bool = False
) -> EncodedConversation:
    """A conversation -> its tokens exactly as the family's processor tokenizes
    ``apply_chat_template(messages(turns))`` (images expanded into their placeholder runs), which of
    them are answers, and the token counts at which each exchange ends."""
    check_conversation(turns)
    if template.prefix and template.prefix not in tokenizer.get_vocab():
        raise ValueError(
            f"the {template.family} chat template starts with {template.prefix}, which this tokenizer does not have "
            f"(its BOS is {tokenizer.bos_token!r}): fine-tune with the model's own tokenizer"
        )
    text, marks = template.render(turns)
    expanded, marks = expand_image_placeholders_with_flags(text, marks, image_seq_len, split)
    encoding = tokenizer(expanded, add_special_tokens=False, return_offsets_mapping=True)
    tokens, trained, exchange_ends = [], [], []
    if template.tokenizer_adds_bos:
        tokens.append(tokenizer.bos_token_id)
        trained.append(False)
    for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True):
        tokens.append(token)
        trained.append(any(mark & ANSWER for mark in marks[start:end]))
        if any(mark & EXCHANGE_END for mark in marks[start:end]):
            exchange_ends.append(len(tokens))
    return EncodedConversation(tokens, trained, exchange_ends)
