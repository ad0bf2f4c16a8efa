"""DALI decoding (the CPU twin of the GPU 'mixed' path) against transformers' Idefics2 processor."""

import pytest
import torch
from test_data import DATA, SMALL_IMAGES, loader_config, shards, tokenizer  # noqa: F401 - fixtures
from test_images_tokens import hf_processor, real_photos

from megatron_vlm import backend
from megatron_vlm.data.dali import DaliImageProcessor, image_processor
from megatron_vlm.data.images import ImageConfig, pad_images
from megatron_vlm.data.loader import MultimodalLoader
from megatron_vlm.data.shards import CorruptSample

# DALI's antialiased linear resize and Pillow's bilinear filter differ by under one grey level on
# average and by up to 16 levels on single pixels at sharp edges (normalized units: 2/255 a level). Measured on the bundled photos: max 0.102 (stage 1, 384 px), worst image mean below 0.002.
MAX_ABS_BOUND = 0.125
MEAN_ABS_BOUND = 0.004


def encoded_photos():
    return [
        (DATA / "images" / f"{name}.jpg").read_bytes()
        for name in ("chelsea", "coffee", "astronaut", "rocket_portrait", "camera", "hubble")
    ] + [(DATA / "images" / "page.png").read_bytes()]


@pytest.mark.parametrize(
    "config",
    [ImageConfig(980, 378), ImageConfig(384, 378), ImageConfig(490, 168, split=True)],
    ids=["stage2", "stage1", "split"],
)
def test_dali_cpu_matches_transformers_within_the_bound(config):
    from io import BytesIO

    from PIL import Image

    encoded = encoded_photos()
    reference = hf_processor(config)([[Image.open(BytesIO(e)) for e in encoded]], return_tensors="pt")
    ours = DaliImageProcessor(config, device="cpu", batch_size=8)(encoded)
    pixel_values, mask = pad_images([crop for crops in ours for crop in crops])
    ref_pixels = reference["pixel_values"][0]
    ref_mask = reference["pixel_attention_mask"][0].bool()
    assert pixel_values.shape == ref_pixels.shape and torch.equal(mask, ref_mask)
    difference = (pixel_values - ref_pixels).abs()
    assert difference.max() <= MAX_ABS_BOUND
    for index in range(difference.shape[0]):
        assert difference[index][:, ref_mask[index]].mean() <= MEAN_ABS_BOUND


def test_loader_with_dali_cpu_gives_the_same_batches(shards, tokenizer):  # noqa: F811
    import dataclasses

    config = loader_config(shards)
    pillow = MultimodalLoader(dataclasses.replace(config, image_backend="pillow"), tokenizer, 8, 32001)
    dali = MultimodalLoader(dataclasses.replace(config, image_backend="dali-cpu"), tokenizer, 8, 32001)
    for _ in range(4):
        a, b = next(pillow), next(dali)
        assert a["source"] == b["source"] and torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["pixel_attention_mask"], b["pixel_attention_mask"])
        assert (a["pixel_values"] - b["pixel_values"]).abs().max() <= MAX_ABS_BOUND


def test_corrupt_image_is_reported_by_dali():
    with pytest.raises(CorruptSample):
        DaliImageProcessor(SMALL_IMAGES, device="cpu")([b"\xff\xd8\xff\xe0 broken"])


def test_backend_choice_by_capability():
    chosen = image_processor(SMALL_IMAGES, "auto")
    assert chosen.name == ("dali-gpu" if backend.has_cuda() else "pillow")
    if not backend.has_cuda():
        with pytest.raises(RuntimeError, match="needs a GPU"):
            image_processor(SMALL_IMAGES, "dali-gpu")
    with pytest.raises(ValueError, match="unknown image backend"):
        image_processor(SMALL_IMAGES, "opencv")
    assert real_photos()  # the photos the parity tests use are present
