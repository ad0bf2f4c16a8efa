"""Benchmark: one GPU trains an Idefics2-8B-width proxy in bf16 and in FP8.

The proxy keeps every width of the 8B preset (SigLIP 1152, connector at 4096 with its full
3-layer resampler, Mistral 4096 / 14336 / GQA 32:8, the 32k vocabulary) and cuts the depth of the
vision encoder and the decoder so that the model and Adam state fit one GPU. It trains on
fixed-shape synthetic micro-batches (packed sequences with 378 px images, stage-1 resolution)
through the real training step (Megatron-Core DDP, optimizer, schedule). Reported per precision:
step time, tokens/s, images/s, model TFLOP/s (``perf.flops``, the trainer's MFU numerator), MFU
against the bf16 and FP8 matmul peaks measured on the same GPU in the same run, and peak memory
next to the memory model's prediction.

FP8 runs Transformer Engine where it imports, else torch's ``_scaled_mm`` linears (models/fp8.py).

    python bench/gpu_proxy.py                      # on a GPU; writes bench/results/gpu_proxy.{json,md}
    python bench/gpu_proxy.py --smoke              # tiny widths on CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from megatron.core.optimizer import OptimizerConfig  # noqa: E402

from megatron_vlm import backend, distributed  # noqa: E402
from megatron_vlm.config import ModelConfig, ParallelConfig, PrecisionConfig, load_model_preset  # noqa: E402
from megatron_vlm.data.batch import MODEL_INPUTS  # noqa: E402
from megatron_vlm.models.idefics2 import build_model_chunks  # noqa: E402
from megatron_vlm.perf.flops import batch_training_flops, measured_matmul_tflops  # noqa: E402
from megatron_vlm.perf.memory import TrainingMemoryMeter  # noqa: E402
from megatron_vlm.perf.memory_model import TrainingSetup, Workload, model_parameters, predict_stage_memory  # noqa: E402
from megatron_vlm.perf.workload import synthetic_micro_batch  # noqa: E402
from megatron_vlm.training.step import build_optimizer, train_step, wrap_ddp  # noqa: E402


def proxy_config(text_layers: int, vision_layers: int, smoke: bool) -> ModelConfig:
    config = load_model_preset("tiny" if smoke else "idefics2-8b")
    return dataclasses.replace(
        config,
        text=dataclasses.replace(config.text, num_layers=text_layers),
        vision=dataclasses.replace(config.vision, num_layers=vision_layers),
    )


def run_precision(
    config: ModelConfig, fp8: str | None, work: Workload, micro_batches: int, steps: int, warmup: int, device: str
) -> dict:
    precision = PrecisionConfig(params_dtype="bfloat16", fp8=fp8)
    batches = [synthetic_micro_batch(config, work, seed=i, device=device) for i in range(micro_batches)]
    inputs = [{k: b[k] for k in MODEL_INPUTS} for b in batches]
    flops_per_step = sum(batch_training_flops(config, {k: v.cpu() for k, v in b.items()}) for b in inputs)
    meter = TrainingMemoryMeter()
    meter.start()
    chunks = build_model_chunks(config, ParallelConfig(), precision)
    model = wrap_ddp(chunks)
    optimizer = build_optimizer(
        model, OptimizerConfig(optimizer="adam", lr=1e-5, bf16=True, params_dtype=torch.bfloat16)
    )
    losses, times = [], []
    for step in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = train_step(model, optimizer, inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(result["loss"])
    peak = meter.peak_bytes()
    del model, optimizer, chunks
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    seconds = sum(times) / len(times)
    tokens = micro_batches * work.micro_batch_size * work.seq_length
    return {
        "precision": "fp8 " + fp8 if fp8 else "bf16",
        "fp8_backend": backend.fp8_backend("auto") if fp8 else None,
        "seconds_per_step": seconds,
        "tokens_per_second": tokens / seconds,
        "images_per_second": micro_batches * work.images / seconds,
        "model_tflops_per_second": flops_per_step / seconds / 1e12,
        "peak_memory_gib": peak / 2**30,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--images", type=int, default=8, help="images per micro-batch")
    parser.add_argument("--image-side", type=int, default=378)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny widths, CPU allowed: checks the script")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    device = "cuda" if backend.has_cuda() else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("this benchmark needs a GPU (use --smoke to check the script on CPU)")
    if args.smoke:
        args.seq_length, args.images, args.image_side, args.steps, args.warmup = 128, 2, 56, 1, 0
        args.micro_batches = 2

    config = proxy_config(args.text_layers, args.vision_layers, args.smoke)
    parallel = ParallelConfig()
    distributed.initialize(parallel, config)
    patch = config.vision.patch_size
    work = Workload(args.micro_batch_size, args.seq_length, args.images, (args.image_side // patch) ** 2)
    peak_size = 8192 if device == "cuda" else 256
    peaks = {
        "bf16": measured_matmul_tflops(
            torch.bfloat16, device, size=peak_size, seconds=2.0 if device == "cuda" else 0.2
        ),
        "fp8": measured_matmul_tflops(
            torch.float8_e4m3fn, device, size=peak_size, seconds=2.0 if device == "cuda" else 0.2
        ),
    }
    runs = [
        run_precision(config, fp8, work, args.micro_batches, args.steps, args.warmup, device)
        for fp8 in (None, "hybrid")
    ]
    for run in runs:
        run["mfu_vs_bf16_peak"] = run["model_tflops_per_second"] / peaks["bf16"]
        run["mfu_vs_fp8_peak"] = run["model_tflops_per_second"] / peaks["fp8"]
    setup = TrainingSetup(parallel=parallel, num_microbatches=args.micro_batches, params_dtype="bfloat16")
    predicted = predict_stage_memory(config, setup, work, 0)
    predicted_gib = (predicted.peak - predicted.inputs) / 2**30  # inputs were allocated before the meter started
    result = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformer_engine": backend.has_transformer_engine(),
        "proxy": {
            "text_layers": args.text_layers,
            "vision_layers": args.vision_layers,
            "parameters": model_parameters(config),
            "micro_batch_size": args.micro_batch_size,
            "micro_batches_per_step": args.micro_batches,
            "seq_length": args.seq_length,
            "images_per_micro_batch": args.images,
            "image_side": args.image_side,
        },
        "matmul_peak_tflops": peaks,
        "runs": runs,
        "predicted_bf16_peak_memory_gib": predicted_gib,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = "gpu_proxy_smoke" if args.smoke else "gpu_proxy"
    (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    (args.out_dir / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    distributed.shutdown()


def markdown(result: dict) -> str:
    proxy = result["proxy"]
    lines = [
        f"# Idefics2-8B-width proxy on one GPU ({result['device']}, {result['date']})",
        "",
        f"Proxy: full 8B widths, {proxy['text_layers']} decoder and {proxy['vision_layers']} vision layers, full resampler "
        f"({proxy['parameters'] / 1e9:.2f} B parameters). Step: {proxy['micro_batches_per_step']} micro-batches of "
        f"{proxy['micro_batch_size']} x {proxy['seq_length']} tokens with {proxy['images_per_micro_batch']} images of "
        f"{proxy['image_side']} px each; Megatron-Core local spec, Adam with fp32 main weights and grads. "
        f"torch {result['torch']}, Transformer Engine: {'yes' if result['transformer_engine'] else 'no'}.",
        "",
        f"Matmul peaks measured in this run (8192^3): bf16 {result['matmul_peak_tflops']['bf16']:.0f} TFLOP/s, "
        f"FP8 e4m3 {result['matmul_peak_tflops']['fp8']:.0f} TFLOP/s.",
        "",
        "| precision | s/step | tokens/s | images/s | model TFLOP/s | MFU vs bf16 peak | MFU vs FP8 peak | peak memory GiB | loss first -> last |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in result["runs"]:
        backend_name = f" ({run['fp8_backend']})" if run["fp8_backend"] else ""
        lines.append(
            f"| {run['precision']}{backend_name} | {run['seconds_per_step']:.3f} | {run['tokens_per_second']:.0f} | "
            f"{run['images_per_second']:.1f} | {run['model_tflops_per_second']:.1f} | {100 * run['mfu_vs_bf16_peak']:.1f}% | "
            f"{100 * run['mfu_vs_fp8_peak']:.1f}% | {run['peak_memory_gib']:.2f} | {run['first_loss']:.3f} -> {run['last_loss']:.3f} |"
        )
    bf16 = result["runs"][0]
    lines += [
        "",
        f"Memory model (bf16, local kernels): predicted {result['predicted_bf16_peak_memory_gib']:.2f} GiB, measured "
        f"{bf16['peak_memory_gib']:.2f} GiB (allocator peak above the level before the model was built): "
        f"ratio {result['predicted_bf16_peak_memory_gib'] / bf16['peak_memory_gib']:.3f}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
