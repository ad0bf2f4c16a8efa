#!/usr/bin/env python
"""Collect a sweep's results.json files into a markdown table and matplotlib plots.

Writes into RESULTS_DIR (or --out): scaling.md (every run, strong and weak scaling efficiency,
predicted against measured memory), throughput.png and mfu.png (against GPUs, one line per
model-parallel layout), scaling_efficiency.png (strong: same global batch on more GPUs; weak:
same batch per data-parallel rank) and memory.png (the memory model's prediction per rank
against the measured peak, with the +-15% band). When the runs compare variants (a sweep's
``variants``, named in its sweep.json, or else the settings in which the runs' configs differ
beyond their layout), scaling is grouped per variant and scaling.md gains a comparison (final and
validation loss, throughput per variant) with loss.png (the training loss curves). Runs scored on
benchmarks during training (``training.benchmarks``) add each task's score at their last evaluation,
the paper's average, and what generating the answers cost (prompt tokens per image, FLOPs per
generated token, decode throughput, peak memory), and the paper's Figure 4: the average against
steps, images seen and text tokens seen (benchmark_steps.png, benchmark_images.png,
benchmark_text_tokens.png), one line per run.

    python tools/analyze_scaling.py runs/sweeps/small
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

GIB = 2**30


# Settings that describe where and how a run ran, not what it trained: never a variant.
LAYOUT_SETTINGS = (
    "parallel.",
    "data.micro_batch_size",
    "data.root",
    "training.global_batch_size",
    "training.output_dir",
)
LAYOUT_SETTINGS += ("training.distributed_optimizer", "training.overlap_grad_reduce", "training.async_save")


def flatten(values: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value and not key.endswith("rope_scaling"):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value
    return flat


def label_variants(results: list[dict], directory: Path) -> None:
    """Set each result's ``variant``: its sweep variant's name (sweep.json), or else the settings in
    which the configs differ beyond layout (``key=value, ...``); none when all trained the same."""
    manifest = directory / "sweep.json"
    named = {}
    if manifest.is_file():
        with contextlib.suppress(OSError, ValueError):
            named = {e["name"]: e["variant"] for e in json.loads(manifest.read_text())["runs"] if "variant" in e}
    if named:
        for result in results:
            result["variant"] = named.get(Path(result["path"]).parent.name, "")
        return
    flat = [flatten(r.get("config") or {}) for r in results]
    keys = sorted({k for f in flat for k in f})
    differing = [
        k
        for k in keys
        if not k.startswith(LAYOUT_SETTINGS) and len({json.dumps(f.get(k), default=str) for f in flat}) > 1
    ]
    for result, values in zip(results, flat, strict=True):
        shown = [f"{k}={values.get(k)}" for k in differing[:3]] + (["..."] if len(differing) > 3 else [])
        result["variant"] = ", ".join(shown)


def load_results(directory: Path) -> tuple[list[dict], list[str]]:
    """(results, problems): every readable results.json under ``directory``."""
    results, problems = [], []
    for path in sorted(directory.rglob("results.json")):
        if "benchmarks" in path.relative_to(directory).parts[:-1]:
            continue  # a run's benchmark evaluations (training.benchmarks), not a run
        try:
            result = json.loads(path.read_text())
            result["layout"]["tensor_parallel"], result["tokens_per_second"]  # noqa: B018 - required keys
        except (OSError, ValueError, KeyError, TypeError) as error:
            problems.append(f"{path}: {error.__class__.__name__}: {error}")
            continue
        result["path"] = str(path)
        results.append(result)
    label_variants(results, directory)
    return results, problems


def model_parallel_key(result: dict) -> str:
    """What stays fixed along a scaling line: everything but the data-parallel size and batch."""
    layout = result["layout"]
    vpp = f" VPP{layout['virtual_pipeline']}" if layout.get("virtual_pipeline") else ""
    extras = "".join(
        [
            f" rc={layout['recompute']}" if layout.get("recompute", "none") != "none" else "",
            " dist-opt" if layout.get("distributed_optimizer") else "",
            f" {layout['params_dtype']}" if layout.get("params_dtype", "float32") != "float32" else "",
        ]
    )
    variant = f"{result['variant']}: " if result.get("variant") else ""
    return (
        f"{variant}TP{layout['tensor_parallel']} PP{layout['pipeline_parallel']}{vpp} "
        f"mb{layout['micro_batch_size']}{extras}"
    )


def memory_rows(result: dict) -> list[tuple[int, float, float]]:
    """(rank, predicted GiB, measured GiB) per rank."""
    memory = result.get("memory") or {}
    predicted = memory.get("predicted_peak_bytes_per_stage") or []
    rows = []
    for rank, (measured, stage) in enumerate(
        zip(memory.get("measured_peak_bytes_per_rank", []), memory.get("stage_of_rank", []), strict=False)
    ):
        if stage < len(predicted) and measured > 0:
            rows.append((rank, predicted[stage] / GIB, measured / GIB))
    return rows


def efficiency(results: list[dict], group_key: Callable[[dict], str]) -> list[dict]:
    """Scaling efficiency of each run against the smallest run of its group: speed-up over GPU
    ratio. Grouped by global batch it is strong scaling; by batch per data-parallel rank, weak
    scaling (there the ratio equals per-GPU throughput over the smallest run's)."""
    groups = defaultdict(list)
    for result in results:
        groups[group_key(result)].append(result)
    rows = []
    for key, members in groups.items():
        sizes = {r["world_size"] for r in members}
        if len(sizes) < 2:
            continue
        members.sort(key=lambda r: r["world_size"])
        base = members[0]
        for result in members:
            ratio = result["world_size"] / base["world_size"]
            speedup = result["tokens_per_second"] / base["tokens_per_second"]
            rows.append(
                {
                    "group": key,
                    "gpus": result["world_size"],
                    "base_gpus": base["world_size"],
                    "tokens_per_second": result["tokens_per_second"],
                    "efficiency": speedup / ratio,
                }
            )
    return sorted(rows, key=lambda row: (row["group"], row["gpus"]))


def strong_key(result: dict) -> str:
    return f"{model_parallel_key(result)}, global batch {result['layout']['global_batch_size']}"


def weak_key(result: dict) -> str:
    layout = result["layout"]
    per_rank = layout["global_batch_size"] // max(layout["data_parallel"], 1)
    return f"{model_parallel_key(result)}, {per_rank} sequences per DP rank"


def markdown(results: list[dict], strong: list[dict], weak: list[dict], problems: list[str]) -> str:
    lines = [
        "# Scaling results",
        "",
        f"{len(results)} runs. Throughput is averaged over the logged windows after the first (start-up excluded); "
        "MFU is model FLOPs (the trainer's analytic count) against the matmul peak measured on each run's ranks. "
        "Memory: measured peak of each rank's training state against the memory model's prediction for its "
        "pipeline stage (for the largest micro-batch the run saw).",
        "",
        "| run | GPUs | nodes | TP | PP | VPP | DP | mb x M | global batch | recompute | s/step | tokens/s | tokens/s/GPU | "
        "images/s | TFLOP/s | MFU | peak GiB (max rank) | predicted GiB | worst pred/meas |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(results, key=lambda r: (r["world_size"], model_parallel_key(r), r["layout"]["global_batch_size"])):
        layout, memory = r["layout"], memory_rows(r)
        peak = max((m for _, _, m in memory), default=float("nan"))
        predicted = max((p for _, p, _ in memory), default=float("nan"))
        worst = min(memory, key=lambda row: -abs(row[1] / row[2] - 1), default=None)
        worst_text = f"{worst[1] / worst[2]:.2f}" if worst else "-"
        lines.append(
            f"| {Path(r['path']).parent.name} | {r['world_size']} | {r.get('nodes', 1)} | {layout['tensor_parallel']} | "
            f"{layout['pipeline_parallel']} | {layout.get('virtual_pipeline') or '-'} | {layout['data_parallel']} | "
            f"{layout['micro_batch_size']} x {layout['num_microbatches']} | {layout['global_batch_size']} | "
            f"{layout.get('recompute', 'none')} | {r['seconds_per_step']:.3f} | {r['tokens_per_second']:,.0f} | "
            f"{r['tokens_per_second'] / r['world_size']:,.0f} | {r['images_per_second']:.1f} | {r['tflops_per_second']:.3g} | "
            f"{100 * r['mfu']:.1f}% | {peak:.3f} | {predicted:.3f} | {worst_text} |"
        )
    for title, rows in (
        ("Strong scaling (same global batch, more GPUs)", strong),
        ("Weak scaling (same batch per data-parallel rank)", weak),
    ):
        lines += ["", f"## {title}", ""]
        if not rows:
            lines.append("No group of runs differs only in GPU count.")
            continue
        lines += ["| group | GPUs | tokens/s | efficiency vs smallest |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {row['group']} | {row['gpus']} (vs {row['base_gpus']}) | {row['tokens_per_second']:,.0f} | {100 * row['efficiency']:.0f}% |"
            for row in rows
        ]
    ratios = [p / m for r in results for _, p, m in memory_rows(r)]
    if ratios:
        within = sum(0.85 <= ratio <= 1.15 for ratio in ratios)
        lines += [
            "",
            "## Memory model",
            "",
            f"{len(ratios)} ranks: predicted / measured from {min(ratios):.2f} to {max(ratios):.2f}; "
            f"{within} of {len(ratios)} within 15%.",
        ]
    lines += comparison(results)
    if problems:
        lines += ["", "## Unreadable results (skipped)", ""] + [f"- {problem}" for problem in problems]
    return "\n".join(lines) + "\n"


def comparison(results: list[dict]) -> list[str]:
    """The variants side by side (markdown lines; none when the runs trained one variant)."""
    variants = sorted({r.get("variant", "") for r in results})
    if len(variants) < 2:
        return []
    lines = [
        "",
        "## Comparison of variants",
        "",
        "Final training loss (the last logged step), validation loss (mean over sources at the last evaluation) "
        "and throughput; one row per run.",
        "",
        "| variant | run | steps | final loss | validation loss | tokens/s | images/s | MFU | peak GiB (max rank) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(results, key=lambda r: (r.get("variant", ""), r["world_size"], model_parallel_key(r))):
        validation = r.get("validation_loss") or {}
        mean_validation = f"{sum(validation.values()) / len(validation):.4f}" if validation else "-"
        loss = f"{r['loss']:.4f}" if isinstance(r.get("loss"), float | int) else "-"
        peak = max((m for _, _, m in memory_rows(r)), default=float("nan"))
        lines.append(
            f"| {r.get('variant') or '-'} | {Path(r['path']).parent.name} | {r['steps']} | {loss} | {mean_validation} | "
            f"{r['tokens_per_second']:,.0f} | {r['images_per_second']:.1f} | {100 * r['mfu']:.1f}% | {peak:.3f} |"
        )
    return lines + benchmark_comparison(results)


def primary_metric(scores: dict) -> tuple[str, float]:
    """A task's reported score: the metric the paper averages (VQA accuracy, CIDEr), the first listed."""
    name = next(key for key in scores if key != "n")
    return name, scores[name]


def benchmark_comparison(results: list[dict]) -> list[str]:
    """Each run's benchmark scores at its last evaluation and the inference cost of the variants."""
    scored = [r for r in results if r.get("benchmarks")]
    if not scored:
        return []
    tasks = sorted(
        {name for r in scored for name, value in r["benchmarks"][-1].items() if isinstance(value, dict)} - {"inference"}
    )
    lines = [
        "",
        "## Benchmarks",
        "",
        "As the paper judges its ablations: each task's score at the run's last evaluation (VQA accuracy in %, "
        "CIDEr x 100) and their average; then what generating the answers cost: prompt tokens per image, "
        "FLOPs per generated token, prefill and decode throughput, peak memory of the evaluation.",
        "",
        "| variant | run | step | images seen | text tokens seen | "
        + " | ".join(tasks)
        + " | average | prompt tokens / image | GFLOP / generated token | prefill tok/s | decode tok/s | eval peak GiB |",
        "| " + " | ".join(["---"] * (5 + len(tasks) + 6)) + " |",
    ]
    for r in sorted(scored, key=lambda r: (r.get("variant", ""), r["world_size"], model_parallel_key(r))):
        last = r["benchmarks"][-1]
        cost = last.get("inference") or {}
        cells = [f"{primary_metric(last[name])[1]:.2f}" if name in last else "-" for name in tasks]
        lines.append(
            f"| {r.get('variant') or '-'} | {Path(r['path']).parent.name} | {last['step']} | {last['images_seen']:,} | "
            f"{last['text_tokens_seen']:,} | " + " | ".join(cells) + f" | {last['average']:.2f} | "
            f"{_number(cost.get('prompt_tokens_per_image'), '.1f')} | {_number(cost.get('flops_per_generated_token'), '.4g', 1e-9)} | "
            f"{_number(cost.get('prefill_tokens_per_second'), ',.0f')} | {_number(cost.get('decode_tokens_per_second'), ',.0f')} | "
            f"{_number(cost.get('peak_memory_gib'), '.3f')} |"
        )
    return lines


def _number(value: object, spec: str, scale: float = 1.0) -> str:
    return format(value * scale, spec) if isinstance(value, int | float) else "-"


def _gpu_axis(axis: object, results: list[dict]) -> None:
    """GPU counts on a log-2 axis, labelled with the counts themselves."""
    from matplotlib.ticker import NullLocator

    counts = sorted({r["world_size"] for r in results})
    axis.set_xscale("log", base=2)
    axis.set_xticks(counts, [str(count) for count in counts])
    axis.xaxis.set_minor_locator(NullLocator())
    axis.set_xlabel("GPUs (ranks)")


def _save(figure: Any, path: Path) -> Path:
    """Lay out, write and close a figure (pyplot keeps every open figure alive until closed)."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot(results: list[dict], strong: list[dict], weak: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    lines = defaultdict(list)
    for r in results:
        lines[f"{model_parallel_key(r)}, gb {r['layout']['global_batch_size']}"].append(r)

    for name, metric, label in (
        ("throughput.png", "tokens_per_second", "tokens / s"),
        ("mfu.png", "mfu", "MFU"),
    ):
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for key, members in sorted(lines.items()):
            members.sort(key=lambda r: r["world_size"])
            axis.plot([r["world_size"] for r in members], [r[metric] for r in members], marker="o", label=key)
        _gpu_axis(axis, results)
        axis.set_ylabel(label)
        axis.set_title(f"{label} against GPUs")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
        written.append(_save(figure, out / name))

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for axis, rows, title in ((axes[0], strong, "strong scaling"), (axes[1], weak, "weak scaling")):
        groups = defaultdict(list)
        for row in rows:
            groups[row["group"]].append(row)
        for key, members in sorted(groups.items()):
            axis.plot(
                [row["gpus"] for row in members], [100 * row["efficiency"] for row in members], marker="o", label=key
            )
        axis.axhline(100, color="grey", linestyle="--", linewidth=1)
        _gpu_axis(axis, results)
        axis.set_title(title + ("" if rows else " (no groups)"))
        axis.grid(True, alpha=0.3)
        if rows:
            axis.legend(fontsize=6)
    axes[0].set_ylabel("efficiency vs smallest run (%)")
    written.append(_save(figure, out / "scaling_efficiency.png"))

    figure, axis = plt.subplots(figsize=(5.5, 5.5))
    points = [(p, m, model_parallel_key(r)) for r in results for _, p, m in memory_rows(r)]
    for key in sorted({k for _, _, k in points}):
        xs = [m for p, m, k in points if k == key]
        ys = [p for p, m, k in points if k == key]
        axis.scatter(xs, ys, label=key, s=25)
    if points:
        top = 1.1 * max(max(p, m) for p, m, _ in points)
        axis.plot([0, top], [0, top], color="black", linewidth=1, label="predicted = measured")
        axis.fill_between([0, top], [0, 0.85 * top], [0, 1.15 * top], color="grey", alpha=0.2, label="+-15%")
        axis.set_xlim(0, top)
        axis.set_ylim(0, top)
    axis.set_xlabel("measured peak per rank (GiB)")
    axis.set_ylabel("predicted peak (GiB)")
    axis.set_title("memory model against measurement")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=6)
    written.append(_save(figure, out / "memory.png"))

    written += benchmark_plots(results, out, plt)
    curves = [r for r in results if r.get("loss_history")]
    if len({r.get("variant", "") for r in results}) > 1 and curves:
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for r in sorted(curves, key=model_parallel_key):
            steps, losses = zip(*r["loss_history"], strict=True)
            axis.plot(steps, losses, marker=".", label=f"{model_parallel_key(r)}, {r['world_size']} GPUs")
        axis.set_xlabel("step")
        axis.set_ylabel("training loss")
        axis.set_title("training loss per variant")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=6)
        written.append(_save(figure, out / "loss.png"))
    return written


# The paper's Figure 4: the benchmark average against what the runs trained on (the cross-attention
# and fully autoregressive architectures see different numbers of images and text tokens per step).
FIGURE_4 = (
    ("benchmark_steps.png", "step", "training step"),
    ("benchmark_images.png", "images_seen", "images seen"),
    ("benchmark_text_tokens.png", "text_tokens_seen", "text tokens seen"),
)


def benchmark_plots(results: list[dict], out: Path, plt: object) -> list[Path]:
    scored = [r for r in results if r.get("benchmarks")]
    if not scored:
        return []
    written = []
    for name, key, label in FIGURE_4:
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for r in sorted(scored, key=lambda r: (r.get("variant", ""), model_parallel_key(r))):
            points = [(entry[key], entry["average"]) for entry in r["benchmarks"] if entry.get("average") is not None]
            line = f"{r.get('variant') or Path(r['path']).parent.name} ({model_parallel_key(r).split(': ')[-1]}, {r['world_size']} GPUs)"
            axis.plot(*zip(*points, strict=True), marker="o", label=line)
        axis.set_xlabel(label)
        axis.set_ylabel("benchmark average (VQA accuracy %, CIDEr x 100)")
        axis.set_title(f"benchmark average against {label}")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=6)
        written.append(_save(figure, out / name))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path, help="a sweep directory (searched for */results.json)")
    parser.add_argument("--out", type=Path, help="where scaling.md and the plots go (default: RESULTS_DIR)")
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        parser.error(f"{args.results_dir} is not a directory")
    results, problems = load_results(args.results_dir)
    for problem in problems:
        print(f"skipped unreadable result {problem}", file=sys.stderr)
    if not results:
        print(f"no results.json under {args.results_dir}", file=sys.stderr)
        return 1
    out = args.out or args.results_dir
    out.mkdir(parents=True, exist_ok=True)
    strong = efficiency(results, strong_key)
    weak = efficiency(results, weak_key)
    table = markdown(results, strong, weak, problems)
    (out / "scaling.md").write_text(table)
    written = plot(results, strong, weak, out)
    print(table)
    print("wrote " + ", ".join(str(path) for path in [out / "scaling.md", *written]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
