"""The README's run command, as a user runs it: `bash slurm/pretrain_idefics2.sh` trains the tiny
preset on the bundled data (built on first use), and running it again resumes (shortened here with
OVERRIDES). Marked first_env_only: .ci/run runs it in environment A only (Python 3.11, Megatron-Core
0.16.1); environment B (Megatron-Core 0.19.2) leaves it out with -m 'not first_env_only', and runs the
same script under sbatch in tests/test_slurm.py."""

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).resolve().parents[1]


def readme_run(run_dir: Path, overrides: str) -> str:
    env = {**os.environ, "RUN_DIR": str(run_dir), "OVERRIDES": overrides, "OMP_NUM_THREADS": "1"}
    for name in ("MASTER_PORT", "MASTER_ADDR", "CONFIG", "DATA_ROOT", "NPROC", "SLURM_JOB_ID"):
        env.pop(name, None)
    done = subprocess.run(
        ["bash", "slurm/pretrain_idefics2.sh"], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory):
    """The README run, shortened: 4 steps, then run again to 6 (a resume). Its directory and logs."""
    tmp_path = tmp_path_factory.mktemp("readme")
    common = "training.save_interval=2 training.log_interval=2 training.warmup_steps=1"
    first = readme_run(tmp_path / "run", f"training.train_steps=4 {common}")
    again = readme_run(tmp_path / "run", f"training.train_steps=6 {common}")
    return tmp_path, first, again


@pytest.mark.first_env_only
def test_readme_command_trains_then_resumes(readme_runs):
    tmp_path, first, again = readme_runs
    assert "step      4/4" in first and "saved" in first
    assert "iter_0000004 at step 4" in again and "step      6/6" in again
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "iter_0000006"
    # Issue #13: the bundled data holds out samples of each source, and the run evaluates them at the
    # end (eval_interval 20 > 6 steps): validation loss per source in the log and in TensorBoard.
    assert "validation loss obelics" in again
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for source in ("obelics", "pairs", "pdfs"):
        steps = [event.step for event in events.Scalars(f"validation/{source}/loss")]
        assert steps == [4, 6], (source, steps)
    # Issue #22: it is scored 4-shot on the bundled tiny VQAv2 at the end of each session, as the
    # paper judges its ablations: the log, TensorBoard, and results.json's history across the resume.
    assert "| benchmarks vqav2 " in first and "| benchmarks vqav2 " in again
    accuracy = {event.step: event.value for event in events.Scalars("benchmark/vqav2/accuracy")}
    assert sorted(accuracy) == [4, 6]
    history = json.loads((tmp_path / "run" / "results.json").read_text())["benchmarks"]
    assert [entry["step"] for entry in history] == [4, 6]
    assert [entry["vqav2"]["accuracy"] for entry in history] == pytest.approx([accuracy[4], accuracy[6]])
    assert history[0]["images_seen"] < history[1]["images_seen"] and history[1]["vqav2"]["n"] == 8
    # Each logged accuracy is the official VQA accuracy (vqa_score, checked against the official
    # code in test_eval_metrics) of the predictions written for that step.
    from megatron_vlm.evaluation.metrics import vqa_score

    for step in (4, 6):
        predictions = tmp_path / "run" / "benchmarks" / f"step_{step:07d}" / "vqav2.predictions.jsonl"
        records = [json.loads(line) for line in predictions.read_text().splitlines()]
        assert len(records) == 8 and all(len(r["references"]) == 10 for r in records)
        assert accuracy[step] == pytest.approx(vqa_score((r["prediction"], r["references"]) for r in records), abs=1e-4)


@pytest.mark.first_env_only
def test_the_tiny_sft_preset_fine_tunes_the_readme_runs_checkpoint(readme_runs):
    """Issue #23: examples/tiny_cpu_sft.yaml starts from the README run's newest checkpoint and
    fine-tunes it on the bundled conversations (DoRA, answers only, NEFTune, up-scaling, shuffled
    turns): the loss on the answers falls; show_samples shows the trained spans (the answers)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp_path, _, _ = readme_runs
    overrides = (
        f"training.load_weights={tmp_path / 'run' / 'checkpoints'} training.train_steps=16 "
        "training.log_interval=1 training.eval_interval=16 training.save_interval=16"
    )
    env = {**os.environ, "CONFIG": "examples/tiny_cpu_sft.yaml", "RUN_DIR": str(tmp_path / "sft")}
    env.update(OVERRIDES=overrides, OMP_NUM_THREADS="1")
    for name in ("MASTER_PORT", "MASTER_ADDR", "DATA_ROOT", "NPROC", "SLURM_JOB_ID"):
        env.pop(name, None)
    done = subprocess.run(
        ["bash", "slurm/pretrain_idefics2.sh"], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    log = done.stdout + done.stderr
    assert f"starting from the weights of {tmp_path / 'run' / 'checkpoints' / 'iter_0000006'}" in log
    assert "NEFTune: noise of alpha 5" in log and "validation loss conversations" in log
    events = EventAccumulator(str(tmp_path / "sft" / "tensorboard"))
    events.Reload()
    loss = [event.value for event in events.Scalars("train/loss")]
    assert len(loss) == 16
    assert sum(loss[-4:]) / 4 < 0.85 * sum(loss[:4]) / 4, loss  # the answers' loss falls
    saved = json.loads((tmp_path / "sft" / "checkpoints" / "iter_0000016" / "megatron_vlm.json").read_text())
    assert saved["trainable"]["dora"] and saved["trainable"]["lora_rank"] == 8

    # What it trained on, as the preset's own comment says to look at it.
    command = ["python", "tools/show_samples.py", "runs/data/conversations", "--config", "examples/tiny_cpu_sft.yaml"]
    shown = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT, check=True).stdout
    assert "Assistant:⟦" in shown and shown.count("<end_of_utterance>⟧") >= 2, shown
    assert "User:⟦" not in shown and "⟦User" not in shown
