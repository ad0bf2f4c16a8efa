"""Fixed validation micro-batches: the same held-out samples, packed the same way, at every
evaluation, across restarts and whatever the parallel layout.

* Each source with a validation split (``SourceConfig.validation``, see ``loader.py``)
  contributes ``samples`` documents, chosen by position alone: evenly spaced over the split in its
  storage order (sorted shards, index order). No seed is involved, so runs with different training
  seeds, or resumed runs, are evaluated on the same documents.
* The documents are packed once, from their tokens only (images are not decoded for this: each
  image stands for a fixed number of placeholder runs), with the source's packing rules, into
  sequences of ``micro_batch_size`` rows: a plan of document positions per row. The plan does not
  depend on the data-parallel size; ``plans[rank::size]`` gives each rank its share.
* ``micro_batch(plan)`` reads and encodes the documents of one planned micro-batch, repacks each
  row with a fresh packer (packing is deterministic and a row's documents fill one sequence) and
  collates it into the training micro-batch format, padded to the mixture's longest sequence.
  Rows the plan leaves empty are padding without loss tokens, so the token-weighted loss of a
  source does not depend on how its rows are grouped.
* Unusable samples are skipped and counted by reason (``skipped``), as in training; a sample whose
  image fails to decode only at evaluation time leaves its row shorter, the same way every time.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from megatron_vlm.data.loader import MultimodalLoader
from megatron_vlm.data.packing import Document, PackedSequence, Packer, collate
from megatron_vlm.data.shards import CorruptSample, ShardSet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPlan:
    """One validation micro-batch: its source and, per row, the split positions of its documents
    (fewer rows than the micro-batch size are padded with empty rows; no source: all padding)."""

    source: str | None
    rows: tuple[tuple[int, ...], ...]


def evenly_spaced(count: int, total: int) -> list[int]:
    """``count`` positions spread over ``range(total)`` (all of them when ``count >= total``)."""
    if count >= total:
        return list(range(total))
    return sorted({int(round(i * (total - 1) / max(count - 1, 1))) for i in range(count)})


class _RowPacker(Packer):
    """The packer, finishing the sequence it is filling when its documents are all in."""

    def finish(self) -> list[PackedSequence]:
        if self._current.tokens:
            self._flush()
        return [sequence for sequence, _ in self.ready]


class ValidationSplit(ShardSet):
    """Random access to one source's held-out shard set."""

    def __init__(self, source: str, pattern: str) -> None:
        super().__init__(pattern)
        self.source, self.pattern = source, pattern


class ValidationSet:
    """The fixed validation micro-batches of a mixture; ``loader`` encodes documents (tokenizer,
    image processor, packing rules) exactly as training does."""

    def __init__(self, loader: MultimodalLoader, samples: int) -> None:
        if samples < 1:
            raise ValueError(f"validation samples per source must be at least 1, got {samples}")
        self.loader = loader
        self.micro_batch_size = loader.config.micro_batch_size
        self.splits = {
            s.name: ValidationSplit(s.name, s.validation) for s in loader.config.sources if s.validation is not None
        }
        self.without_split = [s.name for s in loader.config.sources if s.validation is None]
        self.skipped: Counter = Counter()
        self.chosen: dict[str, int] = {}  # documents planned per source
        self.plans: list[BatchPlan] = []
        for name, split in self.splits.items():
            if not len(split):
                raise ValueError(f"source {name}: its validation split {split.pattern} holds no samples")
            rows = self._plan_rows(name, split, evenly_spaced(samples, len(split)))
            for start in range(0, len(rows), self.micro_batch_size):
                self.plans.append(BatchPlan(name, tuple(rows[start : start + self.micro_batch_size])))

    @property
    def sources(self) -> list[str]:
        return list(self.splits)

    def _skip(self, split: ValidationSplit, position: int, error: CorruptSample) -> None:
        self.skipped[error.reason] += 1
        logger.warning("skipped validation sample %s of %s: %s", split.where(position), split.source, error)

    def _plan_rows(self, name: str, split: ValidationSplit, positions: list[int]) -> list[tuple[int, ...]]:
        """Pack the documents from their tokens (placeholder tensors stand for the images)."""
        packer = _RowPacker(self.loader.packing[name])
        placeholder = torch.empty(0)
        planned = 0
        for position in positions:
            try:
                sample = split.read(position)
                tokens, trained, cuts = self.loader.text(sample, name)
            except CorruptSample as error:
                self._skip(split, position, error)
                continue
            images = [placeholder] * (len(sample.images) * self.loader.config.image.images_per_image)
            packer.add(Document(tokens, images, name, position, trained, cuts))
            planned += 1
        self.chosen[name] = planned - packer.dropped
        if packer.dropped:
            self.skipped["no_room"] += packer.dropped
            logger.warning("%d validation document(s) of %s do not fit a sequence at all", packer.dropped, name)
        return [tuple(sequence.positions) for sequence in packer.finish()]

    def plans_for(self, dp_rank: int, dp_size: int, multiple: int = 1) -> list[BatchPlan]:
        """This data-parallel rank's share, padded with empty micro-batches to a multiple of
        ``multiple`` (the interleaved pipeline schedule runs whole groups of PP micro-batches).
        Empty when the rank has no share (more data-parallel ranks than micro-batches): a forward-only
        pass has no data-parallel collective to take part in."""
        mine = self.plans[dp_rank::dp_size]
        return mine + [BatchPlan(None, ())] * (-len(mine) % multiple)

    def _row(self, name: str, positions: tuple[int, ...]) -> PackedSequence:
        split = self.splits[name]
        packer = _RowPacker(self.loader.packing[name])
        for position in positions:
            try:
                packer.add(self.loader.encode(split.read(position), name, position))
            except CorruptSample as error:
                self._skip(split, position, error)
        # The plan's documents filled one sequence; fewer of them (a sample skipped) still do.
        sequences = packer.finish()
        if len(sequences) > 1:
            raise RuntimeError(f"validation row {positions} of {name} no longer packs into one sequence")
        return sequences[0] if sequences else PackedSequence([], [], [], [])

    def micro_batch(self, plan: BatchPlan) -> dict[str, Any]:
        """The micro-batch of a plan, in the loader's format (``source``, ``num_tokens`` and
        ``num_images`` included)."""
        name = plan.source or self.loader.config.sources[0].name
        rows = [self._row(name, positions) for positions in plan.rows] if plan.source else []
        rows += [PackedSequence([], [], [], []) for _ in range(self.micro_batch_size - len(rows))]
        batch = collate(rows, self.loader.packing[name], seq_len=self.loader.config.max_seq_len)
        batch["source"] = plan.source
        batch["num_images"] = sum(len(s.images) for s in rows)
        batch["num_tokens"] = sum(len(s.tokens) for s in rows)
        return batch

    def describe(self) -> str:
        parts = []
        for name, split in self.splits.items():
            batches = sum(p.source == name for p in self.plans)
            parts.append(
                f"{name} ({self.chosen[name]} of {len(split)} samples, {batches} micro-batch{'' if batches == 1 else 'es'})"
            )
        text = ", ".join(parts) if parts else "no source has a validation split"
        if self.splits and self.without_split:
            text += f"; without a validation split: {', '.join(self.without_split)}"
        return text
