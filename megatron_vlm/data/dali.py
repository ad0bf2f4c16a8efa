"""Image decoding backends: NVIDIA DALI (GPU 'mixed' decoding, or the same graph on CPU) and Pillow.

Both implement ``images.py``'s semantics: split windows and target sizes are computed on the host
from the image header (Idefics2's rules, or the square of ``ImageConfig.resize``); DALI then decodes only each window (``image_slice``:
nvJPEG / the hardware JPEG decoder with 'mixed'), resizes with an antialiased linear filter and
normalizes to CHW float32. Pillow's bilinear filter and DALI's differ slightly; the bound is
asserted in ``tests/test_dali.py``. EXIF orientation is ignored, as transformers ignores it.

DALI decodes only what ``images.canonical_encoding`` keeps (preprocessing stores everything else
as a PNG of Pillow's pixels). An image from an older or foreign shard that still needs converting
is converted here, on the host, with a warning: slow, but never skipped and never different.

A processor takes the encoded images and, optionally, a resolution factor per image (training's
random up-scaling, ``augment.py``: the resize rule applied as if the image were that much larger).
Every processor returns, per encoded image, a list of float32 torch tensors [3, h, w]: on the CPU
for Pillow and DALI-CPU; on this rank's own GPU for DALI 'mixed' (``decoding_device_id``), copied
there from DALI's buffers on torch's current stream, so they reach the model without a host trip.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from megatron_vlm import backend
from megatron_vlm.data.images import (
    ImageConfig,
    ImageLimits,
    canonical_encoding,
    conversion_reason,
    process_image,
    resized_size,
    size_problem,
)
from megatron_vlm.data.shards import CorruptSample
from megatron_vlm.distributed import detect_environment

log = logging.getLogger(__name__)


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


def decoding_device_id() -> int:
    """The CUDA device this process decodes on: the one its model lives on.

    Once CUDA is initialized the current device decides (the trainer's ``distributed.initialize``
    sets it to the local rank before the loader is built); before that, the launcher's local rank
    (torchrun, Slurm, MPI: ``distributed.detect_environment``), which is where that call will put it.
    Never a fixed 0: every rank of a node would decode on GPU 0.
    """
    if not backend.has_cuda():
        raise RuntimeError("DALI 'mixed' decoding needs a GPU; use the dali-cpu or pillow backend")
    if torch.cuda.is_initialized():
        return torch.cuda.current_device()
    env = detect_environment()
    visible = torch.cuda.device_count()  # NVML: does not initialize CUDA
    if 0 < visible <= env.local_rank:
        raise RuntimeError(
            f"local rank {env.local_rank} ({env.launcher}) has no GPU of its own: {visible} visible; "
            "start at most one process per GPU or pass device_id"
        )
    return env.local_rank


class PillowImageProcessor:
    name = "pillow"

    def __init__(self, config: ImageConfig, limits: ImageLimits | None = None) -> None:
        self.config, self.limits = config, limits or ImageLimits()

    def __call__(self, encoded: Sequence[bytes], scales: Sequence[float] | None = None) -> list[list[torch.Tensor]]:
        outputs = []
        for data, scale in zip(encoded, scales or [1.0] * len(encoded), strict=True):
            with open_checked(data, self.limits) as image:
                try:
                    outputs.append([torch.from_numpy(crop) for crop in process_image(image, self.config, scale)])
                except Exception as error:  # noqa: BLE001 - a truncated file fails only at decode
                    raise CorruptSample("corrupt_image", str(error)) from error
        return outputs


class DaliImageProcessor:
    """Batched DALI decoding. ``device='gpu'`` decodes with 'mixed' on ``device_id`` (default:
    ``decoding_device_id()``, this rank's GPU) and returns tensors on that GPU; ``device='cpu'``
    runs the same graph on CPU threads and returns CPU tensors."""

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
        if device not in ("cpu", "gpu"):
            raise ValueError(f"DALI device {device!r}: use 'cpu' or 'gpu'")
        if device == "gpu" and not backend.has_cuda():
            raise RuntimeError("DALI 'mixed' decoding needs a GPU; use device='cpu' or the pillow backend")
        self.config, self.device, self.batch_size = config, device, batch_size
        self.limits = limits or ImageLimits()
        self.name = f"dali-{device}"
        self.converted_on_host = 0  # images that reached DALI in a form it decodes differently
        self.device_id: int | None = None
        if device == "gpu":
            self.device_id = decoding_device_id() if device_id is None else device_id
        self._pipeline = self._build(num_threads, self.device_id)

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
            # ``size`` stays a CPU argument input: DALI refuses GPU data for named arguments.
            images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
            return fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[255 * m for m in config.mean],
                std=[255 * s for s in config.std],
            )

        built = pipeline()
        try:
            built.build()
        except RuntimeError as error:
            where = "on the CPU" if device_id is None else f"on CUDA device {device_id}"
            raise RuntimeError(f"DALI could not build its {self.name} pipeline {where}: {error}") from error
        return built

    def _convert_on_host(self, data: bytes, reason: str) -> bytes:
        """Pillow's pixels as a PNG DALI decodes exactly (fast, uncompressed: it is never stored)."""
        if self.converted_on_host == 0:
            log.warning(
                "an image needs converting before DALI decodes it (%s): the shards predate canonical image "
                "encoding; converting on the host (slow), re-run tools/preprocess_data.py to store them converted",
                reason,
            )
        self.converted_on_host += 1
        try:
            return canonical_encoding(data, compress_level=0)[0]
        except Exception as error:  # noqa: BLE001 - Pillow raises many types for bad data
            raise CorruptSample("corrupt_image", str(error)) from error

    def __call__(self, encoded: Sequence[bytes], scales: Sequence[float] | None = None) -> list[list[torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        gpu = self.device_id is not None
        # Outputs are bound to torch's stream on the decoding device, and copied on it into
        # torch-owned memory: the model's kernels are ordered after the copy, no host sync, and
        # DALI may reuse its own buffers as soon as the next batch runs.
        stream = torch.cuda.current_stream(self.device_id) if gpu else None
        device = torch.device("cuda", self.device_id) if gpu else torch.device("cpu")
        entries = []  # (image index, bytes, window, target size)
        for index, (data, scale) in enumerate(zip(encoded, scales or [1.0] * len(encoded), strict=True)):
            with open_checked(data, self.limits) as image:  # reads the header only
                width, height = image.size
                reason = conversion_reason(image, data)
            if reason is not None:
                data = self._convert_on_host(data, reason)
            for top, left, h, w in crop_windows(height, width, self.config):
                entries.append((index, data, (top, left, h, w), resized_size(h, w, self.config, scale)))
        outputs: list[list[torch.Tensor]] = [[] for _ in encoded]
        for first in range(0, len(entries), self.batch_size):
            chunk = entries[first : first + self.batch_size]
            self._pipeline.feed_input("encoded", [np.frombuffer(e[1], np.uint8) for e in chunk])
            self._pipeline.feed_input("start", [np.array(e[2][:2], np.int32) for e in chunk])
            self._pipeline.feed_input("shape", [np.array(e[2][2:], np.int32) for e in chunk])
            self._pipeline.feed_input("size", [np.array(e[3], np.float32) for e in chunk])
            try:
                (batch,) = self._pipeline.run(stream)
            except RuntimeError as error:
                raise CorruptSample("corrupt_image", f"DALI could not decode: {str(error)[:200]}") from error
            for position, entry in enumerate(chunk):
                sample = batch[position]
                image = torch.empty(sample.shape(), dtype=torch.float32, device=device)
                outputs[entry[0]].append(feed_ndarray(sample, image, cuda_stream=stream))
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
