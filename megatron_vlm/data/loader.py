"""Distributed, resumable multimodal loader: shards -> documents -> packed micro-batches.

* Each source (OBELICS-style documents, pairs, pages) is read in a seeded permutation per epoch;
  data-parallel rank r takes every dp-th sample, so ranks see disjoint samples.
* Each micro-batch comes from one source, drawn by the mixture weights with a counter-based
  generator (seed, micro-batch index): no generator state to save.
* Unusable samples (corrupt images, broken tar members, missing fields, truncated shards) are
  skipped, counted by reason and logged with shard and key; training goes on.
* ``state_dict()`` holds, per source, the epoch, the cursor and the documents read but not yet
  handed out; ``load_state_dict()`` re-reads those and continues with the same samples in the
  same order.
* A source may hold out a validation split (``validation`` in the mixture, relative to the data
  root; by default ``<shards>/validation`` when that directory exists, which is where
  ``tools/preprocess_data.py --validation-fraction`` puts it): a separate shard set, never read
  for training (``data/validation.py`` turns it into fixed evaluation micro-batches).
* Images are torch tensors where they were decoded: with the 'dali-gpu' backend on this rank's
  own GPU (``dali.decoding_device_id``), so ``pixel_values`` reach the model without a host round
  trip; otherwise on the CPU. The state holds stream positions only, never image data.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from megatron_vlm.data.dali import image_processor
from megatron_vlm.data.images import ImageConfig
from megatron_vlm.data.packing import Document, Packer, PackingConfig, collate, image_runs
from megatron_vlm.data.shards import CorruptSample, Sample, ShardSet, shard_paths
from megatron_vlm.data.tokens import IMAGE_TOKEN, expand_image_placeholders

logger = logging.getLogger(__name__)
MIXTURES_DIR = Path(__file__).resolve().parents[2] / "examples" / "data_mixtures"
# Where a source's held-out split lives by default, inside its shard directory: preprocessing with
# a validation fraction writes it there (shard_paths reads a directory's own *.tar only, so the
# training stream never sees these shards).
VALIDATION_DIR = "validation"


@dataclass(frozen=True)
class SourceConfig:
    name: str
    shards: str  # a directory of *.tar, a glob, or one tar
    weight: float = 1.0
    seq_len: int = 2048
    validation: str | None = None  # the held-out shard set (same forms as ``shards``); None: none


def _validation_split(source: dict[str, Any], shards: Path, data_root: Path) -> str | None:
    """A mixture entry's validation split: ``validation: PATH`` (relative to the data root; it must
    exist), ``validation: false`` (none), or by default ``<shards>/validation`` when it holds shards
    (a fraction too small to hold out any sample of a small source leaves it empty)."""
    given = source.get("validation")
    if given is False:
        return None
    if given is None:
        default = shards / VALIDATION_DIR
        return str(default) if default.is_dir() and any(default.glob("*.tar")) else None
    path = data_root / str(given)
    if not path.exists() and not any(ch in str(path) for ch in "*?["):
        raise FileNotFoundError(
            f"source {source.get('name')!r}: its validation split {path} does not exist "
            f"(build one with tools/preprocess_data.py --validation-fraction, or remove 'validation:')"
        )
    return str(path)


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[SourceConfig, ...] = ()
    image: ImageConfig = field(default_factory=ImageConfig)
    micro_batch_size: int = 1
    max_images_per_sequence: int = 32
    pack: bool = True
    seed: int = 1234
    image_backend: str = "auto"  # pillow | dali-cpu | dali-gpu | auto (DALI on GPU when present)

    @property
    def max_seq_len(self) -> int:
        return max(source.seq_len for source in self.sources)


def load_data_config(path: str | Path, data_root: str | Path, **overrides: Any) -> DataConfig:
    """A mixture preset (YAML; shard paths relative to ``data_root``) -> DataConfig."""
    path = Path(path)
    if not path.suffix:
        path = MIXTURES_DIR / f"{path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"data mixture {path} not found; presets: {sorted(p.stem for p in MIXTURES_DIR.glob('*.yaml'))}"
        )
    values = yaml.safe_load(path.read_text())
    root = Path(data_root)
    sources = tuple(
        SourceConfig(
            **{
                **source,
                "shards": str(root / source["shards"]),
                "validation": _validation_split(source, root / source["shards"], root),
            }
        )
        for source in values.pop("sources")
    )
    image = ImageConfig(**values.pop("image", {}))
    return DataConfig(sources=sources, image=image, **{**values, **overrides})


class SourceStream(ShardSet):
    """One source's samples, for one data-parallel rank, epoch after epoch."""

    def __init__(self, config: SourceConfig, dp_rank: int, dp_size: int, seed: int) -> None:
        super().__init__(config.shards)
        self.config = config
        if len(self.locations) < dp_size:
            raise ValueError(
                f"source {config.name} has {len(self.locations)} samples for {dp_size} data-parallel ranks"
            )
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = [seed, zlib.crc32(config.name.encode())]
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        permutation = np.random.default_rng([*self.seed, self.epoch]).permutation(len(self.locations))
        return permutation[self.dp_rank :: self.dp_size]

    def next_position(self) -> int:
        if self.cursor == len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order()
        position = int(self._order[self.cursor])
        self.cursor += 1
        return position

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._epoch_order()


class MultimodalLoader:
    """Micro-batches for one data-parallel rank; an iterator with a resumable state."""

    def __init__(
        self,
        config: DataConfig,
        tokenizer: Any,
        image_seq_len: int,
        image_token_id: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        sliding_window: int | None = None,  # the decoder's (TextConfig.sliding_window), for the masks
    ) -> None:
        if not config.sources:
            raise ValueError("the data config names no source")
        self.config = config
        self.tokenizer = tokenizer
        self.image_seq_len = image_seq_len
        self.images = image_processor(config.image, config.image_backend)
        self.streams = {s.name: SourceStream(s, dp_rank, dp_size, config.seed) for s in config.sources}
        for source in config.sources:  # a held-out sample is never trained on
            if source.validation is None:
                continue
            training = {shard.path.resolve() for shard in self.streams[source.name].shards}
            both = sorted(training & {path.resolve() for path in shard_paths(source.validation)})
            if both:
                raise ValueError(
                    f"source {source.name}: {both[0]} is both a training and a validation shard "
                    f"(shards: {source.shards}, validation: {source.validation}); point them at separate shard sets"
                )
        self.packing = {
            s.name: PackingConfig(
                seq_len=s.seq_len,
                image_token_id=image_token_id,
                image_seq_len=image_seq_len,
                max_images_per_sequence=config.max_images_per_sequence,
                pad_token_id=tokenizer.pad_token_id or 0,
                pack=config.pack,
                sliding_window=sliding_window,
            )
            for s in config.sources
        }
        self.packers = {name: Packer(packing) for name, packing in self.packing.items()}
        weights = np.array([s.weight for s in config.sources], dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {weights.tolist()}")
        self.weights = weights / weights.sum()
        self.step = 0
        self.skipped: Counter = Counter()

    # -- documents ---------------------------------------------------------------------------

    def encode(self, sample: Sample, source: str, position: int) -> Document:
        """Sample -> tokens ([BOS] text with image placeholders [EOS]) and processed images
        (float32 [3, h, w] tensors on the decoding device)."""
        try:
            images = [crop for crops in self.images(sample.images) for crop in crops]
        except CorruptSample as error:
            raise CorruptSample(error.reason, f"{sample.key}: {error}") from error
        tokens = self.tokens(sample, source)
        image_token_id = self.packing[source].image_token_id
        if len(image_runs(tokens, image_token_id)) != len(images):
            raise CorruptSample("missing_field", f"{sample.key}: the text itself contains image tokens")
        return Document(tokens, images, source, position)

    def tokens(self, sample: Sample, source: str) -> list[int]:
        """A sample's tokens without decoding its images (each image stands for a fixed number of
        placeholder runs): what packing needs to know of a document."""
        pieces = []
        for segment in sample.segments:
            if isinstance(segment, bytes):
                pieces.append(IMAGE_TOKEN)
            else:
                if pieces and pieces[-1] != IMAGE_TOKEN:
                    pieces.append("\n\n")
                pieces.append(segment)
        text = expand_image_placeholders("".join(pieces), self.image_seq_len, self.config.image.split)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens = [self.tokenizer.bos_token_id, *ids, self.tokenizer.eos_token_id]
        expected = len(sample.images) * self.config.image.images_per_image
        if len(image_runs(tokens, self.packing[source].image_token_id)) != expected:
            raise CorruptSample("missing_field", f"{sample.key}: the text itself contains image tokens")
        return tokens

    def _next_document(self, source: str) -> Document:
        stream = self.streams[source]
        while True:
            position = stream.next_position()
            try:
                return self.encode(stream.read(position), source, position)
            except CorruptSample as skip:
                self.skipped[skip.reason] += 1
                logger.warning("skipped sample %s of %s: %s", stream.where(position), source, skip)

    # -- micro-batches -----------------------------------------------------------------------

    def source_of(self, step: int) -> str:
        """The source of micro-batch ``step``: a pure function of (seed, step)."""
        draw = np.random.default_rng([self.config.seed, 0x5EED, step]).random()
        index = int(np.searchsorted(np.cumsum(self.weights), draw, side="right"))
        return self.config.sources[min(index, len(self.config.sources) - 1)].name

    def __iter__(self) -> MultimodalLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        source = self.source_of(self.step)
        packer = self.packers[source]
        while len(packer.ready) < self.config.micro_batch_size:
            packer.add(self._next_document(source))
        sequences = [packer.pop() for _ in range(self.config.micro_batch_size)]
        batch = collate(sequences, self.packing[source], seq_len=self.config.max_seq_len)
        self.step += 1
        batch["source"] = source
        batch["num_images"] = sum(len(s.images) for s in sequences)
        batch["num_tokens"] = sum(len(s.tokens) for s in sequences)
        return batch

    # -- exact resume ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "skipped": dict(self.skipped),
            "sources": {
                name: {**stream.state_dict(), "pending": [d.position for d in self.packers[name].pending()]}
                for name, stream in self.streams.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.streams) - set(state["sources"])
        if missing:
            raise ValueError(f"loader state has no entry for sources {sorted(missing)}")
        self.step = state["step"]
        self.skipped = Counter(state["skipped"])
        for name, stream in self.streams.items():
            source_state = state["sources"][name]
            stream.load_state_dict(source_state)
            self.packers[name] = Packer(self.packing[name])
            for position in source_state["pending"]:  # documents read but not yet handed out
                self.packers[name].add(self.encode(stream.read(position), name, position))


def token_statistics(batch: dict[str, Any]) -> dict[str, float]:
    """Share of the micro-batch's token slots that hold real tokens (1 - padding waste)."""
    slots = batch["input_ids"].numel()
    return {"real_tokens": float(batch["num_tokens"]), "slots": float(slots), "fill": batch["num_tokens"] / slots}
