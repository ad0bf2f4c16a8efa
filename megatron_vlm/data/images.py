"""Image semantics of Idefics2 (the reference the DALI and Pillow paths implement).

Same rules as transformers' ``Idefics2ImageProcessor``: optionally split into 4 crops + the full
image (split first, on the original), resize keeping the aspect ratio (longest edge capped, then
both edges raised to the shortest-edge floor), rescale by 1/255, normalize with mean = std = 0.5,
and pad every image of a batch to the largest height and width with a pixel mask.
Stage limits: 384 px longest edge in the paper's stage 1, 980 px in stage 2.
``resize: square`` instead resizes every image (each crop, with splitting) to longest_edge x
longest_edge, aspect ratio not kept: the paper's square baseline, and what encoders at a fixed
square resolution (CLIP) take; transformers' Idefics2ImageProcessor with ``size={"height", "width"}``.

Pixels come from ``to_rgb``, transformers' ``convert_to_rgb``: transparency (an alpha band, or a
palette / colour-key ``transparency``) is composited onto white, everything else goes through
Pillow's ``convert("RGB")``. Decoders other than Pillow (DALI) ignore transparency, scale 16-bit
samples instead of clipping them, and cannot read GIF at all, so ``canonical_encoding`` rewrites
such images once, at preprocessing time, as the 8-bit PNG of exactly those pixels: lossless, so
Pillow's result is unchanged, and a PNG that every backend decodes to the same pixels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

RESIZE_MODES = ("longest_edge", "square")


@dataclass(frozen=True)
class ImageConfig:
    longest_edge: int = 980
    shortest_edge: int = 378
    split: bool = False  # 4 crops + the full image: 5 images (and 5 placeholder groups) per image
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # longest_edge: aspect ratio kept (longest edge capped, shortest-edge floor); square: every
    # image (every crop) resized to longest_edge x longest_edge.
    resize: str = "longest_edge"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"image.resize={self.resize!r} is not one of {RESIZE_MODES}")

    @property
    def images_per_image(self) -> int:
        return 5 if self.split else 1


# Sizes an image must have to be used at all: checked offline (preprocess) and again when a
# shard's image is decoded (dali.py), where a shard may come from elsewhere.
@dataclass(frozen=True)
class ImageLimits:
    min_side: int = 14  # below one patch an image carries nothing
    max_side: int = 16384
    max_aspect_ratio: float = 50.0
    max_pixels: int = 89_478_485  # Pillow's decompression-bomb threshold


def size_problem(width: int, height: int, limits: ImageLimits) -> str | None:
    """Why an image of this size is unusable, or None."""
    if min(width, height) < limits.min_side or max(width, height) > limits.max_side:
        return f"{width}x{height} outside [{limits.min_side}, {limits.max_side}]"
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        return f"aspect ratio {max(width, height) / min(width, height):.0f}"
    if width * height > limits.max_pixels:
        return f"{width * height} pixels"
    return None


def resized_size(height: int, width: int, config: ImageConfig, scale: float = 1.0) -> tuple[int, int]:
    """Output (height, width): the longest edge capped, then each edge at least the floor; or,
    with ``resize: square``, longest_edge x longest_edge. ``scale``: the rule applied to the
    image as if it were ``scale`` times its size (training's random up-scaling, ``augment.py``)."""
    if config.resize == "square":
        return config.longest_edge, config.longest_edge
    if scale != 1.0:  # truncated, as m4's ConditionalResize scales
        height, width = max(1, int(height * scale)), max(1, int(width * scale))
    aspect_ratio = width / height
    if width >= height and width > config.longest_edge:
        width = config.longest_edge
        height = int(width / aspect_ratio)
    elif height > width and height > config.longest_edge:
        height = config.longest_edge
        width = int(height * aspect_ratio)
    return max(height, config.shortest_edge), max(width, config.shortest_edge)


def split_crops(pixels: np.ndarray) -> list[np.ndarray]:
    """[H, W, C] -> the 4 quadrants (row-major) and the full image."""
    height, width = pixels.shape[:2]
    mid_h, mid_w = height // 2, width // 2
    return [pixels[:mid_h, :mid_w], pixels[:mid_h, mid_w:], pixels[mid_h:, :mid_w], pixels[mid_h:, mid_w:], pixels]


def normalize(pixels: np.ndarray, config: ImageConfig) -> np.ndarray:
    """uint8 [H, W, C] -> float32 [C, H, W], rescaled and normalized (float64 rescale, as HF)."""
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    return np.ascontiguousarray(((scaled - mean) / std).transpose(2, 0, 1))


def has_transparency(image: Image.Image) -> bool:
    """transformers' test: an alpha band, or a ``transparency`` entry (palette or colour key)."""
    return "A" in image.getbands() or image.info.get("transparency") is not None


def to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] pixels as transformers' ``convert_to_rgb`` makes them: transparency
    composited onto white (Pillow's integer ``alpha_composite``), else Pillow's RGB conversion
    (which clips 16-bit grey above 255 and converts CMYK without colour management, as transformers
    does)."""
    if has_transparency(image):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, image.convert("RGBA")).convert("RGB"))
    return np.asarray(image.convert("RGB"))


# --- one stored encoding that every backend decodes to the same pixels ---------------------------

# (format, modes) stored as they are: DALI's decoders give Pillow's pixels for these (JPEG within
# the resize bound of tests/test_dali.py, the others exactly; tests/test_image_modes.py). MPO is
# a camera JPEG with extra pictures appended: its first picture, which both decoders read, is a
# plain JPEG. Everything else is re-encoded by ``canonical_encoding``:
#   format        GIF (DALI has no GIF decoder: every GIF was "corrupt" on the DALI path), TIFF
#                 (nvTIFF on the GPU; 16-bit, CMYK, alpha and planar variants decode differently),
#                 BMP (many variants; PNG is smaller anyway) and any other format Pillow reads
#   animated      more than one frame: Pillow's first frame, with no canvas or blending rules left
#   transparency  alpha band, palette or colour-key transparency: DALI drops it, Pillow composites
#   16-bit        DALI scales 16-bit samples to 8 bits, Pillow clips (grey) or truncates (colour)
#   mode          any other mode: CMYK, LA, I, F, ... (converted to RGB by Pillow, unchecked elsewhere)
KEPT_MODES: dict[str, tuple[str, ...]] = {
    "JPEG": ("RGB", "L"),
    "MPO": ("RGB", "L"),
    "PNG": ("RGB", "L", "P", "1"),
    "WEBP": ("RGB",),
}
CONVERTED_KEY = "megatron-vlm-converted"  # PNG text chunk of a re-encoded image: why it was converted
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_bit_depth(data: bytes) -> int | None:
    """Bits per sample from a PNG's IHDR (Pillow reports 16-bit colour PNGs as plain 'RGB')."""
    if data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) > 24:
        return data[24]
    return None


def conversion_reason(image: Image.Image, data: bytes) -> str | None:
    """Why an opened image (header only is enough) must be re-encoded before storing, as
    "category: FORMAT MODE[, N frames]" (categories above), or None when its bytes are stored as
    they are. ``data`` is its encoded bytes (a 16-bit PNG is told from its header)."""
    image_format = image.format or "unknown"
    frames = 1 if image_format == "MPO" else getattr(image, "n_frames", 1)
    what = f"{image_format} {image.mode}" + (f", {frames} frames" if frames > 1 else "")
    if image_format not in KEPT_MODES:
        return f"format: {what}"
    if frames > 1:
        return f"animated: {what}"
    if has_transparency(image):
        return f"transparency: {what}"
    if (_png_bit_depth(data) or 8) > 8 or image.mode.startswith("I;16"):
        return f"16-bit: {what}"
    if image.mode not in KEPT_MODES[image_format]:
        return f"mode: {what}"
    return None


def needs_conversion(data: bytes) -> str | None:
    """``conversion_reason`` of encoded bytes, from their header (no pixel decode): whether bytes
    made elsewhere (a webdataset tar re-indexed in place, an older shard) can be used as they are.
    Raises what Pillow raises for data it cannot open."""
    with Image.open(io.BytesIO(data)) as image:
        return conversion_reason(image, data)


def canonical_encoding(data: bytes, compress_level: int = 6) -> tuple[bytes, str | None]:
    """The bytes to store for an encoded image, and why they differ from ``data`` (None: they are
    ``data``). A converted image is the PNG of its ``to_rgb`` pixels (first frame; 8-bit grey when
    all three channels agree, else RGB), which Pillow and DALI both decode to exactly those pixels;
    the reason travels in the PNG (``conversion_note``) so shard writers can record it. Idempotent.
    Raises what Pillow raises for data it cannot decode."""
    with Image.open(io.BytesIO(data)) as image:
        reason = conversion_reason(image, data)
        if reason is None:
            return data, None
        image.seek(0)
        pixels = to_rgb(image)
    if np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2]):
        stored = Image.fromarray(np.ascontiguousarray(pixels[..., 0]), mode="L")
    else:
        stored = Image.fromarray(pixels, mode="RGB")
    note = PngInfo()
    note.add_text(CONVERTED_KEY, reason)
    output = io.BytesIO()
    stored.save(output, format="PNG", pnginfo=note, compress_level=compress_level)
    return output.getvalue(), reason


def conversion_note(data: bytes) -> str | None:
    """The reason ``canonical_encoding`` stored in bytes it produced, or None (any other bytes,
    undecodable ones included: this only reads)."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            note = image.info.get(CONVERTED_KEY)
    except Exception:  # noqa: BLE001 - a broken PNG simply carries no note
        return None
    return note if isinstance(note, str) else None


def process_image(image: Image.Image, config: ImageConfig, scale: float = 1.0) -> list[np.ndarray]:
    """One image -> its model inputs (1, or 5 with splitting), each float32 [3, h, w]; ``scale``
    as in ``resized_size`` (each crop resized once, to the size its scaled size gives)."""
    pixels = to_rgb(image)
    crops = split_crops(pixels) if config.split else [pixels]
    processed = []
    for crop in crops:
        height, width = resized_size(crop.shape[0], crop.shape[1], config, scale)
        resized = Image.fromarray(crop).resize((width, height), resample=Image.Resampling.BILINEAR)
        processed.append(normalize(np.asarray(resized), config))
    return processed


def pad_images(images: Sequence[np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [3, h_i, w_i] -> pixel_values [N, 3, H, W] (zero padded bottom/right) and
    pixel_attention_mask [N, H, W] (True on real pixels). N may be 0.

    Both are allocated where the images live, pixel_values in their dtype: images DALI decoded on
    a GPU stay on it, with no host round trip. All images must share one device and dtype."""
    if not images:
        return torch.zeros(0, 3, 1, 1), torch.zeros(0, 1, 1, dtype=torch.bool)
    tensors = [torch.as_tensor(image) for image in images]
    first = tensors[0]
    for index, image in enumerate(tensors):
        if image.dim() != 3 or image.shape[0] != first.shape[0]:
            raise ValueError(f"image {index} has shape {tuple(image.shape)}; expected [{first.shape[0]}, h, w]")
        if image.device != first.device or image.dtype != first.dtype:
            raise ValueError(
                f"image {index} is {image.dtype} on {image.device} but image 0 is {first.dtype} on {first.device}"
            )
    height = max(image.shape[-2] for image in tensors)
    width = max(image.shape[-1] for image in tensors)
    pixel_values = first.new_zeros(len(tensors), first.shape[0], height, width)
    mask = torch.zeros(len(tensors), height, width, dtype=torch.bool, device=first.device)
    for index, image in enumerate(tensors):
        h, w = image.shape[-2:]
        pixel_values[index, :, :h, :w] = image
        mask[index, :h, :w] = True
    return pixel_values, mask
