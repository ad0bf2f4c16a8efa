"""Training-time augmentation of fine-tuning data, the paper's guards against over-fitting when it
repeats datasets for many epochs (arXiv 2405.02246, Section 4.2): random up-scaling of the images'
resolution, and shuffling of a conversation's user/assistant exchanges.

* Up-scaling: each image is, with probability ``upscale_probability``, taken at ``f`` times its
  size before the processor's resize rule, which still caps the longest edge: a small image reaches
  the vision tower at a higher resolution (more patches), a large one is unchanged. ``f`` is drawn
  as the paper's authors' training code draws it (HuggingFaceM4's m4, ``ConditionalResize``):
  triangular on [1.5, ``upscale_max``] with its mode at ``upscale_max``, each side truncated to an
  integer. The paper publishes neither number; m4's defaults are 0.7 and 3.0. With splitting each
  crop is scaled. The image is resized once, from its pixels to the size the rule gives.
* Turn shuffling: the exchanges (a user turn and the assistant turns that answer it) are put in a
  random order; system turns stay first, and the images that lead the first user turn (The
  Cauldron's layout: a sample's images open the conversation) stay at the start of whichever user
  turn comes first, as m4 does; images inside a later turn travel with their exchange. A
  conversation whose first user turn is nothing but those images is left in its order (moving them
  would leave an empty turn). A source whose turns must keep their order (m4 exempts one dataset)
  sets ``augment: {shuffle_turns: false}`` on its mixture entry.

Every draw is a pure function of the data seed, the source and the sample's index in the source's
global stream (epochs concatenated): a sample read in two epochs is augmented twice differently,
and a resumed run draws what the uninterrupted one drew. Only the training stream augments (and
``tools/show_samples.py``, which shows it); validation and benchmarks see the data as stored.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np

from megatron_vlm.data.shards import Sample

UPSCALE_MIN = 1.5  # the smallest up-scaling factor (m4's triangular distribution starts there)


@dataclass(frozen=True)
class Augmentation:
    upscale_probability: float = 0.0  # share of images taken at a larger size (m4: scale_up_frequency)
    upscale_max: float = 3.0  # the largest factor (m4: scale_up_max); factors lie in [1.5, upscale_max]
    shuffle_turns: bool = False  # a conversation's exchanges in a random order

    def __post_init__(self) -> None:
        if not 0.0 <= self.upscale_probability <= 1.0:
            raise ValueError(f"augment.upscale_probability={self.upscale_probability} is not in [0, 1]")
        if self.upscale_max <= UPSCALE_MIN:
            raise ValueError(
                f"augment.upscale_max={self.upscale_max}: factors are drawn on [{UPSCALE_MIN}, upscale_max], "
                f"so it must exceed {UPSCALE_MIN}"
            )
        if not isinstance(self.shuffle_turns, bool):
            raise ValueError(f"augment.shuffle_turns={self.shuffle_turns!r}: true or false")

    @property
    def active(self) -> bool:
        return self.shuffle_turns or self.upscale_probability > 0


def _generator(seed: int, source: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0xA76, zlib.crc32(source.encode()), index])


def exchanges(turns: list[tuple[str, int]]) -> tuple[int, list[list[int]]]:
    """A conversation's turns -> the number of leading system turns and its exchanges (turn
    indices: a user turn and the assistant turns that follow it; turns before the first user turn
    other than system ones form an exchange of their own)."""
    leading = 0
    while leading < len(turns) and turns[leading][0] == "system":
        leading += 1
    groups: list[list[int]] = []
    for index in range(leading, len(turns)):
        if turns[index][0] == "user" or not groups:
            groups.append([index])
        else:
            groups[-1].append(index)
    return leading, groups


def shuffled(sample: Sample, rng: np.random.Generator) -> Sample:
    """``sample`` with its exchanges in the order ``rng`` draws (see the module's rule); the sample
    itself when it has fewer than two exchanges or cannot be shuffled."""
    if sample.turns is None:
        return sample
    leading, groups = exchanges(sample.turns)
    if len(groups) < 2:
        return sample
    # Each turn's content as indices of the sample's segments (images keep their extensions).
    starts = np.cumsum([0, *(count for _, count in sample.turns)]).tolist()
    contents = [list(range(starts[i], starts[i + 1])) for i in range(len(sample.turns))]
    roles = [role for role, _ in sample.turns]
    is_image = [isinstance(part, bytes) for part in sample.segments]
    first_user = groups[0][0] if roles[groups[0][0]] == "user" else None
    lead: list[int] = []
    if first_user is not None:
        first = contents[first_user]
        lead = first[: next((n for n, i in enumerate(first) if not is_image[i]), len(first))]
        if len(lead) == len(contents[first_user]):
            return sample  # an image-only first turn: nothing to move the images to
        contents[first_user] = contents[first_user][len(lead) :]
    order = [*range(leading), *(index for g in rng.permutation(len(groups)) for index in groups[g])]
    new_first_user = next((index for index in order[leading:] if roles[index] == "user"), None)
    if lead and new_first_user is not None:
        contents[new_first_user] = lead + contents[new_first_user]
    kept = [i for index in order for i in contents[index]]
    extensions = sample.image_extensions  # one per image where the sample came from a shard, else none
    if extensions:
        extension = dict(zip((i for i, image in enumerate(is_image) if image), extensions, strict=True))
        extensions = [extension[i] for i in kept if is_image[i]]
    return replace(
        sample,
        segments=[sample.segments[i] for i in kept],
        turns=[(roles[index], len(contents[index])) for index in order],
        image_extensions=extensions,
    )


def augmented(
    augmentation: Augmentation, sample: Sample, seed: int, source: str, index: int
) -> tuple[Sample, list[float]]:
    """The training stream's ``index``-th sample of ``source`` as augmented: the sample (exchanges
    shuffled) and one resolution factor per image in its (new) order, 1.0 where not up-scaled."""
    rng = _generator(seed, source, index)
    if augmentation.shuffle_turns:
        sample = shuffled(sample, rng)
    count = sum(isinstance(part, bytes) for part in sample.segments)
    draws = rng.random(count)
    factors = rng.triangular(UPSCALE_MIN, augmentation.upscale_max, augmentation.upscale_max, count)
    return sample, [
        float(f) if d < augmentation.upscale_probability else 1.0 for d, f in zip(draws, factors, strict=True)
    ]
