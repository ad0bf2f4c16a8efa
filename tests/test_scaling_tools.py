"""Scaling tools as users run them: the layout planner, a sweep on the real local Slurm cluster
(job arrays of slurm/pretrain_idefics2.sh, one results.json per run) and its analysis."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from parity import run_tool

from megatron_vlm.config import load_model_preset
from megatron_vlm.perf.memory_model import TrainingSetup, Workload, predict_memory
from megatron_vlm.perf.planner import Cluster, Job, LayoutEstimate, estimate

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_plan_ranks_feasible_8b_layouts_and_explains_the_rest(tmp_path):
    out = tmp_path / "plan.json"
    text = run_tool("plan.py", "--gpus", "256", "--gpu-mem", "80", "--preset", "idefics2-8b", "--json", str(out))
    rows = json.loads(out.read_text())
    feasible = [r for r in rows if r["feasible"]]
    assert feasible and "feasible layouts" in text
    speeds = [r["tokens_per_second"] for r in feasible]
    assert speeds == sorted(speeds, reverse=True)
    assert all(r["peak_memory_gib"] <= 80 - 4 for r in feasible)
    assert all(r["tensor_parallel"] * r["pipeline_parallel"] * r["data_parallel"] == 256 for r in rows)
    reasons = " ".join(" ".join(r["problems"]) for r in rows if not r["feasible"])
    assert "resampler attention heads (16) and KV heads (4)" in reasons  # TP8 cannot split 4 KV heads
    assert "GiB usable" in reasons and "spans nodes" in reasons
    # Without sharding the optimizer over DP, a TP1 PP1 replica of 8B (16 B/param) cannot fit 80 GB.
    replica = [
        r for r in rows if r["tensor_parallel"] == 1 and r["pipeline_parallel"] == 1 and not r["distributed_optimizer"]
    ]
    assert replica and not any(r["feasible"] for r in replica)


def test_plan_says_when_nothing_fits():
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools/plan.py"), "--gpus", "2", "--gpu-mem", "16", "--preset", "idefics2-8b"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 1
    assert "none fits" in done.stdout and "does not fit in GPU memory" in done.stdout


def test_planner_memory_is_the_memory_model():
    model = load_model_preset("idefics2-8b")
    job = Job(model, global_batch_size=64, seq_length=2048, images_per_sequence=2, patches_per_image=70 * 70)
    from megatron_vlm.config import ParallelConfig

    parallel = ParallelConfig(tensor_parallel=4, pipeline_parallel=2, recompute="selective")
    candidate = estimate(job, Cluster(gpus=64), LayoutEstimate(parallel, 8, 1, 8, True, problems=[]))
    setup = TrainingSetup(parallel, 8, 8, "bfloat16", True, kernels="te")
    stages = predict_memory(model, setup, Workload(1, 2048, 2, 70 * 70))
    assert candidate.feasible
    assert candidate.peak_memory_gib == pytest.approx(max(s.peak for s in stages) / 2**30)
    assert candidate.step_seconds == pytest.approx(sum(candidate.breakdown.values()))


def test_sweep_dry_run_lists_runs_and_skips_with_reasons():
    text = run_tool("sweep.py", "examples/sweeps/small_cpu.yaml", "--out", "/nonexistent", "--dry-run")
    assert "8 runs, 8 impossible points skipped" in text
    assert "skip n1x1-tp2-pp1-gb4-mb2: world size 1 is not divisible by TP*PP = 2*1" in text


ABLATIONS = sorted((ROOT / "examples" / "ablations").glob("*/*.yaml"))


def _sweep_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_tool", ROOT / "tools" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_ablation_expands_into_its_variants():
    """The paper's comparisons (examples/ablations/{cpu,paper}): every variant of every file is a
    run config that loads and fits its layout, and the variants differ in what the comparison names."""
    from megatron_vlm.config import load_run_config

    sweep = _sweep_module()
    assert {p.parent.name for p in ABLATIONS} == {"cpu", "paper"}
    assert {p.stem for p in ABLATIONS if p.parent.name == "cpu"} == {
        p.stem for p in ABLATIONS if p.parent.name == "paper"
    }
    compared = {
        "text_backbone": lambda run: run.model.text.kind,
        "vision_backbone": lambda run: run.model.vision.kind,
        "architecture": lambda run: run.model.architecture,
        "trainable": lambda run: (run.trainable.freeze_language, run.trainable.lora_rank),
        "pooling": lambda run: (run.model.connector.kind, run.model.connector.num_latents),
        "resize": lambda run: run.data.mixture,
        "image_splitting": lambda run: run.data.mixture,
    }
    for path in ABLATIONS:
        points, skipped = sweep.expand(sweep.load_sweep(path))
        assert not skipped, (path, skipped)
        variants = {point["variant"] for point in points}
        assert len(variants) >= 2 and len(points) == len(variants), path
        seen = {
            compared[path.stem](load_run_config(ROOT / sweep.load_sweep(path)["config"], p["overrides"]))
            for p in points
        }
        assert len(seen) == len(variants), (path, seen)


def test_ablation_dry_run_lists_the_variants():
    text = run_tool("sweep.py", "examples/ablations/cpu/pooling.yaml", "--out", "/nonexistent", "--dry-run")
    assert "3 runs, 0 impossible points skipped" in text
    for name in ("perceiver8", "perceiver16", "no_pooling"):
        assert f"run  {name}-n1x1-gb4-mb2 (1 ranks)" in text


def test_analysis_skips_unreadable_results(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{ truncated")
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools/analyze_scaling.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "skipped unreadable result" in done.stderr and "no results.json" in done.stderr


# The paper's architecture comparison (examples/ablations/cpu/architecture.yaml's variants), short,
# that is also a scaling line: fully autoregressive at one and two ranks (strong scaling), cross-
# attention (Idefics1) at TP2 (impossible on one rank: skipped): the trainer on the bundled data
# resized square for CLIP, one <image> token per image for cross-attention, at the cost of three runs.
SWEEP = """
config: examples/tiny_cpu.yaml
set:
  training.train_steps: 6
  training.log_interval: 2
  training.warmup_steps: 1
  training.save_interval: 1000
  data.mixture: tiny_square
  training.benchmarks.tasks: {vqav2: benchmarks/vqav2/release, coco: benchmarks/coco/hub}
  training.benchmarks.interval: 3
  training.benchmarks.questions: 4
slurm: {gpus_per_node: 0, cpus_per_task: 1, time: "00:20:00", exclusive: true}
grid:
  tasks_per_node: [1, 2]
  training.global_batch_size: [4]
  data.micro_batch_size: [2]
variants:
  fully_autoregressive: {model: tiny_clip, model.text.kind: llama}
  cross_attention: {model: tiny_idefics1, parallel.tensor_parallel: 2}
"""


@pytest.mark.slurm
def test_sweep_on_local_slurm_then_table_and_plots(slurm, data_root, tmp_path):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(SWEEP)
    out = tmp_path / "sweep"
    env = {
        **os.environ,
        "SLURM_CONF": slurm,
        "DATA_ROOT": str(data_root),
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("MASTER_PORT", None)
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/sweep.py"),
            str(sweep_file),
            "--out",
            str(out),
            "--wait",
            "--timeout",
            "900",
        ],
        capture_output=True,
        text=True,
        timeout=1000,
        env=env,
        cwd=ROOT,
    )
    logs = "".join(p.read_text() for p in (out / "logs").glob("*.out")) if (out / "logs").is_dir() else ""
    assert done.returncode == 0, done.stdout + done.stderr + logs
    assert "3 runs, 1 impossible points skipped" in done.stdout  # TP2 on one rank
    assert "done: 3 of 3 runs wrote results.json" in done.stdout
    manifest = json.loads((out / "sweep.json").read_text())
    assert len(manifest["jobs"]) == 2  # one array per (nodes, tasks per node)
    results = {p.parent.name: json.loads(p.read_text()) for p in (out / "runs").glob("*/results.json")}
    assert set(results) == {
        "fully_autoregressive-n1x1-gb4-mb2",
        "fully_autoregressive-n1x2-gb4-mb2",
        "cross_attention-n1x2-gb4-mb2",
    }
    crossed = results["cross_attention-n1x2-gb4-mb2"]
    assert crossed["config"]["model"]["architecture"] == "cross_attention" and crossed["layout"]["tensor_parallel"] == 2
    assert results["fully_autoregressive-n1x1-gb4-mb2"]["config"]["model"]["text"]["kind"] == "llama"
    for result in results.values():
        assert result["slurm_job"] and result["measured_steps"] == 4  # the first window (start-up) left out
        assert result["tokens_per_second"] > 0 and 0 < result["mfu"] < 1
        assert len(result["memory"]["measured_peak_bytes_per_rank"]) == result["world_size"]
        assert all(b > 0 for b in result["memory"]["measured_peak_bytes_per_rank"])
        assert result["layout"]["data_parallel"] == result["world_size"] // result["layout"]["tensor_parallel"]

    analysis = run_tool("analyze_scaling.py", str(out))
    table = (out / "scaling.md").read_text()
    assert (
        analysis.startswith("# Scaling results") and table.count("-gb4-mb2 |") == 3 + 3 + 3
    )  # runs, comparison, benchmarks
    # strong scaling: DP2 against one rank
    assert "fully_autoregressive: TP1 PP1 mb2, global batch 4 | 2 (vs 1)" in table
    comparison = table[table.index("## Comparison of variants") :]
    for name, result in results.items():  # each run's final loss, as its results.json says
        variant = name.split("-")[0]  # the run's name starts with its variant's
        assert f"| {variant} | {name} | 6 | {result['loss']:.4f} |" in comparison
        assert [step for step, _ in result["loss_history"]] == [2, 4, 6]
    # Judged as the paper judges: each run scored 4-shot at steps 3 and 6, the images and text tokens
    # seen growing with the steps (cross-attention: the same images, one <image> token each in the text).
    benchmarks = table[table.index("## Benchmarks") :]
    assert "| coco | vqav2 | average |" in benchmarks  # tasks in name order
    for name, result in results.items():
        history = result["benchmarks"]
        assert [entry["step"] for entry in history] == [3, 6], name
        assert 0 < history[0]["images_seen"] < history[1]["images_seen"] == result["images_seen"], name
        last = history[-1]
        average = (last["vqav2"]["accuracy"] + last["coco"]["CIDEr"]) / 2
        assert last["average"] == pytest.approx(average) and last["vqav2"]["n"] == last["coco"]["n"] == 4
        row = f"| {name.split('-')[0]} | {name} | 6 | {last['images_seen']:,} | {last['text_tokens_seen']:,} |"
        assert row in benchmarks and f"| {last['average']:.2f} |" in benchmarks, name
        assert last["inference"]["flops_per_generated_token"] > 0
    for name in ("throughput.png", "mfu.png", "scaling_efficiency.png", "memory.png", "loss.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
    for name in ("benchmark_steps.png", "benchmark_images.png", "benchmark_text_tokens.png"):  # Figure 4
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
