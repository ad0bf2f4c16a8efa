"""Image semantics of Idefics2 (the reference the DALI and Pillow paths implement).

Same rules as transformers' ``Idefics2ImageProcessor``: optionally split into 4 crops + the full
image (split first, on the original), resize keeping the aspect ratio (longest edge capped, then
both edges raised to the shortest-edge floor), rescale by 1/255, normalize with mean = std = 0.5,
and pad every image of a batch to the largest height and width with a pixel mask.
Stage limits: 384 px longest edge in the paper's stage 1, 980 px in stage 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class ImageConfig:
    longest_edge: int = 980
    shortest_edge: int = 378
    split: bool = False  # 4 crops + the full image: 5 images (and 5 placeholder groups) per image
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

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


def resized_size(height: int, width: int, config: ImageConfig) -> tuple[int, int]:
    """Output (height, width): the longest edge capped, then each edge at least the floor."""
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


def process_image(image: Image.Image, config: ImageConfig) -> list[np.ndarray]:
    """One image -> its model inputs (1, or 5 with splitting), each float32 [3, h, w]."""
    pixels = np.asarray(image.convert("RGB"))
    crops = split_crops(pixels) if config.split else [pixels]
    processed = []
    for crop in crops:
        height, width = resized_size(crop.shape[0], crop.shape[1], config)
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
