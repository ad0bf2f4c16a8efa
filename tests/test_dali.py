"""DALI decoding (the CPU twin of the GPU 'mixed' path) against transformers' Idefics2 processor."""

from io import BytesIO

import pytest
import torch
from PIL import Image
from test_data import DATA, SMALL_IMAGES, loader_config, shards, tokenizer  # noqa: F401 - fixtures
from test_images_tokens import hf_processor

from megatron_vlm import backend
from megatron_vlm.data import dali
from megatron_vlm.data.dali import DaliImageProcessor, PillowImageProcessor, image_processor
from megatron_vlm.data.images import ImageConfig, pad_images
from megatron_vlm.data.loader import MultimodalLoader
from megatron_vlm.data.shards import CorruptSample

# DALI's antialiased linear resize and Pillow's bilinear filter differ by under one grey level on
# average and by up to 16 levels on single pixels at sharp edges (normalized units: 2/255 a level).
# Measured on the bundled photos: against transformers max 0.047 (stage 1, 384 px), worst image mean
# 0.0017; the loader's 112 px images max 0.102, batch mean 0.0007. What the mean bound guards: a
# one-level offset (a wrong mean) is a mean difference of 0.0078, a std 1 % off 0.005 to 0.009.
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
        assert a["num_images"] > 0 and a["pixel_values"].shape == b["pixel_values"].shape  # no broadcasting
        difference = (a["pixel_values"] - b["pixel_values"]).abs()
        real = difference.permute(1, 0, 2, 3)[:, a["pixel_attention_mask"]]  # the images' pixels, not padding
        measured = f"max {difference.max():.4f}, mean {real.mean():.5f}"
        assert difference.max() <= MAX_ABS_BOUND and real.mean() <= MEAN_ABS_BOUND, measured


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
    # The parity tests' photos: distinct, and non-square in both orientations (the resize rules take the
    # longest edge, H or W; H and W swapped anywhere in the DALI graph shows only on non-square ones).
    photos = encoded_photos()
    sizes = [Image.open(BytesIO(data)).size for data in photos]
    assert len(set(photos)) == len(photos) == 7
    assert any(width > height for width, height in sizes) and any(height > width for width, height in sizes)


# --- where the images live ------------------------------------------------------------------------

LAUNCHER_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMI_RANK",
    "PMI_SIZE", "MPI_LOCALRANKID", "PMI_LOCAL_RANK",
)  # fmt: skip


@pytest.fixture
def cuda_claimed(monkeypatch):
    """A CPU host that claims CUDA (the capability check forced), with no launcher variables set."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU host the real device decides: see test_mixed_decoding_stays_on_this_rank_gpu")
    monkeypatch.setattr(backend, "has_cuda", lambda: True)
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "environment, local_rank",
    [
        ({"RANK": "7", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, 3),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, 1),
        ({"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}, 2),
        ({}, 0),  # a lone process
    ],
    ids=["torchrun", "slurm", "openmpi", "single"],
)
def test_mixed_decoding_device_is_the_local_rank(cuda_claimed, environment, local_rank):
    for name, value in environment.items():
        cuda_claimed.setenv(name, value)
    assert dali.decoding_device_id() == local_rank


def test_dali_gpu_pipeline_is_built_on_the_local_rank_gpu(cuda_claimed):
    """Through the loader's entry point: the 'mixed' graph is valid and is built for local rank 3's
    GPU (the build itself then fails here, naming that device, since there is no CUDA driver)."""
    for name, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}.items():
        cuda_claimed.setenv(name, value)
    for name in ("dali-gpu", "auto"):
        with pytest.raises(RuntimeError, match="dali-gpu pipeline on CUDA device 3"):
            image_processor(SMALL_IMAGES, name)


def test_cpu_processors_return_cpu_float32_tensors():
    from transformers import Idefics2ImageProcessorPil

    encoded = encoded_photos()[:3]
    pillow = PillowImageProcessor(SMALL_IMAGES)(encoded)
    dali_cpu = DaliImageProcessor(SMALL_IMAGES, device="cpu")(encoded)
    # The Pillow path is transformers' Pillow-backend processor bit for bit (as in test_image_modes.py).
    size = {"longest_edge": SMALL_IMAGES.longest_edge, "shortest_edge": SMALL_IMAGES.shortest_edge}
    with Image.open(BytesIO(encoded[0])) as photo:
        reference = Idefics2ImageProcessorPil(size=size, do_image_splitting=False)([[photo]], return_tensors="pt")
    pixel_values, mask = pad_images(pillow[0])
    assert torch.equal(mask, reference["pixel_attention_mask"][0].bool())
    assert torch.equal(pixel_values, reference["pixel_values"][0])
    for crops_a, crops_b in zip(pillow, dali_cpu, strict=True):
        for a, b in zip(crops_a, crops_b, strict=True):
            for image in (a, b):
                assert isinstance(image, torch.Tensor) and image.device.type == "cpu" and image.dtype == torch.float32
            difference = (a - b).abs()
            assert a.shape == b.shape and difference.max() <= MAX_ABS_BOUND and difference.mean() <= MEAN_ABS_BOUND


def test_up_scaled_images_decode_alike_in_dali_and_pillow():
    """Training's random up-scaling (data/augment.py) reaches both backends: the same sizes, pixels
    within the bound, and a size that is not the unscaled one."""
    config = ImageConfig(980, 56, split=True)
    encoded = encoded_photos()[:3]
    scales = [1.0, 1.7, 2.6]
    pillow = PillowImageProcessor(config)(encoded, scales)
    dali_cpu = DaliImageProcessor(config, device="cpu")(encoded, scales)
    plain = PillowImageProcessor(config)(encoded)
    for index, (crops_a, crops_b) in enumerate(zip(pillow, dali_cpu, strict=True)):
        assert (crops_a[-1].shape == plain[index][-1].shape) == (scales[index] == 1.0)
        for a, b in zip(crops_a, crops_b, strict=True):
            difference = (a - b).abs()
            assert a.shape == b.shape and difference.max() <= MAX_ABS_BOUND and difference.mean() <= MEAN_ABS_BOUND


def test_pad_images_allocates_where_the_images_live():
    images = [torch.randn(3, 5, 7, dtype=torch.bfloat16), torch.randn(3, 6, 4, dtype=torch.bfloat16)]
    pixel_values, mask = pad_images(images)
    assert pixel_values.dtype == torch.bfloat16 and pixel_values.shape == (2, 3, 6, 7)
    assert torch.equal(pixel_values[0, :, :5, :7], images[0]) and torch.equal(pixel_values[1, :, :6, :4], images[1])
    assert not pixel_values[0, :, 5:].any() and not pixel_values[1, :, :, 4:].any()
    assert mask.sum().item() == 5 * 7 + 6 * 4 and mask[1, :6, :4].all()
    # Meta tensors have a device but no data: the outputs must be allocated there, not on the CPU.
    on_meta = pad_images([image.to("meta") for image in images])
    assert [t.device.type for t in on_meta] == ["meta", "meta"] and on_meta[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="image 1 is torch.float32 on meta"):
        pad_images([images[0].to("meta"), images[1].float().to("meta")])
    with pytest.raises(ValueError, match="image 1 has shape"):
        pad_images([images[0], images[1][0]])


@pytest.mark.gpu
def test_mixed_decoding_stays_on_this_rank_gpu(shards, tokenizer):  # noqa: F811
    import dataclasses

    if not backend.has_dali():
        pytest.skip("NVIDIA DALI is not installed")
    previous = torch.cuda.current_device()
    device = torch.cuda.device_count() - 1  # not GPU 0 where there are several: the choice must follow
    torch.cuda.set_device(device)
    try:
        assert dali.decoding_device_id() == device
        config = ImageConfig(490, 168, split=True)
        gpu = image_processor(config, "dali-gpu")
        assert gpu.name == "dali-gpu" and gpu.device_id == device
        encoded = encoded_photos()
        decoded, reference = gpu(encoded), DaliImageProcessor(config, device="cpu", batch_size=8)(encoded)
        snapshot = [[image.clone() for image in crops] for crops in decoded]
        gpu(encoded[::-1])  # DALI reuses its buffers: what it handed out before must not change
        for crops, crops_cpu, crops_before in zip(decoded, reference, snapshot, strict=True):
            for image, image_cpu, before in zip(crops, crops_cpu, crops_before, strict=True):
                assert image.device == torch.device("cuda", device) and image.dtype == torch.float32
                assert image.shape == image_cpu.shape and torch.equal(image, before)
                difference = (image.cpu() - image_cpu).abs()
                measured = f"max {difference.max():.4f}, mean {difference.mean():.5f}"
                assert difference.max() <= MAX_ABS_BOUND and difference.mean() <= MEAN_ABS_BOUND, measured
        pixel_values, mask = pad_images([crop for crops in decoded for crop in crops])
        assert pixel_values.device == mask.device == torch.device("cuda", device)

        loader_config_ = dataclasses.replace(loader_config(shards), image_backend="dali-gpu")
        batch = next(b for b in MultimodalLoader(loader_config_, tokenizer, 8, 32001) if b["num_images"])
        assert batch["pixel_values"].device == torch.device("cuda", device)
        assert batch["pixel_values"].to(device, non_blocking=True) is batch["pixel_values"]  # the trainer's move
    finally:
        torch.cuda.set_device(previous)
