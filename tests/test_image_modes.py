"""Every image mode and format, the same on every backend (issue #13).

Each case is a real photo (scikit-image's bundled astronaut, chelsea, coffee, camera), cropped to an
odd size and saved the way web images come: JPEG RGB / L / CMYK, PNG with an alpha band, LA, palette
and colour-key transparency, 16-bit PNG, GIF (still, transparent, animated), WebP, BMP, TIFF.

- The Pillow path gives transformers' ``Idefics2ImageProcessorPil`` bit for bit, with and without
  splitting, from the bytes as they come and from the bytes preprocessing stores.
- Preprocessing stores what DALI cannot decode to the same pixels as a PNG of exactly those pixels
  (``canonical_encoding``: idempotent, lossless) and records what it converted and why in the shard
  index; the DALI CPU path then decodes every case within test_dali.py's bound, none dropped.
"""

import io
import logging
import struct
import zlib
from collections import Counter
from functools import cache

import numpy as np
import pytest
import torch
from PIL import Image
from test_dali import MAX_ABS_BOUND, MEAN_ABS_BOUND

from megatron_vlm import backend
from megatron_vlm.data.dali import DaliImageProcessor, PillowImageProcessor, image_processor
from megatron_vlm.data.images import ImageConfig, pad_images

CONFIGS = {
    "stage1": ImageConfig(longest_edge=384, shortest_edge=378),
    "split": ImageConfig(longest_edge=490, shortest_edge=168, split=True),
}


# --- the images: real photos, odd sizes, every mode -----------------------------------------------


@cache
def photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def crop(name: str, top: int, left: int, height: int, width: int) -> np.ndarray:
    return np.ascontiguousarray(photo(name)[top : top + height, left : left + width])


def rgb(height: int, width: int, name: str = "astronaut", top: int = 120, left: int = 190) -> Image.Image:
    return Image.fromarray(crop(name, top, left, height, width))


def grey(height: int, width: int, top: int = 90, left: int = 230) -> Image.Image:
    return Image.fromarray(crop("camera", top, left, height, width))


def with_alpha(image: Image.Image) -> Image.Image:
    """The photo with the cameraman as its alpha: every level from transparent to opaque."""
    alpha = Image.fromarray(crop("camera", 60, 200, image.height, image.width))
    out = image.copy()
    out.putalpha(alpha)
    return out


def encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    output = io.BytesIO()
    image.save(output, format=image_format, **options)
    return output.getvalue()


def png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG (grey [H, W], RGB or RGBA [H, W, C]) written from the PNG specification: Pillow
    writes 16-bit grey only, and colour 16-bit PNGs are what cameras and editors export."""
    height, width = samples.shape[:2]
    colour_type = {1: 0, 3: 2, 4: 6}[1 if samples.ndim == 2 else samples.shape[2]]  # grey, RGB, RGBA
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def sixteen_bit(height: int, width: int, channels: int) -> np.ndarray:
    """A photo's 8 bits as the high byte and a second photo's as the low one: real 16-bit detail."""
    high = crop("coffee", 40, 120, height, width).astype(np.uint16)
    low = crop("chelsea", 70, 150, height, width).astype(np.uint16)
    if channels == 4:  # the photos have no alpha band: the cameraman is the high byte of one
        high = np.dstack([high, crop("camera", 60, 200, height, width)])
        low = np.dstack([low, crop("camera", 61, 203, height, width)])
    return high * 256 + low


def palette_with_transparency(height: int, width: int) -> bytes:
    """Chelsea quantized to 32 colours, its tRNS giving 8 of them partial or full transparency."""
    image = rgb(height, width, "chelsea", 60, 140).quantize(32)
    return encode(image, "PNG", transparency=bytes([0, 40, 80, 120, 160, 200, 230, 250] + [255] * 24))


def animated_gif() -> bytes:
    frames = [rgb(47, 59), rgb(47, 59, "coffee", 30, 200)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)


# name -> (bytes, why preprocessing converts it: the reason's category, or None when stored as is)
CASE_BUILDERS = {
    "jpeg_rgb": (lambda: encode(rgb(53, 37), "JPEG", quality=90), None),
    "jpeg_rgb_large": (lambda: encode(rgb(401, 317, "coffee", 0, 100), "JPEG", quality=85), None),
    "jpeg_l": (lambda: encode(grey(41, 67), "JPEG"), None),
    "jpeg_cmyk": (lambda: encode(rgb(45, 61, "coffee").convert("CMYK"), "JPEG"), "mode"),
    "png_rgb": (lambda: encode(rgb(37, 53), "PNG"), None),
    "png_l": (lambda: encode(grey(59, 31), "PNG"), None),
    "png_1bit": (lambda: encode(grey(33, 47).convert("1"), "PNG"), None),
    "png_p": (lambda: encode(rgb(43, 57, "chelsea").quantize(64), "PNG"), None),
    "png_rgba": (lambda: encode(with_alpha(rgb(45, 61, "chelsea", 80, 170)), "PNG"), "transparency"),
    "png_la": (lambda: encode(with_alpha(grey(53, 37).convert("L")), "PNG"), "transparency"),
    "png_p_transparency": (lambda: palette_with_transparency(47, 35), "transparency"),
    "png_p_colour_key": (lambda: encode(rgb(39, 51).quantize(48), "PNG", transparency=5), "transparency"),
    "png_rgb_colour_key": (
        lambda: encode(rgb(37, 53), "PNG", transparency=_common_colour(rgb(37, 53))),
        "transparency",
    ),
    "png_16bit_grey": (lambda: encode(Image.fromarray(_ten_bit_grey(49, 35)), "PNG"), "16-bit"),
    "png_16bit_rgb": (lambda: png16(sixteen_bit(35, 49, 3)), "16-bit"),
    "png_16bit_rgba": (lambda: png16(sixteen_bit(41, 43, 4)), "transparency"),
    "gif": (lambda: encode(rgb(47, 59), "GIF"), "format"),
    "gif_transparency": (lambda: encode(rgb(39, 51).quantize(48), "GIF", transparency=5), "format"),
    "gif_animated": (animated_gif, "format"),
    "webp_lossy": (lambda: encode(rgb(53, 37, "coffee"), "WEBP", quality=80), None),
    "webp_lossless": (lambda: encode(rgb(37, 53, "chelsea"), "WEBP", lossless=True), None),
    "webp_rgba": (lambda: encode(with_alpha(rgb(45, 61)), "WEBP", lossless=True), "transparency"),
    "bmp": (lambda: encode(rgb(43, 57, "coffee"), "BMP"), "format"),
    "tiff": (lambda: encode(rgb(51, 39, "chelsea"), "TIFF"), "format"),
    "tiff_16bit": (lambda: encode(Image.fromarray(_ten_bit_grey(37, 53)), "TIFF"), "format"),
    "tiff_cmyk": (lambda: encode(rgb(45, 61).convert("CMYK"), "TIFF"), "format"),
}


def _common_colour(image: Image.Image) -> tuple[int, int, int]:
    """The photo's most frequent colour, so the colour key makes real pixels transparent."""
    colours = Counter(map(tuple, np.asarray(image).reshape(-1, 3).tolist()))
    return colours.most_common(1)[0][0]


def _ten_bit_grey(height: int, width: int) -> np.ndarray:
    """The cameraman at 10 bits (0..1020): Pillow clips 16-bit grey to 255, so part of it saturates
    the way it does in transformers, and part does not."""
    return crop("camera", 90, 230, height, width).astype(np.uint16) * 4 + 1


@cache
def case_bytes(name: str) -> bytes:
    return CASE_BUILDERS[name][0]()


CASES = list(CASE_BUILDERS)
CONVERTED = [name for name, (_, category) in CASE_BUILDERS.items() if category is not None]


def test_the_cases_are_what_they_claim():
    """Guards the test itself: each file opens in Pillow as the mode and format it is named for."""
    expected = {
        "jpeg_l": ("JPEG", "L"),
        "jpeg_cmyk": ("JPEG", "CMYK"),
        "png_1bit": ("PNG", "1"),
        "png_rgba": ("PNG", "RGBA"),
        "png_la": ("PNG", "LA"),
        "png_p_transparency": ("PNG", "P"),
        "png_16bit_grey": ("PNG", "I;16"),
        "png_16bit_rgb": ("PNG", "RGB"),
        "gif_animated": ("GIF", "P"),
        "webp_rgba": ("WEBP", "RGBA"),
        "tiff_16bit": ("TIFF", "I;16"),
        "tiff_cmyk": ("TIFF", "CMYK"),
    }
    for name in CASES:
        with Image.open(io.BytesIO(case_bytes(name))) as image:
            image_format, mode = expected.get(name, (name.split("_")[0].upper(), None))
            assert image.format == image_format, name
            assert mode is None or image.mode == mode, name
            assert min(image.size) >= 31 and image.size[0] != image.size[1], name  # odd, non-square
            if "transparency" in name or "colour_key" in name:
                assert image.info.get("transparency") is not None, name
    assert case_bytes("png_16bit_rgb")[24] == 16 and Image.open(io.BytesIO(case_bytes("gif_animated"))).n_frames == 2


# --- the oracle -----------------------------------------------------------------------------------


@cache  # shared by the Pillow and DALI tests of a case (read only)
def reference(data: bytes, config: ImageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Pillow-backend Idefics2 processor on the image as Pillow opens it."""
    from transformers import Idefics2ImageProcessorPil

    processor = Idefics2ImageProcessorPil(
        size={"longest_edge": config.longest_edge, "shortest_edge": config.shortest_edge},
        do_image_splitting=config.split,
    )
    with Image.open(io.BytesIO(data)) as image:
        output = processor([[image]], return_tensors="pt")
    return output["pixel_values"][0], output["pixel_attention_mask"][0].bool()


@cache
def stored(data: bytes) -> bytes:
    """The bytes preprocessing stores for an image."""
    from megatron_vlm.data.images import canonical_encoding

    return canonical_encoding(data)[0]


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", CASES)
def test_pillow_path_equals_transformers_bit_for_bit(name, config_name):
    config = CONFIGS[config_name]
    expected_pixels, expected_mask = reference(case_bytes(name), config)
    (crops,) = PillowImageProcessor(config)([case_bytes(name)])
    pixel_values, mask = pad_images(crops)
    assert torch.equal(mask, expected_mask)
    assert torch.equal(pixel_values, expected_pixels), f"max difference {(pixel_values - expected_pixels).abs().max()}"


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", CONVERTED)
def test_stored_encoding_keeps_transformers_pixels(name, config_name):
    """Conversion is lossless for the Pillow path: the stored PNG gives transformers' result on the
    original file, bit for bit."""
    config = CONFIGS[config_name]
    expected_pixels, expected_mask = reference(case_bytes(name), config)
    (crops,) = PillowImageProcessor(config)([stored(case_bytes(name))])
    pixel_values, mask = pad_images(crops)
    assert torch.equal(mask, expected_mask) and torch.equal(pixel_values, expected_pixels)


@pytest.mark.parametrize("name", CASES)
def test_canonical_encoding_is_idempotent_and_says_why(name):
    from transformers.image_transforms import convert_to_rgb

    from megatron_vlm.data.images import canonical_encoding, conversion_note, needs_conversion

    original = case_bytes(name)
    category = CASE_BUILDERS[name][1]
    data, reason = canonical_encoding(original)
    assert needs_conversion(original) == reason
    if category is None:
        assert reason is None and data == original and conversion_note(data) is None
        return
    assert reason.startswith(f"{category}: "), reason
    with Image.open(io.BytesIO(original)) as image:
        assert image.format in reason and image.mode in reason  # what it was, not only why
        expected = convert_to_rgb(image, return_numpy=True)
    with Image.open(io.BytesIO(data)) as converted:
        assert converted.format == "PNG" and converted.mode in ("L", "RGB")
        assert np.array_equal(np.asarray(converted.convert("RGB")), expected)
    assert conversion_note(data) == reason
    assert needs_conversion(data) is None
    assert canonical_encoding(data) == (data, None)  # idempotent: stored bytes are kept as they are
    if name == "gif_animated":
        assert reason == "format: GIF P, 2 frames"


# --- DALI: every case decodes, within the bound -----------------------------------------------------


@pytest.fixture(scope="module")
def dali_cpu():
    assert backend.has_dali(), "NVIDIA DALI is not installed: the 'test' extra installs it (pip install -e '.[test]')"
    return {name: DaliImageProcessor(config, device="cpu", batch_size=8) for name, config in CONFIGS.items()}


def assert_within_bound(crops: list[torch.Tensor], data: bytes, config: ImageConfig) -> None:
    expected_pixels, expected_mask = reference(data, config)
    pixel_values, mask = pad_images(crops)
    assert pixel_values.shape == expected_pixels.shape and torch.equal(mask, expected_mask)
    difference = (pixel_values - expected_pixels).abs()
    means = [difference[index][:, expected_mask[index]].mean().item() for index in range(len(crops))]
    measured = f"max {difference.max():.4f}, worst mean {max(means):.5f}"
    assert difference.max() <= MAX_ABS_BOUND and max(means) <= MEAN_ABS_BOUND, measured


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", CASES)
def test_dali_cpu_decodes_every_case_as_stored_within_the_bound(dali_cpu, name, config_name):
    """What preprocessing stores, DALI decodes as it is (no conversion left) within the bound."""
    processor = dali_cpu[config_name]
    before = processor.converted_on_host
    (crops,) = processor([stored(case_bytes(name))])
    assert processor.converted_on_host == before
    assert_within_bound(crops, case_bytes(name), CONFIGS[config_name])


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", CASES)
def test_dali_cpu_decodes_unconverted_bytes_within_the_bound(dali_cpu, name, config_name):
    """Bytes from shards written before canonical encoding, or by another tool: still decoded, to
    the same pixels as the stored form (converted on the host), never skipped as corrupt."""
    (crops,) = dali_cpu[config_name]([case_bytes(name)])  # the host conversion is counted: test below
    assert_within_bound(crops, case_bytes(name), CONFIGS[config_name])


def test_unconverted_bytes_on_dali_are_converted_with_one_warning(caplog):
    assert backend.has_dali(), "NVIDIA DALI is not installed: the 'test' extra installs it (pip install -e '.[test]')"
    processor = DaliImageProcessor(CONFIGS["stage1"], device="cpu", batch_size=8)
    with caplog.at_level(logging.WARNING, logger="megatron_vlm.data.dali"):
        decoded = processor([case_bytes("gif"), case_bytes("jpeg_rgb"), case_bytes("png_rgba")])
        processor([case_bytes("gif_animated")])
    assert [len(crops) for crops in decoded] == [1, 1, 1] and processor.converted_on_host == 3
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "format: GIF P" in warnings[0] and "preprocess_data.py" in warnings[0]


@pytest.mark.gpu
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_dali_gpu_decodes_every_case_as_stored_within_the_bound(config_name):
    if not backend.has_dali():
        pytest.skip("NVIDIA DALI is not installed")
    config = CONFIGS[config_name]
    processor = image_processor(config, "dali-gpu", batch_size=8)
    decoded = processor([stored(case_bytes(name)) for name in CASES])
    assert processor.converted_on_host == 0
    for name, crops in zip(CASES, decoded, strict=True):
        assert all(crop.device.type == "cuda" for crop in crops), name
        assert_within_bound([crop.cpu() for crop in crops], case_bytes(name), config)


# --- preprocessing stores the canonical form and records it ------------------------------------------


EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}


def test_preprocessing_stores_canonical_images_and_records_conversions(tmp_path):
    import json

    from transformers.image_transforms import convert_to_rgb

    from megatron_vlm.data.preprocess import preprocess
    from megatron_vlm.data.shards import Shard

    rows = []
    for name in CASES:
        with Image.open(io.BytesIO(case_bytes(name))) as image:
            file_name = f"{name}.{EXTENSIONS[image.format]}"
        (tmp_path / file_name).write_bytes(case_bytes(name))
        rows.append({"image": file_name, "caption": f"a {name} photo"})
    # One interleaved document too: the index names which of a sample's images was converted.
    rows.append({"texts": ["before", None, "between", None], "images": [None, "jpeg_rgb.jpg", None, "gif.gif"]})
    source = tmp_path / "modes.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))

    report = preprocess([source], tmp_path / "out", samples_per_shard=100, progress=False)
    assert report.written == len(rows) and not report.rejected, report.rejected
    (shard_name,) = report.shards
    shard = Shard(tmp_path / "out" / shard_name)
    index = json.loads((tmp_path / "out" / (shard_name + ".idx.json")).read_text())

    samples = list(shard)
    assert len(samples) == len(index["samples"]) == len(CASES) + 1  # every case, then the document
    expected_reasons = Counter()
    for name, entry, sample in zip(CASES, index["samples"][:-1], samples[:-1], strict=True):
        (image_bytes,) = sample.images
        category = CASE_BUILDERS[name][1]
        with Image.open(io.BytesIO(case_bytes(name))) as original:
            expected = convert_to_rgb(original, return_numpy=True)
        with Image.open(io.BytesIO(image_bytes)) as decoded:
            assert np.array_equal(np.asarray(decoded.convert("RGB")), expected), name
        if category is None:
            assert "converted" not in entry and image_bytes == case_bytes(name), name
        else:
            (reason,) = entry["converted"].values()
            assert list(entry["converted"]) == ["0"] and reason.startswith(f"{category}: "), (name, entry)
            assert sample.image_extensions == ["png"], name  # a PNG, named as one
            expected_reasons[reason] += 1
    document = index["samples"][-1]
    assert document["converted"] == {"1": "format: GIF P"}
    expected_reasons["format: GIF P"] += 1
    assert index["converted"] == dict(expected_reasons) == shard.converted
    assert sum(shard.converted.values()) == len(CONVERTED) + 1

    # Every stored image decodes on the DALI path as it is: nothing dropped, nothing left to convert.
    assert backend.has_dali(), "NVIDIA DALI is not installed: the 'test' extra installs it (pip install -e '.[test]')"
    processor = DaliImageProcessor(CONFIGS["stage1"], device="cpu", batch_size=8)
    decoded = processor([image for sample in samples for image in sample.images])
    assert len(decoded) == len(CASES) + 2 and all(len(crops) == 1 for crops in decoded)
    assert processor.converted_on_host == 0
