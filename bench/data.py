"""Benchmark: image processing throughput per CPU worker and token waste with/without packing.

Images: the bundled real photos (JPEG and PNG, several aspect ratios), decoded from their bytes
and processed to model inputs, one worker (one thread) each:
  * baseline: transformers' Idefics2ImageProcessor (Pillow backend) on Pillow-decoded images,
  * ours: the Pillow path and the DALI CPU pipeline (``num_threads=1``).
Packing: micro-batches of the stage 2 mixture (sequence lengths 2048 / 1536 / 1024) from the
bundled shards, with 64 latents per image; the share of token slots holding real tokens.
DALI 'mixed' (GPU) decoding needs a GPU and is measured only where one is present.

    python bench/data.py
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_vlm import backend  # noqa: E402
from megatron_vlm.data.dali import DaliImageProcessor, PillowImageProcessor  # noqa: E402
from megatron_vlm.data.images import ImageConfig  # noqa: E402
from megatron_vlm.data.loader import MultimodalLoader, load_data_config  # noqa: E402
from megatron_vlm.data.preprocess import preprocess  # noqa: E402
from megatron_vlm.data.tokens import load_tokenizer  # noqa: E402

DATA = ROOT / "examples" / "data"


def photos(repeats: int) -> list[bytes]:
    files = sorted((DATA / "images").iterdir())
    return [f.read_bytes() for f in files] * repeats


def images_per_second(process: object, encoded: list[bytes], rounds: int = 3) -> float:
    process(encoded[:4])  # warm-up (pipeline build, caches)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        process(encoded)
        best = min(best, time.perf_counter() - start)
    return len(encoded) / best


def transformers_processor(config: ImageConfig) -> object:
    from PIL import Image
    from transformers import Idefics2ImageProcessor

    processor = Idefics2ImageProcessor(
        size={"longest_edge": config.longest_edge, "shortest_edge": config.shortest_edge},
        do_image_splitting=config.split,
    )

    def run(encoded: list[bytes]) -> object:
        return processor([[Image.open(io.BytesIO(data)).convert("RGB")] for data in encoded], return_tensors="pt")

    return run


def image_throughput(repeats: int) -> list[dict]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    encoded = photos(repeats)
    rows = []
    for name, config in (
        ("stage1 384px", ImageConfig(384, 378)),
        ("stage2 980px", ImageConfig(980, 378)),
        ("stage2 980px + split", ImageConfig(980, 378, split=True)),
    ):
        baseline = images_per_second(transformers_processor(config), encoded)
        pillow = images_per_second(PillowImageProcessor(config), encoded)
        dali = images_per_second(DaliImageProcessor(config, device="cpu", num_threads=1, batch_size=32), encoded)
        row = {
            "config": name,
            "images": len(encoded),
            "transformers_img_s": round(baseline, 1),
            "pillow_img_s": round(pillow, 1),
            "dali_cpu_img_s": round(dali, 1),
            "pillow_ratio": round(pillow / baseline, 2),
            "dali_cpu_ratio": round(dali / baseline, 2),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def token_waste(micro_batches: int) -> list[dict]:
    shards = Path(tempfile.mkdtemp(prefix="data-bench-"))
    for name in ("interleaved", "pairs", "pages"):
        preprocess([DATA / f"{name}.jsonl"], shards / name, progress=False)
    config = load_data_config("stage2", shards, micro_batch_size=2, image_backend="pillow")
    mapping = {"obelics": "interleaved", "pairs": "pairs", "pdfs": "pages"}
    config = dataclasses.replace(
        config,
        image=ImageConfig(224, 112),
        sources=tuple(dataclasses.replace(s, shards=str(shards / mapping[s.name])) for s in config.sources),
    )
    tokenizer = load_tokenizer()
    rows = []
    for pack in (False, True):
        loader = MultimodalLoader(dataclasses.replace(config, pack=pack), tokenizer, 64, 32001)
        real = slots = 0
        for _ in range(micro_batches):
            batch = next(loader)
            real += batch["num_tokens"]
            slots += batch["input_ids"].numel()
        row = {
            "packing": pack,
            "micro_batches": micro_batches,
            "real_token_share": round(real / slots, 4),
            "padding_share": round(1 - real / slots, 4),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    images = image_throughput(repeats=4)
    waste = token_waste(micro_batches=40)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU"
    gpu_note = "not measured: no GPU in this run" if not backend.has_cuda() else "see the GPU section"
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.json").write_text(
        json.dumps(
            {"date": str(date.today()), "machine": machine, "images": images, "packing": waste, "dali_mixed": gpu_note},
            indent=2,
        )
    )
    lines = [
        f"# Data pipeline benchmark ({date.today()}, {machine})",
        "",
        "Images per second for one worker (one thread), bundled real photos decoded from bytes; ratio against",
        "transformers' Idefics2ImageProcessor in the same run.",
        "",
        "| config | images | transformers img/s | Pillow img/s (ratio) | DALI CPU img/s (ratio) |",
        "|---|---|---|---|---|",
    ]
    for r in images:
        lines.append(
            f"| {r['config']} | {r['images']} | {r['transformers_img_s']} | {r['pillow_img_s']} ({r['pillow_ratio']}) | "
            f"{r['dali_cpu_img_s']} ({r['dali_cpu_ratio']}) |"
        )
    lines += [
        "",
        "Token slots holding real tokens, stage 2 mixture (2048 / 1536 / 1024), 64 tokens per image:",
        "",
        "| packing | micro-batches | real tokens | padding |",
        "|---|---|---|---|",
    ]
    for r in waste:
        lines.append(
            f"| {'on' if r['packing'] else 'off'} | {r['micro_batches']} | {r['real_token_share']:.1%} | {r['padding_share']:.1%} |"
        )
    lines += ["", f"DALI 'mixed' GPU decoding at 980 px: {gpu_note}."]
    (out / "data.md").write_text("\n".join(lines) + "\n")
    print((out / "data.md").read_text())


if __name__ == "__main__":
    main()
