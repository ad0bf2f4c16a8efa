"""`sbatch slurm/pretrain_idefics2.sh` on a real one-node Slurm cluster (2 CPU tasks, gloo):
the job completes and checkpoints; a SIGTERM makes it save, and the next submission resumes."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]


def submit(slurm, run_dir, data_root, overrides, **extra_env):
    run_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the --output directory
    env = {
        **os.environ,
        **extra_env,
        "SLURM_CONF": slurm,
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("MASTER_PORT", None)
    done = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=1",
            "--ntasks=2",
            "--ntasks-per-node=2",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            "--time=30",
            f"--output={run_dir}/slurm-%j.out",
            f"--export=ALL,RUN_DIR={run_dir},DATA_ROOT={data_root},OVERRIDES={overrides}",
            str(ROOT / "slurm/pretrain_idefics2.sh"),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    return done.stdout.strip().split(";")[0], env


def job_state(job, env):
    done = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env)
    match = re.search(r"JobState=(\w+)", done.stdout)
    return match.group(1) if match else "GONE"


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def test_sbatch_trains_and_checkpoints(slurm, data_root, tmp_path):
    job, env = submit(
        slurm, tmp_path / "run", data_root, "training.train_steps=6 training.save_interval=3 training.log_interval=1"
    )
    wait_for(lambda: job_state(job, env) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"), 600, "the job")
    output = (tmp_path / "run" / f"slurm-{job}.out").read_text()
    assert job_state(job, env) in ("COMPLETED", "GONE"), output
    assert "2 tasks on 1 node(s)" in output
    logs = "".join(p.read_text() for p in (tmp_path / "run" / "logs").glob("*.log"))
    assert "step      6/6" in logs
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "iter_0000006"


def test_sigterm_saves_and_the_next_submission_resumes(slurm, data_root, tmp_path):
    """SIGTERM to the tasks (a preemption, ``scancel --signal=TERM``): they checkpoint and exit. The
    resubmitted job resumes from it; SIGTERM to its batch script alone (``scancel --batch``) makes the
    script ask the trainers, through srun, to checkpoint too (it used to pass SIGTERM to srun, which
    SIGKILLs its tasks: no checkpoint)."""
    run_dir = tmp_path / "run"
    logs = run_dir / "logs"
    latest = run_dir / "checkpoints" / "latest"

    def checkpointed() -> int:
        return int(latest.read_text().strip().removeprefix("iter_")) if latest.is_file() else 0

    def preempt(scancel_options: list[str]) -> tuple[int, str]:
        """Submit, let it train two steps past the latest checkpoint, signal it: (checkpoint, job's log)."""
        before = checkpointed()
        job, env = submit(
            slurm, run_dir, data_root, "training.train_steps=400 training.save_interval=1000 training.log_interval=1"
        )
        job_logs = lambda: "".join(p.read_text() for p in logs.glob(f"{job}-*.log"))  # noqa: E731
        wait_for(lambda: f"step {before + 2:6d}/400" in job_logs(), 600, "training")
        subprocess.run(["scancel", *scancel_options, job], check=True, env=env)
        wait_for(lambda: checkpointed() > before, 300, f"the checkpoint after scancel {scancel_options}")
        saved = checkpointed()
        assert before + 2 <= saved < 400
        # Slurm counts a job whose batch script was signalled as CANCELLED, the script's 143 as FAILED.
        wait_for(lambda: job_state(job, env) not in ("PENDING", "RUNNING", "COMPLETING"), 300, "the job to end")
        wait_for(lambda: f"preempted at step {saved}" in job_logs(), 60, "its log")
        return saved, job_logs()

    first, _ = preempt(["--signal=TERM"])
    _, text = preempt(["--batch", "--signal=TERM"])
    assert f"resumed from {run_dir / 'checkpoints' / f'iter_{first:07d}'} at step {first}" in text


def test_a_silent_rank_sends_the_job_back_to_the_queue(slurm, data_root, tmp_path):
    """Rank 1 stops answering at step 3: rank 0 names it within training.collective_timeout_s and
    exits with 75, and the batch script requeues the job (which would resume from its checkpoint)."""
    from megatron_vlm.distributed import HANG_TEST_HOOK

    run_dir = tmp_path / "run"
    overrides = (
        "training.train_steps=400 training.save_interval=2 training.log_interval=1 training.collective_timeout_s=8"
    )
    job, env = submit(slurm, run_dir, data_root, overrides, **{HANG_TEST_HOOK: "1:3"})

    def restarts() -> int:
        shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env).stdout
        match = re.search(r"Restarts=(\d+)", shown)
        return int(match.group(1)) if match else 0

    try:
        wait_for(lambda: restarts() >= 1, 300, "the requeue")
    finally:
        subprocess.run(["scancel", job], env=env)
    output = (run_dir / f"slurm-{job}.out").read_text()
    assert "a rank stopped answering (exit 75" in output and "requeueing" in output
    assert (run_dir / "logs" / f"peer_lost.{job}.json").is_file()
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob(f"{job}-*.log"))
    assert "rank 1 on " in logs and "did not answer within 8 s" in logs
