"""Benchmark: what the data work costs a training step, in the loop or prefetched.

The tiny config (examples/tiny_cpu.yaml: its model, micro-batch size, global batch and the bundled
data's tiny mixture) trains in one process on CPU, three ways, in the same run:
  * no data work: the steps' micro-batches made beforehand, held in memory (the compute alone),
  * synchronous (``data.prefetch=0``): each step's micro-batches read, decoded and packed when it starts,
  * prefetch (``data.prefetch=2``): made in the background thread while the previous step trains.
Reported: the median step time of each (the modes take turns in rounds) and its ratio to the
compute alone, and the time to make one step's micro-batches alone. torch runs on ``--torch-threads`` threads (default
1), so that a core is left for the data thread, as it is beside a GPU.

    python bench/prefetch.py [--steps 20] [--out-dir bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode and round (3 rounds)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("MASTER_PORT", "RANK", "WORLD_SIZE"):
        os.environ.pop(name, None)

    import torch
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig

    from megatron_vlm import distributed
    from megatron_vlm.backbones import recipes_of, text_tokens_per_image
    from megatron_vlm.config import load_run_config
    from megatron_vlm.data.loader import MultimodalLoader, load_data_config
    from megatron_vlm.data.preprocess import preprocess
    from megatron_vlm.data.tokens import load_tokenizer
    from megatron_vlm.models.idefics2 import build_model_chunks
    from megatron_vlm.training.data_feed import DataFeed
    from megatron_vlm.training.step import build_optimizer, train_step, wrap_ddp

    torch.set_num_threads(args.torch_threads)
    run = load_run_config(ROOT / "examples" / "tiny_cpu.yaml")
    distributed.initialize(run.parallel, run.model, seed=run.training.seed)
    micro_batches = run.training.global_batch_size // run.data.micro_batch_size
    data_root = Path(tempfile.mkdtemp(prefix="prefetch_bench_"))
    for name in ("interleaved", "pairs", "pages"):
        preprocess([ROOT / "examples" / "data" / f"{name}.jsonl"], data_root / name, progress=False)
    tokenizer = load_tokenizer(name=recipes_of(run.model)[2].tokenizer)
    vision = recipes_of(run.model)[0]
    data = load_data_config(
        run.data.mixture,
        data_root,
        normalization=(vision.image_mean, vision.image_std),
        micro_batch_size=run.data.micro_batch_size,
        image_backend="pillow",
        seed=run.training.seed,
    )

    def feed(prefetch: int) -> DataFeed:
        loader = MultimodalLoader(
            data,
            tokenizer,
            text_tokens_per_image(run.model),
            run.model.image_token_id,
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(),
            lanes=micro_batches,
        )
        return DataFeed(loader, micro_batches, run.model, prefetch=prefetch)

    chunks = build_model_chunks(run.model, run.parallel, run.precision)
    model = wrap_ddp(chunks)
    optimizer = build_optimizer(model, OptimizerConfig(optimizer="adam", lr=1e-4, clip_grad=1.0))
    # The modes take turns in rounds (each round times --steps steps of every mode, in a rotated
    # order), so that a slow spell of a shared machine falls on all of them; the median step counts.
    warmup, rounds = 3, 3
    total = warmup + rounds * args.steps
    held = feed(0)
    made = [held.next_step().inputs for _ in range(total)]  # the same micro-batches the streams make
    making = []
    for _ in range(args.steps):
        started = time.perf_counter()
        held.next_step()
        making.append(time.perf_counter() - started)
    held.close()
    streams = {"synchronous (prefetch=0)": feed(0), "prefetch=2": feed(2)}
    sources: dict[str, Callable[[int], list]] = {
        "compute only": lambda index: made[index],
        **{label: (lambda index, stream=stream: stream.next_step().inputs) for label, stream in streams.items()},
    }
    times: dict[str, list[float]] = {label: [] for label in sources}
    position = dict.fromkeys(sources, 0)

    def run_steps(label: str, count: int, record: bool) -> None:
        for _ in range(count):
            started = time.perf_counter()
            train_step(model, optimizer, sources[label](position[label]))
            position[label] += 1
            if record:
                times[label].append(time.perf_counter() - started)

    for label in sources:
        run_steps(label, warmup, record=False)
    labels = list(sources)
    for round_index in range(rounds):
        for label in labels[round_index % 3 :] + labels[: round_index % 3]:
            run_steps(label, args.steps, record=True)
    for stream in streams.values():
        stream.close()
    results = {label: statistics.median(values) for label, values in times.items()}
    data_seconds = statistics.median(making)
    distributed.shutdown()

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, " + (
        torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    )
    compute = results["compute only"]
    added = results["synchronous (prefetch=0)"] - compute
    hidden = (results["synchronous (prefetch=0)"] - results["prefetch=2"]) / added if added > 0 else float("nan")
    report = {
        "date": str(date.today()),
        "machine": machine,
        "torch_threads": args.torch_threads,
        "steps_per_round": args.steps,
        "rounds": rounds,
        "micro_batches_per_step": micro_batches,
        "data_seconds_per_step": data_seconds,
        "step_seconds": results,
        "ratio_to_compute_only": {k: v / compute for k, v in results.items()},
        "load_average": os.getloadavg()[0],
        "share_of_data_time_hidden": hidden,
    }
    print(json.dumps(report, indent=2))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "prefetch.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Data loading off the critical path ({report['date']}, {machine})",
        "",
        f"`python bench/prefetch.py --steps {args.steps}`: the tiny config (examples/tiny_cpu.yaml) trained in one "
        f"process on CPU, {micro_batches} micro-batches of {run.data.micro_batch_size} per step, the bundled data's "
        f"tiny mixture decoded with Pillow; torch on {args.torch_threads} thread(s). Median step time over "
        f"3 rounds of {args.steps} steps per mode (the modes take turns, after 3 warm-up steps each), ratio to "
        "the compute alone in the same run.",
        "",
        "| data work | s / step | ratio to compute only |",
        "|---|---|---|",
        *(f"| {k} | {v:.3f} | {v / compute:.2f} |" for k, v in results.items()),
        "",
        f"Making one step's micro-batches alone (read, decode, pack, count): {data_seconds:.3f} s; "
        f"prefetching hid {hidden:.0%} of what the data work added to a step (a thread needs a free core: "
        "beside a GPU the training process's cores wait on the device).",
        f"Load average at the end of the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
        "(above the core count: the cores were shared with other jobs, and single runs vary by several percent).",
        "",
    ]
    (args.out_dir / "prefetch.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
