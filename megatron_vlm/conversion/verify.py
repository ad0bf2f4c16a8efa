"""Numerical parity of our Megatron model with its family's transformers model (Idefics2's
``Idefics2ForConditionalGeneration``, Idefics3's, Idefics1's: ``conversion/families``).

``python -m megatron_vlm.conversion.verify --preset tiny`` builds a random HF model of the preset,
loads it into the Megatron model through the mapping table, runs both on a batch mixing images of
several aspect ratios, a text-only row and padding, and reports the largest logit difference
(non-zero exit above the tolerance). The pieces are shared with the tests; the batch and the
Megatron inputs come from ``data/batch.py`` (the one micro-batch format), the HF side is here.

On a GPU host the Megatron model lives on CUDA (``build_model_chunks``): its inputs are moved to
its device (``on_model_device``), its logits come back to the CPU, and transformers' reference
runs on the CPU, with TF32 off so that both sides compute in true float32.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_vlm.backbones import recipes_of
from megatron_vlm.config import ModelConfig, ParallelConfig, PrecisionConfig, load_model_preset
from megatron_vlm.conversion.families import family, family_of
from megatron_vlm.conversion.mapping import load_hf_weights
from megatron_vlm.data.batch import Batch, make_batch, megatron_inputs
from megatron_vlm.models.idefics2 import build_model_chunks, gather_logits

# Both models compute in float32 on the same weights (the checkpoint's, in its dtype), so what is
# left is float32 rounding in a different order: measured ~3e-7 on the tiny model (fp32 and bf16).
DEFAULT_TOLERANCE = 1e-4


def random_hf_model(config: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """The family's transformers model of this config, randomly initialised (fp32, eval)."""
    family = family_of(config)
    torch.manual_seed(seed)
    model = family.hf_model_class()(family.to_hf_config(config)).float().eval()
    # HF initialises norms to 1, latents to 1 and gates to 0: randomise them so the mapping of every
    # tensor shows.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "latents" in name or name.endswith(".bias") or "alpha" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def hf_inputs(batch: Batch, config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """A synthetic batch as the family's transformers model takes it (Idefics2's when ``config`` is None)."""
    return family(config.family if config is not None else "idefics2").hf_inputs(batch)


@torch.no_grad()
def hf_logits(model: torch.nn.Module, batch: Batch, config: ModelConfig | None = None) -> torch.Tensor:
    return model(**hf_inputs(batch, config)).logits


def model_device(chunks: Sequence[torch.nn.Module]) -> torch.device:
    """Where the model's inputs must live: the device of its first parameter (CUDA on a GPU host,
    where ``build_model_chunks`` moves the model)."""
    return next(chunks[0].parameters()).device


def on_model_device(chunks: Sequence[torch.nn.Module], inputs: dict[str, Any]) -> dict[str, Any]:
    """The model's inputs moved to the model's device (non-tensors as they are)."""
    device = model_device(chunks)
    return {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}


@contextlib.contextmanager
def true_float32() -> Iterator[None]:
    """TF32 off for matmuls and convolutions (cuDNN convolutions use TF32 by default), so a
    float32 comparison on a GPU is one (restored on exit)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


# --------------------------------------------------------------------------------------------
# Converted checkpoints: HF directory vs Megatron directory on real photos
# --------------------------------------------------------------------------------------------

PROMPTS = (
    ("<image>A cat looks at the camera.", 1),
    ("Two photos: <image> and <image> show a cup of coffee and an astronaut.", 2),
    ("A caption without any image, padded at the end.", 0),
    ("<image>The same cat, turned on its side.", 1),
)


def default_photos() -> list[Any]:
    """Real photos of several aspect ratios that ship with scikit-image (one rotated: portrait)."""
    from PIL import Image

    try:
        import skimage
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("default photos come from scikit-image; install it or pass --images") from error
    folder = Path(skimage.__file__).parent / "data"
    chelsea = Image.open(folder / "chelsea.png").convert("RGB")  # 300 x 451
    coffee = Image.open(folder / "coffee.png").convert("RGB")  # 400 x 600
    astronaut = Image.open(folder / "astronaut.png").convert("RGB")  # 512 x 512
    return [chelsea, coffee, astronaut, chelsea.transpose(Image.Transpose.ROTATE_90)]


def processor_inputs(
    config: ModelConfig, photos: list[Any], tokenizer_dir: str | Path | None = None
) -> tuple[dict, dict]:
    """Tokenise the prompts and process the photos as the family's transformers processor does;
    returns (HF inputs, Megatron inputs) for the same batch."""
    from megatron_vlm.data.tokens import load_tokenizer
    from megatron_vlm.inference.prompts import prompt_encoder

    tokenizer = load_tokenizer(tokenizer_dir, name=recipes_of(config)[2].tokenizer)
    encoder = prompt_encoder(config, tokenizer, do_image_splitting=False)
    photos = list(photos)
    images, texts = [], []
    for index, (text, count) in enumerate(PROMPTS):
        images.append([photos[(index + k) % len(photos)] for k in range(count)])
        texts.append(text)
    return encoder.encode(texts, images)


def verify_checkpoints(
    hf_dir: str | Path,
    megatron_dir: str | Path,
    parallel: ParallelConfig,
    photos: list[Any] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """Collective over the initialised layout: logits of both models on the same real photos and
    text. Every rank returns the same result.

    Like is compared with like: transformers' model is loaded in the checkpoint's dtype (so a
    bfloat16 conversion of a float32 source is checked against the same bfloat16-rounded
    weights, not against the float32 ones it was rounded from), then both models compute in
    float32, on whatever device each lives on; the tolerance therefore holds for every dtype."""
    from megatron.core import parallel_state

    from megatron_vlm.distributed import collective_device
    from megatron_vlm.models.checkpoint_io import load_model, model_config_of, read_metadata
    from megatron_vlm.models.pipeline import forward_logits

    metadata = read_metadata(megatron_dir)
    config, dtype = model_config_of(metadata), metadata["dtype"]
    tokenizer_dir = hf_dir if (Path(hf_dir) / "tokenizer_config.json").is_file() else None
    hf_inputs_, megatron_inputs_ = processor_inputs(config, photos or default_photos(), tokenizer_dir)
    chunks = build_model_chunks(
        config,
        parallel,
        PrecisionConfig(params_dtype="float32", use_transformer_engine=False),
        initialize_weights=False,
    )
    load_model(chunks, megatron_dir, config)
    with true_float32():
        ours = forward_logits(chunks, on_model_device(chunks, megatron_inputs_), config.text.vocab_size)
    result = torch.zeros(3, dtype=torch.float64)
    if (
        ours is not None
        and parallel_state.get_tensor_model_parallel_rank() == parallel_state.get_data_parallel_rank() == 0
    ):
        ours = ours.float().cpu()
        hf = family_of(config).hf_model_class().from_pretrained(str(hf_dir), dtype=getattr(torch, dtype))
        hf = hf.float().eval()  # the checkpoint's weights, computed in float32 on the CPU
        with torch.no_grad():
            reference = hf(**hf_inputs_).logits
        valid = hf_inputs_["attention_mask"].bool()
        result[0] = (ours - reference)[valid].abs().max()
        result[1] = (ours.argmax(-1) == reference.argmax(-1))[valid].double().mean()
        result[2] = 1.0
    result = result.to(collective_device())  # NCCL reduces CUDA tensors only
    torch.distributed.all_reduce(result)  # exactly one rank filled it in
    result = result.cpu()
    return {
        "max_abs_diff": float(result[0]),
        "top1_agreement": float(result[1]),
        "dtype": dtype,
        "compute_dtype": "float32",
        "tolerance": tolerance,
        "passed": bool(result[0] <= tolerance),
        "images": int(megatron_inputs_["pixel_values"].shape[0]),
        "tokens": int(hf_inputs_["attention_mask"].sum()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="model preset name or YAML path (default: tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from megatron_vlm import distributed

    config = load_model_preset(args.preset)
    distributed.initialize(ParallelConfig(), config)
    try:
        hf = random_hf_model(config, args.seed)
        state = hf.state_dict()
        (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
        load_hf_weights([model], state.__getitem__, set(state), config, 0, 1)
        synthetic = getattr(family_of(config), "synthetic_batch", None)
        if synthetic is not None:  # a family whose model takes other images (Idefics3: full squares only)
            batch = synthetic(config, seed=args.seed)
        else:
            batch = make_batch(config, seed=args.seed, seq_len=max(48, 4 + 2 * (config.connector.num_latents + 4)))
        reference = hf_logits(hf, batch, config)
        with torch.no_grad(), true_float32():
            logits = model.eval()(**on_model_device([model], megatron_inputs(batch)))
            ours = gather_logits(logits, config.text.vocab_size).cpu()
        valid = batch.padding.bool()
        difference = float((ours - reference)[valid].abs().max())
        images = sum(len(row) for row in batch.images_per_row)
        print(
            f"preset {args.preset}: {images} images of sizes {[s for r in batch.images_per_row for s in r]}, "
            f"{len(batch.images_per_row)} rows x {batch.input_ids.shape[1]} tokens; "
            f"max |logits - HF| = {difference:.3e} (tolerance {args.tolerance:.0e}); "
            f"top-1 agreement {float((ours.argmax(-1) == reference.argmax(-1))[valid].float().mean()):.4f}"
        )
    finally:
        distributed.shutdown()
    return 0 if difference <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
