"""Image decoding backends: NVIDIA DALI (GPU 'mixed' decoding, or the same graph on CPU) and Pillow.

Both implement ``images.py``'s semantics: split windows and target sizes are computed on the host
from the image header (Idefics2's rules); DALI then decodes only each window (``image_slice``:
nvJPEG / the hardware JPEG decoder with 'mixed'), resizes with an antialiased linear filter and
normalizes to CHW float32. Pillow's bilinear filter and DALI's differ slightly; the bound is
asserted in ``tests/test_dali.py``. EXIF orientation is ignored, as transformers ignores it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from megatron_vlm import backend
from megatron_vlm.data.images import ImageConfig, process_image, resized_size
from megatron_vlm.data.preprocess import ImageLimits, size_problem
from megatron_vlm.data.shards import CorruptSample


def open_checked(data: bytes, limits: ImageLimits) -> Image.Image:
    """Open (header only) an encoded image; CorruptSample if unreadable or of an absurd size."""
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for bad data
        raise CorruptSample("corrupt_image", str(error)) from error
    problem = size_problem(image.width, image.height, limits)
    if problem:
        raise CorruptSample("absurd_size", problem)
    return image


def crop_windows(height: int, width: int, config: ImageConfig) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of each model input taken from an image: 4 quadrants + full
    with splitting, else the full image (same windows as ``images.split_crops``)."""
    if not config.split:
        return [(0, 0, height, width)]
    mid_h, mid_w = height // 2, width // 2
    return [
        (0, 0, mid_h, mid_w),
        (0, mid_w, mid_h, width - mid_w),
        (mid_h, 0, height - mid_h, mid_w),
        (mid_h, mid_w, height - mid_h, width - mid_w),
        (0, 0, height, width),
    ]


class PillowImageProcessor:
    name = "pillow"

    def __init__(self, config: ImageConfig, limits: ImageLimits | None = None) -> None:
        self.config, self.limits = config, limits or ImageLimits()

    def __call__(self, encoded: Sequence[bytes]) -> list[list[np.ndarray]]:
        outputs = []
        for data in encoded:
            with open_checked(data, self.limits) as image:
                try:
                    outputs.append(process_image(image, self.config))
                except Exception as error:  # noqa: BLE001 - a truncated file fails only at decode
                    raise CorruptSample("corrupt_image", str(error)) from error
        return outputs


class DaliImageProcessor:
    """Batched DALI decoding. ``device='gpu'`` decodes with 'mixed' on ``device_id``;
    ``device='cpu'`` runs the same graph on CPU threads (``device_id=None``)."""

    def __init__(
        self,
        config: ImageConfig,
        device: str = "cpu",
        batch_size: int = 64,
        num_threads: int = 2,
        device_id: int | None = None,
        limits: ImageLimits | None = None,
    ) -> None:
        if not backend.has_dali():
            raise RuntimeError(
                "NVIDIA DALI is not installed (pip install nvidia-dali-cuda130, or use the pillow backend)"
            )
        if device == "gpu" and not backend.has_cuda():
            raise RuntimeError("DALI 'mixed' decoding needs a GPU; use device='cpu' or the pillow backend")
        self.config, self.device, self.batch_size = config, device, batch_size
        self.limits = limits or ImageLimits()
        self.name = f"dali-{device}"
        self._pipeline = self._build(num_threads, (device_id or 0) if device == "gpu" else None)

    def _build(self, num_threads: int, device_id: int | None) -> Any:
        from nvidia.dali import fn, pipeline_def, types

        config, gpu = self.config, self.device == "gpu"

        # One batch in flight: inputs are fed right before each run.
        @pipeline_def(batch_size=self.batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1)
        def pipeline() -> Any:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            start = fn.external_source(name="start", dtype=types.INT32)
            shape = fn.external_source(name="shape", dtype=types.INT32)
            size = fn.external_source(name="size", dtype=types.FLOAT)
            images = fn.decoders.image_slice(
                encoded,
                start,
                shape,
                axis_names="HW",
                device="mixed" if gpu else "cpu",
                output_type=types.RGB,
                adjust_orientation=False,
            )
            images = fn.resize(
                images, size=size.gpu() if gpu else size, interp_type=types.INTERP_LINEAR, antialias=True
            )
            return fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[255 * m for m in config.mean],
                std=[255 * s for s in config.std],
            )

        built = pipeline()
        built.build()
        return built

    def __call__(self, encoded: Sequence[bytes]) -> list[list[np.ndarray]]:
        entries = []  # (image index, bytes, window, target size)
        for index, data in enumerate(encoded):
            with open_checked(data, self.limits) as image:  # reads the header only
                width, height = image.size
            for top, left, h, w in crop_windows(height, width, self.config):
                entries.append((index, data, (top, left, h, w), resized_size(h, w, self.config)))
        outputs: list[list[np.ndarray]] = [[] for _ in encoded]
        for first in range(0, len(entries), self.batch_size):
            chunk = entries[first : first + self.batch_size]
            self._pipeline.feed_input("encoded", [np.frombuffer(e[1], np.uint8) for e in chunk])
            self._pipeline.feed_input("start", [np.array(e[2][:2], np.int32) for e in chunk])
            self._pipeline.feed_input("shape", [np.array(e[2][2:], np.int32) for e in chunk])
            self._pipeline.feed_input("size", [np.array(e[3], np.float32) for e in chunk])
            try:
                (batch,) = self._pipeline.run()
            except RuntimeError as error:
                raise CorruptSample("corrupt_image", f"DALI could not decode: {str(error)[:200]}") from error
            if self.device == "gpu":
                batch = batch.as_cpu()
            for position, entry in enumerate(chunk):
                outputs[entry[0]].append(np.array(batch.at(position)))
        return outputs


def image_processor(
    config: ImageConfig, backend_name: str = "auto", **dali_options: Any
) -> PillowImageProcessor | DaliImageProcessor:
    """'pillow', 'dali-cpu', 'dali-gpu', or 'auto': DALI on the GPU when both are there, else Pillow."""
    if backend_name == "auto":
        backend_name = "dali-gpu" if backend.has_dali() and backend.has_cuda() else "pillow"
    if backend_name == "pillow":
        return PillowImageProcessor(config)
    if backend_name in ("dali-cpu", "dali-gpu"):
        return DaliImageProcessor(config, device=backend_name.split("-")[1], **dali_options)
    raise ValueError(f"unknown image backend {backend_name!r}: pillow, dali-cpu, dali-gpu or auto")
