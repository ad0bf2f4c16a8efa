"""Benchmark: one GPU trains an Idefics2-8B-width proxy in bf16 and in FP8.

The proxy keeps every width of the 8B preset (SigLIP 1152, connector at 4096 with its full
3-layer resampler, Mistral 4096 / 14336 / GQA 32:8, the 32k vocabulary) and cuts the depth of the
vision encoder and the decoder so that the model and Adam state fit one GPU. It trains on
fixed-shape synthetic micro-batches (packed sequences with 378 px images, stage-1 resolution)
through the real training step (Megatron-Core DDP, optimizer, schedule). Reported per
configuration (bf16 / FP8; Megatron-Core's local spec, and Transformer Engine's where it imports;
with ``--compile`` also the local spec with torch.compile): step time, tokens/s, images/s, model
TFLOP/s (``perf.flops``, the trainer's MFU numerator), MFU against the bf16 and FP8 matmul peaks
measured on the same GPU in the same run, peak memory next to the memory model's prediction, and
where the step's time goes: a per-part breakdown from the torch profiler (bench/step_profile.py:
vision, connector, decoder attention / MLP / norms, output layer and loss, optimizer,
communication, host-device copies; GPU idle time; host syncs per step).

FP8 on the local spec runs torch's ``_scaled_mm`` linears (models/fp8.py), on TE's spec TE's FP8.
``--compile`` adds the local spec with torch.compile where it fuses what runs op by op: the norms
of the decoder and vision layers, the decoder's SwiGLU (Megatron-Core's own compiled
``bias_swiglu``, switched on in a copy of each MLP's config) and, in FP8, the linears' scaling and
casts (``precision.compile``).

    python bench/gpu_proxy.py --compile            # on a GPU; writes bench/results/gpu_proxy.{json,md}
    python bench/gpu_proxy.py --smoke --out-dir D  # tiny widths on CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

STARTED = time.perf_counter()  # --time-budget counts from here: the imports below take a while
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402
from megatron.core.optimizer import OptimizerConfig  # noqa: E402
from megatron.core.transformer.mlp import MLP  # noqa: E402
from step_profile import PART_NOTES, PARTS, profile_steps  # noqa: E402

from megatron_vlm import backend, distributed  # noqa: E402
from megatron_vlm.config import ModelConfig, ParallelConfig, PrecisionConfig, load_model_preset  # noqa: E402
from megatron_vlm.data.batch import MODEL_INPUTS  # noqa: E402
from megatron_vlm.models import fp8  # noqa: E402
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


@dataclasses.dataclass(frozen=True)
class Setup:
    """One configuration: layer spec, FP8 recipe (None: bf16), torch.compile or not."""

    spec: str  # "local" (Megatron-Core's local spec, torch kernels) | "te" (Transformer Engine)
    fp8: str | None
    compile: bool = False

    @property
    def name(self) -> str:
        precision = f"fp8 {self.fp8}" if self.fp8 else "bf16"
        return f"{precision} {self.spec}" + (" + compile" if self.compile else "")

    def precision(self) -> PrecisionConfig:
        te = self.spec == "te"
        return PrecisionConfig(
            params_dtype="bfloat16",
            fp8=self.fp8,
            fp8_backend="te" if te else "torch",
            use_transformer_engine=te,
            compile=self.compile and self.fp8 is not None,
        )


def setups(transformer_engine: bool, fp8_on_te: bool, compile: bool) -> list[Setup]:
    """In the order they run (the most wanted first, for a run cut short by its time budget)."""
    chosen = [Setup("local", None), Setup("local", "hybrid")]
    if compile:
        chosen += [Setup("local", "hybrid", compile=True), Setup("local", None, compile=True)]
    if transformer_engine:
        chosen.append(Setup("te", None))
        if fp8_on_te:
            chosen.append(Setup("te", "hybrid"))
    return chosen


def compile_parts(chunks: list[torch.nn.Module]) -> list[str]:
    """torch.compile what the local spec runs op by op; returns what was compiled.

    Norms (torch's LayerNorm / RMSNorm modules of the decoder and vision layers): their forward
    compiled in place. The decoder's SwiGLU: Megatron-Core's fused ``bias_swiglu`` (a torch.compile'd function
    that keeps only its input for backward), switched on in a copy of each gated MLP's config, which
    the local spec leaves off. Anything else (attention, the linears' GEMMs) stays as it is."""
    compiled = []
    for chunk in chunks:
        blocks = [("decoder", chunk.language_model.decoder)]
        encoder = getattr(chunk.vision, "encoder", None) if chunk.vision is not None else None
        if encoder is not None:
            blocks.append(("vision", encoder))
        for label, block in blocks:
            for name, module in block.named_modules():
                if isinstance(module, torch.nn.LayerNorm | torch.nn.RMSNorm):
                    # The forward, not the module's call (nn.Module.compile): the profiler's hooks
                    # around it (step_profile.py) stay outside the compiled code. All norms of a kind
                    # share one compiled graph (dynamic shapes).
                    module.forward = torch.compile(module.forward, dynamic=True)
                    compiled.append(f"{label}.{name}")
                elif isinstance(module, MLP) and label == "decoder":
                    config = module.config
                    swiglu = config.gated_linear_unit and config.activation_func is F.silu
                    plain = config.activation_func_clamp_value is None and not config.glu_linear_offset
                    if swiglu and plain and not config.bias_activation_fusion and not config.use_te_activation_func:
                        module.config = copy.copy(config)
                        module.config.bias_activation_fusion = True
                        compiled.append(f"{label}.{name} (fused SwiGLU)")
    return compiled


@torch.no_grad()  # as inside the linears' autograd function: the same compiled variants, no extra compile
def compiled_casts_equal(device: str) -> bool:
    """Whether the compiled FP8 casts (precision.compile) give the op-by-op casts' bits on this device,
    for the variants training compiles anyway (e4m3 forward casts, the e5m2 gradient cast)."""
    generator = torch.Generator(device=device).manual_seed(0)
    matrix = (torch.randn(200, 1024, generator=generator, device=device) * 3.0).bfloat16()
    compiled = fp8.compiled_casts()
    for name, dtype in (("tensor", fp8.E4M3), ("rows", fp8.E4M3), ("rows_transposed", fp8.E5M2)):
        eager, other = getattr(fp8.EAGER_CASTS, name)(matrix, dtype), getattr(compiled, name)(matrix, dtype)
        for a, b in zip(eager, other, strict=True):
            a, b = (t.view(torch.uint8) if t.element_size() == 1 else t for t in (a, b))
            if a.shape != b.shape or a.stride() != b.stride() or not torch.equal(a, b):
                return False
    return True


def run_setup(
    setup: Setup,
    config: ModelConfig,
    work: Workload,
    micro_batches: int,
    steps: int,
    warmup: int,
    profile: int,
    device: str,
) -> dict:
    started = time.perf_counter()
    precision = setup.precision()
    batches = [synthetic_micro_batch(config, work, seed=i, device=device) for i in range(micro_batches)]
    inputs = [{k: b[k] for k in MODEL_INPUTS} for b in batches]
    flops_per_step = sum(batch_training_flops(config, {k: v.cpu() for k, v in b.items()}) for b in inputs)
    meter = TrainingMemoryMeter()
    meter.start()
    torch.manual_seed(0)  # every configuration starts from the same weights: their losses compare
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    chunks = build_model_chunks(config, ParallelConfig(), precision)
    compiled = compile_parts(chunks) if setup.compile else []
    model = wrap_ddp(chunks)
    optimizer = build_optimizer(
        model, OptimizerConfig(optimizer="adam", lr=1e-5, bf16=True, params_dtype=torch.bfloat16)
    )
    casts_equal = compiled_casts_equal(device) if precision.compile else None
    losses, times = [], []
    first_step_seconds = None
    for step in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = train_step(model, optimizer, inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        if step == 0:
            first_step_seconds = time.perf_counter() - start  # with torch.compile: its compile time
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(result["loss"])
    peak = meter.peak_bytes()
    run_step = functools.partial(train_step, model, optimizer, inputs)
    breakdown = profile_steps(run_step, profile, chunks, model, optimizer, device)
    del model, optimizer, chunks, run_step
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    seconds = sum(times) / len(times)
    tokens = micro_batches * work.micro_batch_size * work.seq_length
    return {
        "name": setup.name,
        "precision": f"fp8 {setup.fp8}" if setup.fp8 else "bf16",
        "spec": setup.spec,
        "compile": setup.compile,
        "fp8_backend": backend.fp8_backend(precision.fp8_backend) if setup.fp8 else None,
        "compiled": compiled + (["fp8 linears' casts (precision.compile)"] if precision.compile else []),
        "compiled_casts_equal": casts_equal,
        "seconds_per_step": seconds,
        "first_step_seconds": first_step_seconds,
        "tokens_per_second": tokens / seconds,
        "images_per_second": micro_batches * work.images / seconds,
        "model_tflops_per_second": flops_per_step / seconds / 1e12,
        "peak_memory_gib": peak / 2**30,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "breakdown": breakdown,
        "wall_seconds": time.perf_counter() - started,
    }


def skip_reason(setup: Setup, done: list[dict], started: float, budget: float | None) -> str | None:
    """Why not to start ``setup`` within the time budget: it would likely not finish (estimated
    from the longest run without compile so far, plus 40 s of compiling for the first compiled one:
    the later ones reuse its compiled code)."""
    if budget is None or not done:
        return None
    eager = [run["wall_seconds"] for run in done if not run["compile"]] or [run["wall_seconds"] for run in done]
    estimate = 1.1 * max(eager)
    if setup.compile and not any(run["compile"] for run in done):
        estimate += 40.0
    left = budget - (time.perf_counter() - started)
    if left < estimate:
        return f"time budget: {left:.0f} s left of {budget:.0f} s, the run needs about {estimate:.0f} s"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--images", type=int, default=8, help="images per micro-batch")
    parser.add_argument("--image-side", type=int, default=378)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--profile-steps", type=int, default=2, help="steps profiled for the breakdown, after the timed ones"
    )
    parser.add_argument("--compile", action="store_true", help="also the local spec with torch.compile (bf16 and FP8)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds: skip (and report) configurations that would not finish",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny widths, CPU allowed: checks the script")
    parser.add_argument("--out-dir", type=Path, default=None, help="default bench/results (not with --smoke)")
    args = parser.parse_args()
    device = "cuda" if backend.has_cuda() else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("this benchmark needs a GPU (use --smoke to check the script on CPU)")
    if args.smoke:
        if args.out_dir is None:
            raise SystemExit("--smoke: give --out-dir (bench/results holds the GPU measurements)")
        args.seq_length, args.images, args.image_side, args.steps, args.warmup = 128, 2, 56, 1, 0
        args.micro_batches, args.profile_steps = 1, 1  # FP8 GEMMs are slow on CPU: one micro-batch
    out_dir = args.out_dir or ROOT / "bench" / "results"
    for name in ("steps", "profile_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")

    config = proxy_config(args.text_layers, args.vision_layers, args.smoke)
    parallel = ParallelConfig()
    distributed.initialize(parallel, config)
    patch = config.vision.patch_size
    work = Workload(args.micro_batch_size, args.seq_length, args.images, (args.image_side // patch) ** 2)
    peak_size = 8192 if device == "cuda" else 256
    peak_seconds = 1.0 if device == "cuda" else 0.2
    peaks = {
        "bf16": measured_matmul_tflops(torch.bfloat16, device, size=peak_size, seconds=peak_seconds),
        "fp8": measured_matmul_tflops(torch.float8_e4m3fn, device, size=peak_size, seconds=peak_seconds),
    }
    setup = TrainingSetup(parallel=parallel, num_microbatches=args.micro_batches, params_dtype="bfloat16")
    predicted = predict_stage_memory(config, setup, work, 0)
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
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "profiled_steps": args.profile_steps,
        },
        "matmul_peak_tflops": peaks,
        "runs": [],
        "skipped": [],
        "failed": [],
        # inputs were allocated before the meter started
        "predicted_bf16_peak_memory_gib": (predicted.peak - predicted.inputs) / 2**30,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "gpu_proxy_smoke" if args.smoke else "gpu_proxy"
    fp8_on_te = result["transformer_engine"] and backend.has_fp8()
    for chosen in setups(result["transformer_engine"], fp8_on_te, args.compile):
        reason = skip_reason(chosen, result["runs"], STARTED, args.time_budget)
        if reason:
            result["skipped"].append({"name": chosen.name, "reason": reason})
            print(f"skipped {chosen.name}: {reason}", flush=True)
            continue
        print(f"running {chosen.name}", flush=True)
        try:
            run = run_setup(
                chosen, config, work, args.micro_batches, args.steps, args.warmup, args.profile_steps, device
            )
        except Exception as error:  # one configuration failing (e.g. a compile error) must not hide the others
            result["failed"].append({"name": chosen.name, "error": f"{type(error).__name__}: {error}"[:2000]})
            print(f"FAILED {chosen.name}: {type(error).__name__}: {error}", flush=True)
            gc.collect()
            continue
        run["mfu_vs_bf16_peak"] = run["model_tflops_per_second"] / peaks["bf16"]
        run["mfu_vs_fp8_peak"] = run["model_tflops_per_second"] / peaks["fp8"]
        result["runs"].append(run)
        # Written after every configuration, so a run stopped at its time limit keeps what it measured.
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
        (out_dir / f"{name}.md").write_text(markdown(result))
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out_dir / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    distributed.shutdown()
    if result["failed"]:
        raise SystemExit(f"{len(result['failed'])} configuration(s) failed: {[f['name'] for f in result['failed']]}")


def markdown(result: dict) -> str:
    proxy = result["proxy"]
    lines = [
        f"# Idefics2-8B-width proxy on one GPU ({result['device']}, {result['date']})",
        "",
        f"Proxy: full 8B widths, {proxy['text_layers']} decoder and {proxy['vision_layers']} vision layers, full resampler "
        f"({proxy['parameters'] / 1e9:.2f} B parameters). Step: {proxy['micro_batches_per_step']} micro-batches of "
        f"{proxy['micro_batch_size']} x {proxy['seq_length']} tokens with {proxy['images_per_micro_batch']} images of "
        f"{proxy['image_side']} px each; Adam with fp32 main weights and grads. Timed: {proxy['timed_steps']} steps after "
        f"{proxy['warmup_steps']} warm-up steps; then {proxy['profiled_steps']} profiled. "
        f"torch {result['torch']}, Transformer Engine: {'yes' if result['transformer_engine'] else 'no'}.",
        "",
        f"Matmul peaks measured in this run (8192^3): bf16 {result['matmul_peak_tflops']['bf16']:.0f} TFLOP/s, "
        f"FP8 e4m3 {result['matmul_peak_tflops']['fp8']:.0f} TFLOP/s.",
        "",
        "| configuration | s/step | tokens/s | images/s | model TFLOP/s | MFU vs bf16 peak | MFU vs FP8 peak | peak memory GiB | loss first -> last |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in result["runs"]:
        backend_name = f" ({run['fp8_backend']})" if run["fp8_backend"] else ""
        lines.append(
            f"| {run['name']}{backend_name} | {run['seconds_per_step']:.3f} | {run['tokens_per_second']:.0f} | "
            f"{run['images_per_second']:.1f} | {run['model_tflops_per_second']:.1f} | {100 * run['mfu_vs_bf16_peak']:.1f}% | "
            f"{100 * run['mfu_vs_fp8_peak']:.1f}% | {run['peak_memory_gib']:.2f} | {run['first_loss']:.3f} -> {run['last_loss']:.3f} |"
        )
    for entry in result["skipped"]:
        lines.append(f"| {entry['name']} | skipped: {entry['reason']} | | | | | | | |")
    for entry in result["failed"]:
        lines.append(f"| {entry['name']} | FAILED: {entry['error'][:300]} | | | | | | | |")
    if result["runs"]:
        lines += breakdown_table(result["runs"])
        compiled = [run for run in result["runs"] if run["compiled"]]
        for run in compiled:
            lines.append(
                f"- {run['name']}: compiled {len(run['compiled'])} parts ({', '.join(run['compiled'][:4])}"
                f"{', ...' if len(run['compiled']) > 4 else ''}); first step {run['first_step_seconds']:.1f} s"
                + (
                    ""
                    if run["compiled_casts_equal"] is None
                    else f"; compiled FP8 casts bit-equal to the op-by-op ones: {run['compiled_casts_equal']}"
                )
                + "."
            )
        bf16 = next((run for run in result["runs"] if run["name"] == "bf16 local"), None)
        if bf16 is not None:
            lines += [
                "",
                f"Memory model (bf16, local kernels): predicted {result['predicted_bf16_peak_memory_gib']:.2f} GiB, "
                f"measured {bf16['peak_memory_gib']:.2f} GiB (allocator peak above the level before the model was "
                f"built): ratio {result['predicted_bf16_peak_memory_gib'] / bf16['peak_memory_gib']:.3f}.",
            ]
    lines.append("")
    return "\n".join(lines)


def breakdown_table(runs: list[dict]) -> list[str]:
    """Milliseconds per step of each part, from the profiled steps (bench/step_profile.py)."""
    basis = runs[0]["breakdown"]["time_basis"]
    on_gpu = "device_idle_seconds" in runs[0]["breakdown"]
    columns = [*PARTS, "sum"] + (["GPU idle"] if on_gpu else [])
    lines = [
        "",
        f"Where a step's time goes, ms per step ({basis}; profiled steps, whose wall time includes the "
        "profiler's overhead). Host syncs: " + runs[0]["breakdown"]["host_syncs"]["method"] + ".",
        "",
        "| configuration | profiled s/step | " + " | ".join(columns) + " | host syncs / step |",
        "| --- | --- | " + " | ".join("---" for _ in columns) + " | --- |",
    ]
    for run in runs:
        breakdown = run["breakdown"]
        cells = [f"{1e3 * breakdown['parts'][part]:.1f}" for part in PARTS]
        cells.append(f"{1e3 * breakdown['accounted_seconds']:.1f}")
        if on_gpu:
            cells.append(f"{1e3 * breakdown.get('device_idle_seconds', 0.0):.1f}")
        lines.append(
            f"| {run['name']} | {breakdown['seconds_per_step']:.3f} | " + " | ".join(cells) + f" | "
            f"{breakdown['host_syncs']['per_step']:.0f} |"
        )
    lines += ["", "Parts: " + "; ".join(f"{part}: {note}" for part, note in PART_NOTES.items()) + "."]
    for run in runs:
        causes = run["breakdown"]["host_syncs"]["by_cause"]
        if causes:
            top = ", ".join(f"{cause} x{count:g}" for cause, count in list(causes.items())[:6])
            lines.append(f"- host syncs of {run['name']}: {top}")
    return lines


if __name__ == "__main__":
    main()
