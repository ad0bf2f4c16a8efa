"""Documents -> fixed-length training sequences: packing and truncation at image boundaries;
``collate`` turns them into micro-batches of ``batch.py``'s format (document ids, which the
model's attention follows, position ids and loss masks).

A document is a token sequence whose ``<image>`` placeholder runs each stand for one processed
image (64 latents by default; a split image is 5 runs). Several documents share a sequence
(packing); attention never crosses a document boundary and positions restart at each document.
A document never loses part of an image: truncation cuts before the first run that does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_vlm.data.batch import MicroBatch, micro_batch
from megatron_vlm.data.images import pad_images


@dataclass
class Document:
    tokens: list[int]
    images: list[torch.Tensor]  # processed images [3, h, w], one per <image> run, in order (any device)
    source: str = ""
    position: int = -1  # where it came from in its source's stream (for exact resume)
    # A conversation's: which tokens are trained on (its answers; None: all), and the token counts
    # at which it may be cut (after each exchange; None: anywhere outside an image).
    trained: list[bool] | None = None
    cuts: list[int] | None = None
    index: int = -1  # its index in the training stream of its source (epochs concatenated); -1: none


@dataclass(frozen=True)
class PackingConfig:
    seq_len: int
    image_token_id: int
    image_seq_len: int
    max_images_per_sequence: int = 32
    pad_token_id: int = 0
    pack: bool = True  # False: one document per sequence, padded


def image_runs(tokens: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of each run of <image> tokens."""
    runs, start = [], None
    for index, token in enumerate(tokens):
        if token == image_token_id and start is None:
            start = index
        elif token != image_token_id and start is not None:
            runs.append((start, index))
            start = None
    if start is not None:
        runs.append((start, len(tokens)))
    return runs


def fit(document: Document, config: PackingConfig, room: int, image_room: int) -> Document | None:
    """The longest prefix of ``document`` within ``room`` tokens and ``image_room`` images that
    keeps every image whole; None if not even one token of text fits before the first image. A
    conversation is cut only after an exchange (the turns that fit are kept): None if not even its
    first exchange fits."""
    runs = image_runs(document.tokens, config.image_token_id)
    if len(runs) != len(document.images):
        raise ValueError(f"{len(runs)} <image> runs but {len(document.images)} images")
    if any(end - start != config.image_seq_len for start, end in runs):
        raise ValueError(f"an <image> run is not {config.image_seq_len} tokens long")
    if document.cuts is not None:
        fitting = [c for c in document.cuts if c <= room and sum(end <= c for _, end in runs) <= image_room]
        if not fitting:
            return None
        cut = max(fitting)
        return _prefix(document, cut, sum(end <= cut for _, end in runs))
    cut = min(room, len(document.tokens))
    kept = 0
    for start, end in runs:
        if end > cut or kept == image_room:
            cut = min(cut, start)
            break
        kept += 1
    # Do not end on the fake token that opens a cut image: drop a dangling opener too.
    if cut < len(document.tokens) and kept < len(runs) and cut > 0 and cut == runs[kept][0]:
        cut -= 1
    if cut <= 0:
        return None
    return _prefix(document, cut, kept)


def _prefix(document: Document, cut: int, kept: int) -> Document:
    """The document's first ``cut`` tokens and ``kept`` images, with their marks."""
    trained = document.trained[:cut] if document.trained is not None else None
    cuts = [c for c in document.cuts if c <= cut] if document.cuts is not None else None
    return Document(
        document.tokens[:cut], document.images[:kept], document.source, document.position, trained, cuts, document.index
    )


@dataclass
class PackedSequence:
    tokens: list[int]
    document_ids: list[int]  # -1 for padding
    images: list[torch.Tensor]
    positions: list[int]  # stream positions of the documents it holds
    trained: list[bool] = field(default_factory=list)  # per token: its prediction is trained on ([]: all)


class Packer:
    """Greedy, deterministic packing: documents go in one at a time, full sequences come out.

    With ``pack=False`` each document fills one sequence alone (padded later). ``pending()``
    lists, in order, the documents not yet handed out; adding them again to a fresh packer
    rebuilds the same state, which is how a resumed run continues exactly.
    """

    def __init__(self, config: PackingConfig) -> None:
        self.config = config
        self.ready: list[tuple[PackedSequence, list[Document]]] = []
        self._current = PackedSequence([], [], [], [])
        self._current_documents: list[Document] = []
        self.dropped = 0  # documents without a single token that fits (e.g. an image too long alone)

    def add(self, document: Document) -> None:
        config = self.config
        while True:
            room = config.seq_len - len(self._current.tokens)
            image_room = config.max_images_per_sequence - len(self._current.images)
            whole = len(document.tokens) <= room and len(document.images) <= image_room
            if not whole and self._current.tokens:
                self._flush()  # start a new sequence for this document
                continue
            piece = document if whole else fit(document, config, room, image_room)
            if piece is None:
                self.dropped += 1
                return
            doc_id = len(self._current_documents)
            self._current.tokens += piece.tokens
            self._current.document_ids += [doc_id] * len(piece.tokens)
            self._current.images += piece.images
            self._current.trained += piece.trained if piece.trained is not None else [True] * len(piece.tokens)
            self._current.positions.append(piece.position)
            self._current_documents.append(document)
            if not config.pack or len(self._current.tokens) >= config.seq_len:
                self._flush()
            return

    def _flush(self) -> None:
        self.ready.append((self._current, self._current_documents))
        self._current = PackedSequence([], [], [], [])
        self._current_documents = []

    def pop(self) -> PackedSequence | None:
        return self.ready.pop(0)[0] if self.ready else None

    def pending(self) -> list[Document]:
        return [d for _, documents in self.ready for d in documents] + list(self._current_documents)


def collate(sequences: list[PackedSequence], config: PackingConfig, seq_len: int | None = None) -> MicroBatch:
    """Packed sequences -> one micro-batch for ``Idefics2Model`` (padded to ``seq_len``; the format
    is ``batch.micro_batch``'s)."""
    seq_len = seq_len or config.seq_len
    batch = len(sequences)
    input_ids = torch.full((batch, seq_len), config.pad_token_id, dtype=torch.long)
    documents = torch.full((batch, seq_len), -1, dtype=torch.long)
    trained = torch.zeros((batch, seq_len), dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence.tokens)] = torch.tensor(sequence.tokens)
        documents[row, : len(sequence.document_ids)] = torch.tensor(sequence.document_ids)
        flags = sequence.trained or [True] * len(sequence.tokens)
        trained[row, : len(flags)] = torch.tensor(flags, dtype=torch.bool)
    images = [image for s in sequences for image in s.images]
    pixel_values, pixel_mask = pad_images(images)
    everything = all(all(s.trained) for s in sequences)  # pretraining: no answer mask at all
    batch = micro_batch(
        input_ids, documents, pixel_values, pixel_mask, config.image_token_id, None if everything else trained
    )
    batch["image_sizes"] = [tuple(image.shape[-2:]) for image in images]  # on the host, wherever the pixels are
    return batch
