"""Benchmark (CPU): the share of the model's FLOPs spent on padding, for the paper's image sizes.

Vision tower. Real photos' sizes (scikit-image's, scikit-learn's and matplotlib's sample photos and
the bundled ones, and each rotated a quarter turn: portraits) resized as the paper's stage 1
(longest edge 384, shortest 378) and stage 2 (longest edge 980) data are, drawn in a seeded order
into micro-batches of a few images. Before packing, every image of a micro-batch was padded to the
batch's largest height and width and the encoder ran on the whole padded grid; packed (today: one
sequence per image, ``backbones/siglip.py``) its transformer layers run on the real patches only
(the patch embedding, one convolution, still sees each padded image). Reported: the share of the
encoder + connector FLOPs (the 8B preset's, ``perf/flops.py``) spent on padded patches, both ways.

Decoder. The loader's micro-batches of the bundled data (the tiny mixture, packed documents): the
share of decoder positions that are padding, and of the decoder's FLOPs against those of the real
tokens with causal, document-aware attention: before, each source padded to its sequence length
with dense attention (every row's full score matrix, as the fused-softmax kernels computed it);
now, the documents packed with padding dropped (``attention.DocumentLayout``).

    python bench/padding.py                 # prints the table, writes bench/results/padding.{md,json}
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_vlm.config import load_model_preset  # noqa: E402
from megatron_vlm.data.images import ImageConfig, resized_size  # noqa: E402
from megatron_vlm.perf.flops import decoder_forward_flops, vision_forward_flops, vision_positions  # noqa: E402

STAGES = {"stage 1 (384 px)": ImageConfig(384, 378), "stage 2 (980 px)": ImageConfig(980, 378)}


def photo_sizes() -> list[tuple[int, int]]:
    """(height, width) of real photos available offline, and each rotated: portraits as well."""
    from PIL import Image

    folders = [ROOT / "examples" / "data" / "images"]
    try:
        import skimage

        folders.append(Path(skimage.__file__).parent / "data")
    except ModuleNotFoundError:
        pass
    try:
        import sklearn.datasets

        folders.append(Path(sklearn.datasets.__file__).parent / "images")
    except ModuleNotFoundError:
        pass
    try:
        import matplotlib

        folders.append(Path(matplotlib.get_data_path()) / "sample_data")
    except ModuleNotFoundError:
        pass
    sizes = []
    for folder in folders:
        for path in sorted(folder.glob("*")):
            if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                continue
            with Image.open(path) as image:
                if image.mode not in ("RGB", "RGBA", "P", "L") or min(image.size) < 64:
                    continue
                width, height = image.size
            sizes += [(height, width), (width, height)]
    return sizes


def vision_padding(sizes: list[tuple[int, int]], images_per_batch: int, image: ImageConfig, seed: int = 0) -> dict:
    """Encoder + connector FLOPs of micro-batches of these images: padded to the batch's largest
    height and width (before) and packed (now), and the share spent on padding."""
    config = load_model_preset("idefics2-8b")
    patch = config.vision.patch_size
    order = list(sizes)
    random.Random(seed).shuffle(order)
    resized = [resized_size(h, w, image) for h, w in order]
    real_flops = padded_flops = 0.0
    real_patches = padded_patches = packed_positions = 0
    for start in range(0, len(resized) - images_per_batch + 1, images_per_batch):
        batch = resized[start : start + images_per_batch]
        rows, cols = max(h for h, _ in batch) // patch, max(w for _, w in batch) // patch
        patches = [(h // patch) * (w // patch) for h, w in batch]
        real_patches += sum(patches)
        padded_patches += rows * cols * len(batch)
        # What the packed encoder computes (the trainer's count): each image's own patches.
        packed_positions += vision_positions(config, patches)
        real_flops += sum(vision_forward_flops(config, count) for count in patches)
        padded_flops += len(batch) * vision_forward_flops(config, rows * cols)
    # Packed, only the patch embedding (one convolution over each padded image) still sees padding.
    embedding = 2 * config.vision.num_channels * patch**2 * config.vision.hidden_size
    packed_flops = real_flops + embedding * (padded_patches - real_patches)
    return {
        "images": len(resized) // images_per_batch * images_per_batch,
        "images_per_micro_batch": images_per_batch,
        "padded_patch_share_before": 1 - real_patches / padded_patches,
        "padded_flop_share_before": 1 - real_flops / padded_flops,
        "padded_patch_share_packed": 1 - real_patches / packed_positions,
        "padded_flop_share_packed": 1 - real_flops / packed_flops,
    }


def decoder_padding(micro_batches: int = 48, multiple: int = 8) -> dict:
    """Decoder padding of the loader's micro-batches of the bundled data (the tiny mixture): before,
    every row padded to its source's sequence length under a dense mask (every row's full score
    matrix computed); now, the documents packed (``attention.DocumentLayout``), padding dropped, only
    a filler up to ``multiple`` tokens (TP8 with sequence parallelism), each document's causal pairs."""
    from megatron_vlm.backbones.attention import DocumentLayout
    from megatron_vlm.data.loader import MultimodalLoader, load_data_config
    from megatron_vlm.data.preprocess import preprocess
    from megatron_vlm.data.tokens import load_tokenizer
    from megatron_vlm.perf.flops import attended_keys, document_lengths

    config = load_model_preset("idefics2-8b")
    with tempfile.TemporaryDirectory() as root:
        for name in ("interleaved", "pairs", "pages"):
            preprocess(
                [ROOT / "examples" / "data" / f"{name}.jsonl"], Path(root) / name, samples_per_shard=4, progress=False
            )
        data = load_data_config("tiny", root, micro_batch_size=2, image_backend="pillow")
        loader = MultimodalLoader(data, load_tokenizer(), 64, config.image_token_id)
        positions = tokens = packed = 0
        before = real = now = 0.0
        for _ in range(micro_batches):
            batch = next(loader)
            rows, seq = batch["input_ids"].shape
            lengths = document_lengths(batch["document_ids"])
            attended = sum(attended_keys(n, config.text.sliding_window) for n in lengths)
            total = DocumentLayout.of(batch["document_ids"], multiple).total
            positions += rows * seq
            tokens += sum(lengths)
            packed += total
            before += decoder_forward_flops(config, rows * seq, rows * seq * seq)
            real += decoder_forward_flops(config, sum(lengths), attended)
            now += decoder_forward_flops(config, total, attended + (total - sum(lengths)) ** 2)
    return {
        "micro_batches": micro_batches,
        "padded_position_share": 1 - tokens / positions,
        "padded_flop_share_dense_attention": 1 - real / before,
        "packed_multiple": multiple,
        "padded_position_share_packed": 1 - tokens / packed,
        "padded_flop_share_packed": 1 - real / now,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--images-per-batch", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args(argv)
    sizes = photo_sizes()
    vision = {
        stage: {str(k): vision_padding(sizes, k, image) for k in args.images_per_batch}
        for stage, image in STAGES.items()
    }
    decoder = decoder_padding()
    lines = [
        f"# Padding FLOPs ({date.today().isoformat()}, CPU, `python bench/padding.py`)",
        "",
        f"Vision: {len(sizes)} real photo sizes (sample photos of scikit-image, scikit-learn, matplotlib and "
        "the bundled ones, each also rotated), resized as the stage's data, in seeded micro-batches; FLOPs "
        "of the idefics2-8b encoder + connector. Before: every image padded to the micro-batch's largest "
        "height and width (the layout before packed vision); now: one packed sequence per image, the "
        "positions the encoder computes as the trainer counts them (`perf/flops.vision_positions`; "
        "`tests/test_flops.py` checks the encoder's measured FLOPs on mixed sizes: the transformer layers and "
        "the connector compute the real patches only, the patch embedding (one convolution) the padded grid). "
        "Stage 1 resizes every image to 378-384 px on both sides: one 27x27 grid for all, nothing to pad.",
        "",
        "| image sizes | images per micro-batch | padded patches (before) | padding FLOPs (before) | "
        "padded patches in the transformer (packed, now) | padding FLOPs (now: the patch embedding's) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for stage, by_count in vision.items():
        for count, row in by_count.items():
            lines.append(
                f"| {stage} | {count} | {100 * row['padded_patch_share_before']:.1f}% | "
                f"{100 * row['padded_flop_share_before']:.1f}% | {100 * row['padded_patch_share_packed']:.1f}% | "
                f"{100 * row['padded_flop_share_packed']:.2f}% |"
            )
    lines += [
        "",
        f"Decoder: {decoder['micro_batches']} micro-batches of 2 from the loader on the bundled data (tiny "
        "mixture: packed documents); idefics2-8b decoder FLOPs. Before: each source padded to its sequence "
        "length under a dense mask (every row's full score matrix computed). Now: the documents packed "
        "(`attention.DocumentLayout`), padding dropped, each document's causal pairs, a filler sequence up to "
        f"a multiple of {decoder['packed_multiple']} tokens (TP{decoder['packed_multiple']} with sequence "
        "parallelism; none at TP1).",
        "",
        "| padded positions (before) | padding FLOPs (before) | padded positions (now) | padding FLOPs (now) |",
        "| --- | --- | --- | --- |",
        f"| {100 * decoder['padded_position_share']:.1f}% | {100 * decoder['padded_flop_share_dense_attention']:.1f}% "
        f"| {100 * decoder['padded_position_share_packed']:.2f}% | {100 * decoder['padded_flop_share_packed']:.2f}% |",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "padding.md").write_text(table)
    (args.out / "padding.json").write_text(json.dumps({"vision": vision, "decoder": decoder}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
