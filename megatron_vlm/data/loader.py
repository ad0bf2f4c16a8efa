"""Distributed, resumable multimodal loader: shards -> documents -> packed micro-batches.

The data stream is defined globally, independent of the data-parallel size, so that a run can
resume at another (TP, PP, DP) layout with no sample repeated or skipped:

* The stream has ``lanes`` lanes, one per micro-batch of the global batch (global batch / micro
  batch size; the trainer's value). Lane ``l`` produces its ``k``-th micro-batch for step ``k``.
  A data-parallel rank owns a contiguous block of lanes (``lanes / dp`` of them: its micro-batches
  of each step); at another DP size the same lanes are dealt out differently, and every step's
  global batch is the same set of micro-batches.
* Each source is read in a seeded permutation per epoch, epochs concatenated into one global
  order; lane ``l`` takes positions ``l, l + lanes, l + 2 lanes, ...`` of it, so lanes read
  disjoint samples and together read every sample once per epoch.
* Each micro-batch comes from one source. By default (``weights_of: micro_batches``) it is drawn by
  the mixture weights with a counter-based generator (seed, lane, lane step): no generator state to
  save. With ``weights_of: loss_tokens`` the weights are shares of the tokens the loss counts (the
  answers, in fine-tuning: how the paper states its fine-tuning mixture, Table 14): each lane takes
  its next micro-batch from the source furthest below its share of the loss tokens the lane has
  handed out so far (largest weight first on a tie), so a source whose sequences hold few answer
  tokens is drawn more often; the lane's counts are part of its state.
* Unusable samples (corrupt images, broken tar members, missing fields, truncated shards) are
  skipped, counted by reason and logged with shard and key; training goes on.
* ``state_dict()`` holds, per owned lane, its step, and per source the number of samples it read
  and the documents read but not yet handed out (plain integers: JSON); ``load_state_dict()``
  takes a state holding at least the owned lanes (the trainer merges every rank's into one),
  re-reads the pending documents and continues with the same samples in the same order. Memory:
  each lane keeps per source at most one partly filled sequence of decoded images, so a rank holds
  at most (sources + 1) times one step's images.
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
import threading
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from megatron_vlm.data.augment import Augmentation, augmented
from megatron_vlm.data.chat import chat_template, encode_conversation
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
WEIGHTS_OF = ("micro_batches", "loss_tokens")


@dataclass(frozen=True)
class SourceConfig:
    name: str
    shards: str  # a directory of *.tar, a glob, or one tar
    weight: float = 1.0
    seq_len: int = 2048
    validation: str | None = None  # the held-out shard set (same forms as ``shards``); None: none
    augment: Augmentation | None = None  # this source's own augmentation (None: the mixture's)


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
    # The training stream's augmentation (fine-tuning: up-scaling, turn shuffling; ``augment.py``).
    augment: Augmentation = field(default_factory=Augmentation)
    # What a source's weight is a share of: micro-batches (packed sequences), or the tokens the loss
    # counts (the answers, in fine-tuning).
    weights_of: str = "micro_batches"

    def __post_init__(self) -> None:
        if self.weights_of not in WEIGHTS_OF:
            raise ValueError(f"weights_of={self.weights_of!r} is not one of {WEIGHTS_OF}")
        scaled = [self.augment_of(s.name).upscale_probability for s in self.sources] or [
            self.augment.upscale_probability
        ]
        if self.image.resize == "square" and any(scaled):
            raise ValueError(
                "augment.upscale_probability > 0 with image.resize: square: square images have one size, "
                "there is no resolution to scale up"
            )

    def augment_of(self, source: str) -> Augmentation:
        """The augmentation of ``source``'s training stream: its own, else the mixture's."""
        own = next(s.augment for s in self.sources if s.name == source)
        return self.augment if own is None else own

    @property
    def max_seq_len(self) -> int:
        return max(source.seq_len for source in self.sources)


def load_data_config(
    path: str | Path,
    data_root: str | Path,
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    **overrides: Any,
) -> DataConfig:
    """A mixture preset (YAML; shard paths relative to ``data_root``) -> DataConfig.
    ``normalization``: the vision encoder's pixel (mean, std), used where the mixture sets none (the
    normalization belongs to the encoder: SigLIP's 0.5 / 0.5, CLIP's own)."""
    path = Path(path)
    if not path.suffix:
        path = MIXTURES_DIR / f"{path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"data mixture {path} not found; presets: {sorted(p.stem for p in MIXTURES_DIR.glob('*.yaml'))}"
        )
    values = yaml.safe_load(path.read_text())
    root = Path(data_root)
    augment = _augmentation(values.pop("augment", {}), Augmentation(), f"{path}: augment")
    sources = tuple(
        SourceConfig(
            **{
                **source,
                "shards": str(root / source["shards"]),
                "validation": _validation_split(source, root / source["shards"], root),
                # A source's own augment options override the mixture's.
                "augment": _augmentation(source["augment"], augment, f"{path}: source {source.get('name')!r} augment")
                if "augment" in source
                else None,
            }
        )
        for source in values.pop("sources")
    )
    image_values = values.pop("image", {})
    if normalization is not None:
        image_values = {"mean": normalization[0], "std": normalization[1], **image_values}
    image = ImageConfig(**image_values)
    unknown = set(values) - set(DataConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{path}: unknown mixture field(s) {sorted(unknown)}")
    return DataConfig(sources=sources, image=image, augment=augment, **{**values, **overrides})


def _augmentation(values: dict[str, Any], base: Augmentation, where: str) -> Augmentation:
    """``base`` with the options of a mixture's (or a source's) ``augment:`` entry; unknown ones refused."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: give a mapping of options, not {values!r}")
    unknown = set(values) - set(Augmentation.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"{where} has no option {sorted(unknown)}; it takes {sorted(Augmentation.__dataclass_fields__)}"
        )
    return replace(base, **values)


class SourceStream(ShardSet):
    """One source's samples in the global order: a seeded permutation per epoch, epoch after epoch.
    Shared by the lanes of a rank (one index of the source's shards, a few epochs' orders cached)."""

    _CACHED_EPOCHS = 3  # lanes drift apart by a few samples: at most two epochs are in use at once

    def __init__(self, config: SourceConfig, seed: int) -> None:
        super().__init__(config.shards)
        self.config = config
        if not self.locations:
            raise ValueError(f"source {config.name} has no samples in {config.shards}")
        self.seed = [seed, zlib.crc32(config.name.encode())]
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= self._CACHED_EPOCHS:
                del self._orders[min(self._orders)]
            self._orders[epoch] = np.random.default_rng([*self.seed, epoch]).permutation(len(self.locations))
        return self._orders[epoch]

    def position(self, index: int) -> int:
        """The sample at ``index`` of the global order (epochs concatenated)."""
        epoch, offset = divmod(index, len(self.locations))
        return int(self.order(epoch)[offset])


@dataclass
class Lane:
    """One lane of the global stream: its micro-batch count, and per source the samples it read and
    its packer (documents read but not yet handed out)."""

    index: int
    step: int = 0
    read: dict[str, int] = field(default_factory=dict)
    packers: dict[str, Packer] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    # What its micro-batches handed out: images, and text tokens (every token but <image>
    # placeholders), the x-axes of the paper's comparisons (``consumed``).
    images: int = 0
    text_tokens: int = 0
    loss_tokens: dict[str, int] = field(default_factory=dict)  # per source (``weights_of: loss_tokens``)


class MultimodalLoader:
    """Micro-batches for one data-parallel rank (its lanes, in turn); an iterator with a resumable state.

    ``lanes``: the global stream's lane count, the same at every layout of a run (the trainer passes
    global batch / micro batch size); by default one lane per data-parallel rank."""

    def __init__(
        self,
        config: DataConfig,
        tokenizer: Any,
        image_seq_len: int,
        image_token_id: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        lanes: int | None = None,
        family: str = "idefics2",
    ) -> None:
        if not config.sources:
            raise ValueError("the data config names no source")
        lanes = dp_size if lanes is None else lanes
        if lanes < 1 or lanes % dp_size or not 0 <= dp_rank < dp_size:
            raise ValueError(f"{lanes} lanes cannot be shared by {dp_size} data-parallel ranks (rank {dp_rank})")
        self.config = config
        self.tokenizer = tokenizer
        self.image_seq_len = image_seq_len
        self.family = family  # the model's: its chat template renders conversation samples
        self.images = image_processor(config.image, config.image_backend)
        # The training stream may be read in a prefetch thread while the evaluator encodes validation
        # documents in the training thread: the tokenizer and the image processor (DALI pipelines
        # included) are not safe to call from two threads at once, so documents are encoded one at a time.
        self._encoding = threading.RLock()
        self.decoded_images = 0  # images decoded by this loader: what per-rank loading saves (tests count it)
        self.streams = {s.name: SourceStream(s, config.seed) for s in config.sources}
        # Each source's augmentation, resolved once (encode reads it for every document).
        self.augmentations = {s.name: config.augment_of(s.name) for s in config.sources}
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
            )
            for s in config.sources
        }
        weights = np.array([s.weight for s in config.sources], dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {weights.tolist()}")
        self.weights = weights / weights.sum()
        self.num_lanes = lanes
        per_rank = lanes // dp_size
        self.lanes = [self._new_lane(index) for index in range(dp_rank * per_rank, (dp_rank + 1) * per_rank)]

    def _new_lane(self, index: int) -> Lane:
        return Lane(
            index,
            read={name: 0 for name in self.streams},
            loss_tokens={name: 0 for name in self.streams},
            packers={name: Packer(packing) for name, packing in self.packing.items()},
        )

    @property
    def skipped(self) -> Counter:
        """Samples skipped by this rank's lanes, by reason."""
        return sum((lane.skipped for lane in self.lanes), Counter())

    def epochs_completed(self, source: str) -> int:
        """Epochs of ``source`` this rank's lanes have all read their share of."""
        size = len(self.streams[source].locations)
        return min((lane.index + lane.read[source] * self.num_lanes) // size for lane in self.lanes)

    # -- documents ---------------------------------------------------------------------------

    def encode(self, sample: Sample, source: str, position: int, index: int | None = None) -> Document:
        """Sample -> tokens ([BOS] text with image placeholders [EOS]) and processed images
        (float32 [3, h, w] tensors on the decoding device). ``index``: the sample's index in the
        training stream of ``source``, which draws its augmentation (None: as stored, never augmented)."""
        scales = None
        augmentation = self.augmentations[source]
        if index is not None and augmentation.active:
            sample, scales = augmented(augmentation, sample, self.config.seed, source, index)
        with self._encoding:
            self.decoded_images += len(sample.images)
            try:
                images = [crop for crops in self.images(sample.images, scales) for crop in crops]
            except CorruptSample as error:
                raise CorruptSample(error.reason, f"{sample.key}: {error}") from error
            # text() checks the placeholder runs against the sample's images (images_per_image each, as
            # many crops as every image processor returns).
            tokens, trained, cuts = self.text(sample, source)
        return Document(tokens, images, source, position, trained, cuts, index=-1 if index is None else index)

    def text(self, sample: Sample, source: str) -> tuple[list[int], list[bool] | None, list[int] | None]:
        """A sample's tokens without decoding its images (each image stands for a fixed number of
        placeholder runs), which are trained on (None: all) and where it may be cut (None: outside
        images anywhere): what packing needs to know of a document. A document is [BOS] its text with
        image placeholders [EOS]; a conversation is rendered with the model family's chat template,
        tokenized as its processor does, its answers trained on."""
        trained = cuts = None
        if sample.kind == "conversation":
            template = chat_template(self.family)  # a family without one cannot train on conversations: refused
            with self._encoding:
                encoded = encode_conversation(
                    self.tokenizer, template, sample.conversation(), self.image_seq_len, self.config.image.split
                )
            tokens, trained, cuts = encoded.tokens, encoded.trained, encoded.exchange_ends
        else:
            pieces = []
            for segment in sample.segments:
                if isinstance(segment, bytes):
                    pieces.append(IMAGE_TOKEN)
                else:
                    if pieces and pieces[-1] != IMAGE_TOKEN:
                        pieces.append("\n\n")
                    pieces.append(segment)
            text = expand_image_placeholders("".join(pieces), self.image_seq_len, self.config.image.split)
            with self._encoding:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            tokens = [self.tokenizer.bos_token_id, *ids, self.tokenizer.eos_token_id]
        expected = len(sample.images) * self.config.image.images_per_image
        if len(image_runs(tokens, self.packing[source].image_token_id)) != expected:
            raise CorruptSample("missing_field", f"{sample.key}: the text itself contains image tokens")
        return tokens, trained, cuts

    def tokens(self, sample: Sample, source: str) -> list[int]:
        """A sample's tokens (``text``'s first part)."""
        return self.text(sample, source)[0]

    def next_index(self, lane: Lane, source: str) -> int:
        """The index in the global order of ``source`` (epochs concatenated) of the next sample of
        ``lane``'s share."""
        index = lane.index + lane.read[source] * self.num_lanes
        lane.read[source] += 1
        return index

    def _next_document(self, lane: Lane, source: str) -> Document:
        stream = self.streams[source]
        while True:
            index = self.next_index(lane, source)
            position = stream.position(index)
            try:
                return self.encode(stream.read(position), source, position, index)
            except CorruptSample as skip:
                lane.skipped[skip.reason] += 1
                logger.warning("skipped sample %s of %s: %s", stream.where(position), source, skip)

    # -- micro-batches -----------------------------------------------------------------------

    def source_of(self, step: int, lane: int = 0) -> str:
        """The source of ``lane``'s micro-batch ``step``: a pure function of (seed, lane, step)."""
        draw = np.random.default_rng([self.config.seed, 0x5EED, lane, step]).random()
        index = int(np.searchsorted(np.cumsum(self.weights), draw, side="right"))
        return self.config.sources[min(index, len(self.config.sources) - 1)].name

    def __iter__(self) -> MultimodalLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        lane = min(self.lanes, key=lambda lane: (lane.step, lane.index))  # the lanes take turns
        source = (
            self.source_of(lane.step, lane.index) if self.config.weights_of == "micro_batches" else self._behind(lane)
        )
        packer = lane.packers[source]
        while len(packer.ready) < self.config.micro_batch_size:
            document = self._next_document(lane, source)
            dropped = packer.dropped
            packer.add(document)
            if packer.dropped > dropped:  # not even its first exchange (or first text) fits a sequence
                lane.skipped["no_room"] += 1
                logger.warning(
                    "skipped sample %s of %s: %d tokens, nothing of it fits a %d-token sequence",
                    self.streams[source].where(document.position),
                    source,
                    len(document.tokens),
                    self.packing[source].seq_len,
                )
        sequences = [packer.pop() for _ in range(self.config.micro_batch_size)]
        batch = collate(sequences, self.packing[source], seq_len=self.config.max_seq_len)
        lane.step += 1
        batch["source"] = source
        batch["lane"] = lane.index
        batch["positions"] = [position for s in sequences for position in s.positions]
        batch["num_images"] = sum(len(s.images) for s in sequences)
        batch["num_tokens"] = sum(len(s.tokens) for s in sequences)
        image_token = self.packing[source].image_token_id
        batch["num_text_tokens"] = sum(sum(token != image_token for token in s.tokens) for s in sequences)
        lane.images += batch["num_images"]
        lane.text_tokens += batch["num_text_tokens"]
        # At least one per micro-batch: a source whose sequences train on nothing is not drawn forever.
        lane.loss_tokens[source] += max(1, int(batch["loss_mask"].sum()))
        return batch

    def _behind(self, lane: Lane) -> str:
        """``weights_of: loss_tokens``: the source furthest below its share of the lane's loss tokens."""
        total = sum(lane.loss_tokens.values())
        chosen = max(
            (index for index, weight in enumerate(self.weights) if weight > 0),
            key=lambda i: (
                self.weights[i] * total - lane.loss_tokens[self.config.sources[i].name],
                self.weights[i],
                -i,
            ),
        )
        return self.config.sources[chosen].name

    # -- exact resume ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's lanes (plain integers and strings: JSON). Merge the ranks' with :func:`merge_states`."""
        return {
            "lanes": self.num_lanes,
            "seed": self.config.seed,
            "lane_states": {
                str(lane.index): {
                    "step": lane.step,
                    "skipped": dict(lane.skipped),
                    "images": lane.images,
                    "text_tokens": lane.text_tokens,
                    "loss_tokens": dict(lane.loss_tokens),
                    "sources": {
                        # Pending documents by sample position and by index in the stream (the
                        # epoch included: it draws their augmentation; -1 where not known).
                        name: {
                            "read": lane.read[name],
                            "pending": [d.position for d in packer.pending()],
                            "pending_indices": [d.index for d in packer.pending()],
                        }
                        for name, packer in lane.packers.items()
                    },
                }
                for lane in self.lanes
            },
        }

    def own_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """This rank's lanes of a whole-stream ``state`` (:func:`merge_states`), checked but not
        loaded (nothing is read or decoded): the state of a rank that receives its micro-batches
        from another one (the trainer's per-rank loading) until its first step."""
        self._check_state(state)
        return {
            "lanes": state["lanes"],
            "seed": state["seed"],
            "lane_states": {str(lane.index): state["lane_states"][str(lane.index)] for lane in self.lanes},
        }

    def _check_state(self, state: dict[str, Any]) -> None:
        if "lane_states" not in state:
            raise ValueError(
                "the loader state predates the global data stream (one stream per data-parallel rank): "
                "it cannot be continued exactly; start the run afresh or from weights (training.load_weights)"
            )
        if state["lanes"] != self.num_lanes or state["seed"] != self.config.seed:
            raise ValueError(
                f"the checkpoint's data stream has {state['lanes']} lanes and seed {state['seed']}, this run "
                f"{self.num_lanes} and {self.config.seed}: keep global_batch_size / micro_batch_size and the data "
                "seed when resuming (the data parallel size may change)"
            )
        for lane in self.lanes:
            saved = state["lane_states"].get(str(lane.index))
            if saved is None:
                raise ValueError(f"the loader state has no entry for lane {lane.index}")
            missing = set(self.streams) - set(saved["sources"])
            if missing:
                raise ValueError(f"loader state has no entry for sources {sorted(missing)}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: it must be of this stream (lanes, seed, sources) and hold this rank's lanes."""
        self._check_state(state)
        lanes = []
        for lane in self.lanes:
            saved = state["lane_states"][str(lane.index)]
            restored = self._new_lane(lane.index)
            restored.step = saved["step"]
            restored.skipped = Counter(saved["skipped"])
            restored.images = saved.get("images", 0)  # states written before the counts: from 0
            restored.text_tokens = saved.get("text_tokens", 0)
            restored.loss_tokens.update({k: v for k, v in saved.get("loss_tokens", {}).items() if k in self.streams})
            for name, packer in restored.packers.items():
                source_state = saved["sources"][name]
                restored.read[name] = source_state["read"]
                stream = self.streams[name]
                # Documents read but not yet handed out; states written before augmentation hold
                # positions only (their documents are re-read as stored).
                positions = source_state["pending"]
                indices = source_state.get("pending_indices", [-1] * len(positions))
                if self.augmentations[name].active and -1 in indices:
                    raise ValueError(
                        f"the loader state predates data augmentation (pending samples of {name} without a "
                        "stream index to draw their augmentation from): resume without 'augment', or start afresh"
                    )
                for position, index in zip(positions, indices, strict=True):
                    index = None if index < 0 else index
                    packer.add(self.encode(stream.read(position), name, position, index))
            lanes.append(restored)
        self.lanes = lanes


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Every rank's loader state -> one state of the whole stream (ranks of one data-parallel rank
    hold the same lanes: they must agree)."""
    merged = {"lanes": states[0]["lanes"], "seed": states[0]["seed"], "lane_states": {}}
    for state in states:
        for index, lane in state["lane_states"].items():
            if merged["lane_states"].setdefault(index, lane) != lane:
                raise RuntimeError(f"ranks disagree on the state of data lane {index}: their loaders diverged")
    return merged


def consumed(state: dict[str, Any]) -> dict[str, int]:
    """Images and text tokens handed out by the lanes of a loader state (a rank's, or the whole
    stream's): what the run has trained on, kept across resumes at any layout."""
    lanes = state["lane_states"].values()
    return {
        "images": sum(lane.get("images", 0) for lane in lanes),
        "text_tokens": sum(lane.get("text_tokens", 0) for lane in lanes),
    }


def token_statistics(batch: dict[str, Any]) -> dict[str, float]:
    """Share of the micro-batch's token slots that hold real tokens (1 - padding waste)."""
    slots = batch["input_ids"].numel()
    return {"real_tokens": float(batch["num_tokens"]), "slots": float(slots), "fill": batch["num_tokens"] / slots}
