"""Image processing and token layout match transformers' Idefics2ImageProcessor / Idefics2Processor."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from megatron_vlm.data.images import ImageConfig, pad_images, process_image, resized_size
from megatron_vlm.data.tokens import image_token_ids, load_tokenizer, tokenize_prompts


def real_photos():
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    photos = {
        "chelsea": Image.open(folder / "chelsea.png"),  # 300 x 451 RGB
        "coffee": Image.open(folder / "coffee.png"),  # 400 x 600
        "astronaut": Image.open(folder / "astronaut.png"),  # 512 x 512
        "rocket": Image.open(folder / "rocket.jpg"),  # 427 x 640 JPEG
        "camera": Image.open(folder / "camera.png"),  # 512 x 512 grayscale
        "text": Image.open(folder / "text.png"),  # 172 x 448 grayscale, below the shortest edge
    }
    photos["chelsea_portrait"] = photos["chelsea"].transpose(Image.Transpose.ROTATE_90)
    return photos


def hf_processor(config: ImageConfig):
    from transformers import Idefics2ImageProcessor

    return Idefics2ImageProcessor(
        size={"longest_edge": config.longest_edge, "shortest_edge": config.shortest_edge},
        do_image_splitting=config.split,
    )


@pytest.mark.parametrize(
    "config",
    [
        ImageConfig(longest_edge=980, shortest_edge=378),  # stage 2
        ImageConfig(longest_edge=384, shortest_edge=378),  # stage 1
        ImageConfig(longest_edge=490, shortest_edge=168, split=True),
    ],
    ids=["stage2", "stage1", "split"],
)
def test_pixels_and_masks_equal_transformers(config):
    photos = list(real_photos().values())
    batch = [[photos[0], photos[1]], [photos[2]], [photos[3], photos[4], photos[5], photos[6]]]
    reference = hf_processor(config)(batch, return_tensors="pt")
    ours = [process_image(image, config) for row in batch for image in row]
    assert all(len(images) == config.images_per_image for images in ours)
    pixel_values, mask = pad_images([crop for images in ours for crop in images])

    # transformers: [rows, max images, 3, H, W] with all-zero padding images; ours: flat, batch-major.
    ref_pixels = reference["pixel_values"].flatten(0, 1)
    ref_mask = reference["pixel_attention_mask"].flatten(0, 1).bool()
    real = ref_mask.flatten(1).any(-1)
    assert torch.equal(pixel_values, ref_pixels[real])
    assert torch.equal(mask, ref_mask[real])


def test_resize_rule_keeps_aspect_ratio_within_limits():
    config = ImageConfig(longest_edge=980, shortest_edge=378)
    assert resized_size(2000, 1000, config) == (980, 490)
    assert resized_size(1000, 3000, config) == (378, 980)  # floor applies after the cap
    assert resized_size(500, 600, config) == (500, 600)  # already within limits: untouched
    assert resized_size(100, 120, config) == (378, 378)


def test_no_images_give_empty_batch():
    pixel_values, mask = pad_images([])
    assert pixel_values.shape[0] == 0 and mask.shape[0] == 0


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_tokenizer_is_mistral_with_image_tokens(tokenizer):
    assert len(tokenizer) == 32003
    assert image_token_ids(tokenizer) == {
        "<fake_token_around_image>": 32000,
        "<image>": 32001,
        "<end_of_utterance>": 32002,
    }


@pytest.mark.parametrize("split", [False, True])
def test_token_layout_equals_idefics2_processor(tokenizer, split):
    from transformers import Idefics2Processor

    config = ImageConfig(longest_edge=224, shortest_edge=112, split=split)
    processor = Idefics2Processor(image_processor=hf_processor(config), tokenizer=load_tokenizer(), image_seq_len=64)
    prompts = [
        "<image>A cat looking at the camera.",
        "Compare<image><image>two adjacent photos.",  # adjacent images share a fake token
        "Text first, then an image: <image> and more text after it.",
        "No image at all.",
        "<image>\nUser: What is in the photo?<end_of_utterance>\nAssistant: A rocket.<end_of_utterance>",
    ]
    photo = real_photos()["chelsea"]
    images = [[photo] * p.count("<image>") for p in prompts]
    expected = processor(text=prompts, images=images)["input_ids"]
    ours = tokenize_prompts(tokenizer, prompts, image_seq_len=64, split=split)
    assert ours == [list(ids) for ids in expected]
    image_tokens = sum(ids.count(32001) for ids in ours)
    assert image_tokens == 64 * (5 if split else 1) * sum(p.count("<image>") for p in prompts)
    # Row 1: two adjacent images share their middle fake token.
    groups = 5 if split else 1
    assert ours[1].count(32000) == 2 * groups + 1
