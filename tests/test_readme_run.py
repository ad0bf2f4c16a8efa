"""The README's run command, as a user runs it: `bash slurm/pretrain_idefics2.sh` trains the tiny
preset on the bundled data (built on first use), and running it again resumes (shortened here with
OVERRIDES). Marked first_env_only: .ci/run runs it in environment A only (Python 3.11, Megatron-Core
0.16.1); environment B (Megatron-Core 0.19.2) leaves it out with -m 'not first_env_only', and runs the
same script under sbatch in tests/test_slurm.py."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).resolve().parents[1]


LAUNCHER = ["bash", "slurm/pretrain_idefics2.sh"]


def launcher_env(run_dir: Path, overrides: str, config: str | None = None) -> dict[str, str]:
    """The launcher's settings as a user gives them: RUN_DIR, OVERRIDES and, for another preset, CONFIG."""
    env = {**os.environ, "RUN_DIR": str(run_dir), "OVERRIDES": overrides, "OMP_NUM_THREADS": "1"}
    for name in ("MASTER_PORT", "MASTER_ADDR", "CONFIG", "DATA_ROOT", "NPROC", "SLURM_JOB_ID"):
        env.pop(name, None)
    return env if config is None else {**env, "CONFIG": config}


def readme_run(run_dir: Path, overrides: str, config: str | None = None) -> str:
    """The launcher run to its end; its output (both streams)."""
    env = launcher_env(run_dir, overrides, config)
    done = subprocess.run(LAUNCHER, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory):
    """The README run, shortened: 4 steps, then run again to 6 (a resume). Its directory and logs."""
    tmp_path = tmp_path_factory.mktemp("readme")
    # Issue #26: W&B in offline mode as well (test_wandb_logs_what_tensorboard_logs).
    common = "training.save_interval=2 training.log_interval=2 training.warmup_steps=1"
    common += " logging.wandb.project=megatron-vlm-readme logging.wandb.mode=offline"
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


def wandb_history(run_directory: Path) -> tuple[list[dict], dict]:
    """The history rows and the config of an offline W&B run, read back with wandb's own reader
    (``wandb leet inspect``, which prints the records of the run's transaction log as protobuf text)
    into wandb's own record messages."""
    from google.protobuf import text_format
    from wandb.proto import wandb_internal_pb2

    wandb = Path(sys.executable).parent / "wandb"
    done = subprocess.run(
        [str(wandb), "leet", "inspect", str(run_directory)], capture_output=True, text=True, timeout=120, check=True
    )
    rows, config, header = [], {}, re.compile(r"^# record \d+: \w+$", re.M)
    for block in header.split(done.stdout)[1:]:
        record = text_format.Parse(block, wandb_internal_pb2.Record())
        if record.WhichOneof("record_type") == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            )
    return rows, config


@pytest.mark.first_env_only
def test_wandb_logs_what_tensorboard_logs(readme_runs):
    """Issue #26: the README run with ``logging.wandb`` offline (two sessions: the resume) writes one W&B
    run id, continued by the resumed session, whose scalars are exactly TensorBoard's: training
    metrics, validation losses, benchmark scores, and the benchmark average against images and text
    tokens seen (W&B step metrics there, TensorBoard's step axis)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp_path, _, _ = readme_runs
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    sessions = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert [directory.name.rsplit("-", 1)[1] for directory in sessions] == [run_id, run_id]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tensorboard = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    logged: dict[str, dict[int, float]] = {}
    for session in sessions:
        rows, config = wandb_history(session)
        assert config["training"]["output_dir"] == str(tmp_path / "run") and config["model"]["family"] == "idefics2"
        for row in rows:
            for tag, value in row.items():
                if tag.startswith("_") or tag in ("images_seen", "text_tokens_seen"):
                    continue
                counter = tag.removeprefix("benchmark_by_").removesuffix("/average")
                step = row[counter] if tag.startswith("benchmark_by_") else row["_step"]
                logged.setdefault(tag, {})[step] = value
    assert sorted(logged) == sorted(tensorboard)
    assert {"train/loss", "validation/obelics/loss", "benchmark/vqav2/accuracy"} <= set(logged)
    for tag, values in tensorboard.items():
        assert sorted(logged[tag]) == sorted(values), tag
        for step, value in values.items():  # TensorBoard keeps float32
            assert logged[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, step)
    assert max(logged["train/loss"]) == 6 and min(logged["train/loss"]) == 2


@pytest.mark.first_env_only
def test_the_tiny_sft_preset_fine_tunes_the_readme_runs_checkpoint(readme_runs):
    """Issue #23: examples/tiny_cpu_sft.yaml starts from the README run's newest checkpoint and
    fine-tunes it on the bundled conversations (DoRA, answers only, NEFTune, up-scaling, shuffled
    turns): the loss on the answers falls; stopped at step 8 and resumed, it trains exactly as the
    uninterrupted run; show_samples shows the trained spans (the answers)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp_path, _, _ = readme_runs
    common = (
        f"training.load_weights={tmp_path / 'run' / 'checkpoints'} training.log_interval=1 training.eval_interval=16"
    )
    overrides, config = f"{common} training.train_steps=16 training.save_interval=8", "examples/tiny_cpu_sft.yaml"

    def losses(name: str) -> list[float]:
        """Step -> loss; a step logged again after a resume counts as the resumed run logged it."""
        events = EventAccumulator(str(tmp_path / name / "tensorboard"), purge_orphaned_data=False)
        events.Reload()
        by_step = {e.step: e.value for e in sorted(events.Scalars("train/loss"), key=lambda e: e.wall_time)}
        return [by_step[step] for step in sorted(by_step)]

    # The uninterrupted run and one killed once its step-8 checkpoint is published, side by side (one
    # thread each); the killed one is run again, resumes there and must train as the uninterrupted
    # run, bit for bit (the data stream with its augmentation draws, NEFTune's noise, DoRA's
    # magnitudes and Adam restored).
    from test_training import kill_everything_running

    def start(name: str) -> subprocess.Popen:
        env = launcher_env(tmp_path / name, overrides, config)
        with open(tmp_path / f"{name}.log", "w") as output:
            return subprocess.Popen(
                LAUNCHER, env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )

    whole, cut = start("sft"), start("sft_cut")
    latest, deadline = tmp_path / "sft_cut" / "checkpoints" / "latest", time.time() + 600
    while not (latest.exists() and latest.read_text().strip() == "iter_0000008"):
        assert cut.poll() is None and time.time() < deadline, "the run ended before publishing step 8"
        time.sleep(0.05)
    kill_everything_running(tmp_path / "sft_cut", processes=2)  # torchrun and its one trainer
    cut.wait()
    assert "iter_0000008 at step 8" in readme_run(tmp_path / "sft_cut", overrides, config)
    assert whole.wait(timeout=900) == 0, (tmp_path / "sft.log").read_text()[-6000:]

    log = (tmp_path / "sft.log").read_text()
    assert f"starting from the weights of {tmp_path / 'run' / 'checkpoints' / 'iter_0000006'}" in log
    assert "NEFTune: noise of alpha 5" in log and "validation loss conversations" in log
    loss = losses("sft")
    assert len(loss) == 16
    assert sum(loss[-4:]) / 4 < 0.85 * sum(loss[:4]) / 4, loss  # the answers' loss falls
    saved = json.loads((tmp_path / "sft" / "checkpoints" / "iter_0000016" / "megatron_vlm.json").read_text())
    assert saved["trainable"]["dora"] and saved["trainable"]["lora_rank"] == 8
    assert losses("sft_cut") == loss

    # What it trained on, as the preset's own comment says to look at it.
    command = ["python", "tools/show_samples.py", "runs/data/conversations", "--config", "examples/tiny_cpu_sft.yaml"]
    env = launcher_env(tmp_path / "sft", overrides, config)
    shown = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT, check=True).stdout
    assert "Assistant:⟦" in shown and shown.count("<end_of_utterance>⟧") >= 2, shown
    assert "User:⟦" not in shown and "⟦User" not in shown
