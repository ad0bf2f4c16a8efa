"""The full trainer on one GPU, as one process (NCCL does not put two ranks on one GPU): the tiny
preset trains a few steps on the bundled data in bf16 and in FP8 (torch's ``_scaled_mm`` linears;
Transformer Engine's when it imports), with parameters and batches on the GPU, writing checkpoints
and results.json. Skipped without CUDA (tests/conftest.py); ``pytest -m gpu`` and
``bench/gpu_check.sh`` run it on a GPU."""

import json
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_training import environment, scalars, trainer_args

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
SOURCES = ("obelics", "pairs", "pdfs")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The bundled data as the README run builds it: one held-out sample per source, so the run
    evaluates on the GPU (the tiny preset's eval_interval is 20 = STEPS; the first GPU run of the
    evaluation failed on a host tensor added into a CUDA one: docs/gpu.md)."""
    from megatron_vlm.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("data")
    for name in ("interleaved", "pairs", "pages"):
        jsonl = ROOT / "examples" / "data" / f"{name}.jsonl"
        preprocess(
            [jsonl], root / name, samples_per_shard=4, validation_fraction=0.25, validation_seed=7, progress=False
        )
    # The run is scored on the tiny VQAv2 at its end (generation with the KV cache on the GPU).
    subprocess.run([sys.executable, str(ROOT / "examples/benchmarks/build.py"), str(root / "benchmarks")], check=True)
    return root


def run_trainer(output: Path, data_root: Path, *overrides: str, timeout: float = 240) -> str:
    """``python -m megatron_vlm.train`` as one process; returns its output, which is also echoed
    line by line (live in the log of ``pytest -s``, as bench/gpu_check.sh runs it). Past ``timeout``
    it gets SIGUSR2 (every thread's Python stack: megatron_vlm/train.py), then SIGKILL, and the
    test fails showing where it hung."""
    command = [
        sys.executable,
        *trainer_args(
            output,
            data_root,
            f"training.train_steps={STEPS}",
            "training.log_interval=2",
            "training.save_interval=10",
            "precision.params_dtype=bfloat16",
            "training.benchmarks.interval=1000",  # scored at the end: generation on the GPU
            *overrides,
        ),
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**environment(), "PYTHONUNBUFFERED": "1"},
        cwd=ROOT,
    )
    lines: list[str] = []

    def echo() -> None:
        for line in process.stdout:
            lines.append(line)
            sys.stdout.write(f"  trainer| {line}")
            sys.stdout.flush()

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR2)
        time.sleep(5)
        process.kill()
        process.wait()
        reader.join(timeout=10)
        pytest.fail(
            f"the trainer did not finish in {timeout:.0f} s; its output, stacks at the end:\n{''.join(lines)[-8000:]}"
        )
    reader.join(timeout=10)
    text = "".join(lines)
    assert process.returncode == 0, f"{' '.join(command)} failed:\n{text[-8000:]}"
    return text


def check_gpu_run(output: Path, log: str, fp8: str | None, fp8_backend: str | None) -> None:
    import torch

    assert f"step {STEPS:>6}/{STEPS}" in log
    # The trainer's start-up line (training/loop.py): where the model and the first batch live.
    placement = next(line for line in log.splitlines() if "step 1: parameters on" in line)
    parameters, batch = placement.split("parameters on ", 1)[1].split(", batch on ", 1)
    assert parameters.startswith("cuda:0 (torch.bfloat16") and "cpu" not in parameters, placement
    assert batch.startswith("cuda:0 (") and "cpu" not in batch.split(", fp8")[0], placement
    if fp8:
        assert placement.endswith(f", fp8 {fp8} via {fp8_backend}"), placement
    else:
        assert "fp8" not in placement, placement

    losses = scalars(output / "tensorboard", "loss")
    assert sorted(losses) == list(range(2, STEPS + 1, 2))
    assert all(math.isfinite(loss) for loss in losses.values()), losses
    assert losses[STEPS] < losses[2] - 0.5, losses  # from ~ln(32003) = 10.4, going down

    assert "validation loss obelics" in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    for source in SOURCES:
        validation = [(event.step, event.value) for event in events.Scalars(f"validation/{source}/loss")]
        assert [step for step, _ in validation] == [STEPS] and math.isfinite(validation[0][1]), (source, validation)

    # Generation with the KV cache on the GPU: the tiny VQAv2 scored 4-shot at the end.
    assert "| benchmarks vqav2 " in log
    check_benchmark_score(output, events, STEPS)

    checkpoints = output / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"iter_{STEPS:07d}"
    assert (checkpoints / "iter_0000010").is_dir() and (checkpoints / f"iter_{STEPS:07d}" / "model").is_dir()

    results = json.loads((output / "results.json").read_text())
    assert results["steps"] == STEPS and results["world_size"] == 1
    assert results["device"] == torch.cuda.get_device_name(0)
    assert results["layout"]["params_dtype"] == "bfloat16" and results["layout"]["fp8"] == fp8
    assert results["memory"]["measured"].startswith("cuda allocator peak")
    assert results["memory"]["measured_peak_bytes_per_rank"][0] > 0
    assert results["loss"] == pytest.approx(losses[STEPS], rel=1e-6)
    assert results["tokens_per_second"] > 0 and results["peak_tflops_per_rank"] > 0
    assert 0 < results["mfu"] < 1


def check_benchmark_score(output: Path, events, step: int) -> None:
    """The VQAv2 accuracy logged at ``step`` is the official VQA accuracy (``vqa_score``, checked
    against the official code in tests/test_eval_metrics.py) of the predictions the run wrote for
    that step, on the preset's 8 questions, and results.json's history says the same."""
    from megatron_vlm.evaluation.metrics import vqa_score

    scores = [(event.step, event.value) for event in events.Scalars("benchmark/vqav2/accuracy")]
    assert [s for s, _ in scores] == [step], scores
    path = output / "benchmarks" / f"step_{step:07d}" / "vqav2.predictions.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 8 and all(len(r["references"]) == 10 for r in records), records
    expected = vqa_score((r["prediction"], r["references"]) for r in records)
    assert scores[0][1] == pytest.approx(expected, abs=1e-4), (scores, [r["prediction"] for r in records])
    (entry,) = json.loads((output / "results.json").read_text())["benchmarks"]
    assert entry["step"] == step and entry["vqav2"]["n"] == 8
    assert entry["vqav2"]["accuracy"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(
    ("fp8", "fp8_backend"),
    [(None, None), ("hybrid", "torch")],
    ids=["bf16", "fp8-torch"],
)
def test_trainer_on_one_gpu(data_root, tmp_path, fp8, fp8_backend):
    overrides = [f"precision.fp8={fp8}", f"precision.fp8_backend={fp8_backend}"] if fp8 else []
    log = run_trainer(tmp_path / "run", data_root, *overrides)
    check_gpu_run(tmp_path / "run", log, fp8, fp8_backend)


def test_trainer_on_one_gpu_with_transformer_engine_fp8(data_root, tmp_path):
    from megatron_vlm import backend

    if not backend.has_transformer_engine():
        pytest.skip("Transformer Engine does not import here (its wheels are too large to carry: docs/gpu.md)")
    if not backend.has_fp8():
        pytest.skip("Transformer Engine's FP8 needs a GPU of compute capability >= 8.9")
    log = run_trainer(tmp_path / "run", data_root, "precision.fp8=hybrid", "precision.fp8_backend=te")
    check_gpu_run(tmp_path / "run", log, "hybrid", "te")
