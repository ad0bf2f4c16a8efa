"""Collective timeouts that name the rank (issue 14, must-show 5), on real processes (gloo):
- a 2-rank trainer whose rank 1 stops answering at step 3 (the test hook
  MEGATRON_VLM_TEST_HANG_AT_STEP): rank 0 exits within training.collective_timeout_s (+ slack),
  not before it, naming rank 1 and its host;
- a save in which one rank stays away for longer than a step's allowance and the step's process
  group timeout trips nothing (saves and evaluation run under checkpoint_timeout_s, the process
  groups' timeouts follow), and a rank frozen (SIGSTOP) inside a later step, which every rank
  entered, is named from its silence (the heartbeat worker, no model);
- invalid timeouts are refused by name at start-up;
- a full disk while saving (a real 80 MiB tmpfs, root only): every rank raises naming ENOSPC, the
  directory and the bytes free, the partial write is removed, the previous checkpoint stays the
  latest and a new run resumes from it;
- the start-up check that a save fits the preemption lead time warns with the numbers; its
  predicted size matches a written checkpoint."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from parity import free_port, small_tmpfs
from test_fault_tolerance import alive, wait_for_text
from test_training import environment, trainer_args

from megatron_vlm import distributed
from megatron_vlm.config import load_run_config
from megatron_vlm.training import checkpoint, preflight

ROOT = Path(__file__).resolve().parents[1]
HOOK = distributed.HANG_TEST_HOOK


def torchrun(processes: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        f"--master_port={free_port()}",
    ]


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """Global rank -> PID of torchrun's workers."""
    ranks = {}
    for process in psutil.Process(launcher.pid).children():
        rank = process.environ().get("RANK")
        if rank is not None:
            ranks[int(rank)] = process.pid
    return ranks


def hang_and_time(command: list[str], log: Path, hook: str) -> tuple[float, str]:
    """Start ``command`` (torchrun, 2 ranks) with the hang hook; seconds from the hang until rank 0
    exited, and the log."""
    launcher = _start_with(command, log, {HOOK: hook})
    ranks: dict[int, int] = {}
    try:
        wait_for_text(log, f"{HOOK}: rank 1 stops answering", launcher, timeout=300)
        hung = time.monotonic()
        ranks = rank_pids(launcher)
        while alive([ranks[0]]) and time.monotonic() - hung < 120:
            time.sleep(0.1)
        elapsed = time.monotonic() - hung
        assert not alive([ranks[0]]), "rank 0 still running 120 s after rank 1 stopped answering"
    finally:
        launcher.kill()
        launcher.wait()
        for pid in alive(ranks.values()):  # rank 1 sleeps (or is stopped) forever; SIGKILL works on both
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    return elapsed, log.read_text()


def _start_with(command: list[str], log: Path, extra: dict[str, str]) -> subprocess.Popen:
    env = environment()
    for name in [n for n in env if n.startswith(("SLURM_", "MEGATRON_VLM_"))]:
        env.pop(name)
    env.update(extra)
    with open(log, "w") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


@pytest.mark.multiprocess
def test_a_silent_rank_makes_the_trainer_exit_within_the_timeout_naming_it(data_root, tmp_path):
    timeout = 8.0
    overrides = (
        "training.train_steps=400",
        "training.save_interval=1000",
        "training.log_interval=1",
        "training.warmup_steps=1",
        "training.eval_interval=0",
        f"training.collective_timeout_s={timeout}",
        "training.checkpoint_write_gbps=0.00001",  # 10 kB/s: the start-up save-time check warns
    )
    command = [*torchrun(2), *trainer_args(tmp_path / "run", data_root, *overrides)]
    elapsed, log = hang_and_time(command, tmp_path / "trainer.log", "1:3")
    assert f"rank 1 on {socket.gethostname()} did not answer within {timeout:g} s" in log, log[-4000:]
    assert "the last phase it entered: step 2, training step): it never reached the phase the others wait in" in log
    assert f"rank 0 on {socket.gethostname()} did not answer" not in log, "the waiting rank was blamed"
    predicted = preflight.predicted_checkpoint_bytes(load_run_config(ROOT / "examples/tiny_cpu.yaml"))
    assert f"WARNING a checkpoint save is predicted to take {predicted / 1e4:.0f} s (0.1 GB at 1e-05 GB/s" in log
    assert "longer than the 300 s between the time-limit signal and the limit" in log
    # It waited the configured time from rank 1's last sign of life (the start of step 2), and the
    # heartbeat ended it, not gloo's backstop (10 s later).
    assert int(re.search(r"last seen (\d+) s ago", log).group(1)) >= timeout
    assert elapsed <= timeout + 6, elapsed


@pytest.mark.multiprocess
def test_a_long_save_does_not_trip_and_a_step_hang_after_it_is_named(tmp_path):
    step = 2.0
    command = [
        *torchrun(2),
        str(ROOT / "tests/workers/heartbeat_worker.py"),
        f"--step-timeout={step}",
        "--long-timeout=60",
    ]
    elapsed, log = hang_and_time(command, tmp_path / "worker.log", "1:3:stop")  # rank 1 frozen (SIGSTOP)
    tail = log[-4000:]
    assert "rank 0: save survived" in log and "rank 1: save survived" in log, tail
    assert "finished" not in log, tail
    assert f"rank 1 on {socket.gethostname()} did not answer within {step:g} s" in log, tail
    # Frozen inside step 3, which both ranks entered: only its silence (no ticks) can name it.
    assert "the last phase it entered: step 3, training step): its process stopped responding" in log, tail
    assert int(re.search(r"last seen (\d+) s ago", log).group(1)) >= step, tail
    assert elapsed <= step + 6, (elapsed, tail)


@pytest.mark.parametrize(
    "override, refusal",
    [
        ("training.collective_timeout_s=0", "collective_timeout_s=0.0 must be a positive number of seconds"),
        ("training.checkpoint_timeout_s=-5", "checkpoint_timeout_s=-5.0 must be a positive number of seconds"),
        ("training.preemption_lead_s=0", "preemption_lead_s=0.0 must be a positive number of seconds"),
        ("training.checkpoint_write_gbps=-1", r"checkpoint_write_gbps=-1.0 must be >= 0 \(GB/s; 0: measured"),
        (
            "training.checkpoint_timeout_s=60",
            "checkpoint_timeout_s=60.0 is shorter than collective_timeout_s=600.0",
        ),
    ],
)
def test_invalid_timeouts_are_refused_by_name(override, refusal):
    run = load_run_config(ROOT / "examples/tiny_cpu.yaml", [override])
    with pytest.raises(ValueError, match=refusal):
        preflight.check_batch_layout(run, 1)


def test_a_timeout_that_is_not_a_number_is_refused_by_name():
    with pytest.raises(ValueError, match="collective_timeout_s: 'soon' is not a number"):
        load_run_config(ROOT / "examples/tiny_cpu.yaml", ["training.collective_timeout_s=soon"])


# --- a full disk while saving -------------------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 80 MiB filesystem (tmpfs): a checkpoint of the tiny model (55 MB) fits once, not twice.
    Mounting needs root (CAP_SYS_ADMIN): elsewhere the test fails, naming that."""
    with small_tmpfs(tmp_path / "small", "80m") as mount:
        yield mount


@pytest.mark.multiprocess
def test_a_full_disk_while_saving_names_enospc_and_keeps_the_previous_checkpoint(data_root, small_filesystem):
    from test_training import train_command

    run_dir = small_filesystem / "run"
    checkpoints = run_dir / "checkpoints"
    steps = (
        "training.save_interval=2",
        "training.log_interval=1",
        "training.warmup_steps=1",
        "training.eval_interval=0",
    )
    done = subprocess.run(
        train_command(2, run_dir, data_root, "training.train_steps=6", "training.keep_last=3", *steps),
        capture_output=True,
        text=True,
        env=environment(),
        cwd=ROOT,
        timeout=600,
    )
    log = done.stdout + done.stderr
    assert done.returncode != 0, log[-3000:]
    for rank in (0, 1):  # every rank raises the same error
        assert re.search(
            rf"\[rank{rank}\]: megatron_vlm\.training\.checkpoint\.CheckpointSaveFailed: checkpoint iter_0000004 "
            rf"could not be written: no space left on device \(ENOSPC\) in {re.escape(str(checkpoints))}; "
            rf"\d+ bytes were free of \d+ when it failed, \d+ after removing the partial write "
            rf"\.iter_0000004\.incomplete; {re.escape(str(checkpoints / 'iter_0000002'))} is still the latest "
            rf"complete checkpoint",
            log,
        ), log[-6000:]
    assert (checkpoints / "latest").read_text().strip() == "iter_0000002"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter_0000002", "latest"]  # the partial write is gone
    assert checkpoint.verify_checkpoint(checkpoints / "iter_0000002") == ([], True)
    # The save-time check's prediction against what was written (model, optimizer, per-rank files).
    written = sum(f.stat().st_size for f in (checkpoints / "iter_0000002").rglob("*") if f.is_file())
    predicted = preflight.predicted_checkpoint_bytes(load_run_config(ROOT / "examples/tiny_cpu.yaml"))
    assert predicted == pytest.approx(written, rel=0.03)
    resumed = subprocess.run(
        train_command(2, run_dir, data_root, "training.train_steps=2", *steps),
        capture_output=True,
        text=True,
        env=environment(),
        cwd=ROOT,
        timeout=600,
    )
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert f"resumed from {checkpoints / 'iter_0000002'} at step 2" in resumed.stdout


# --- does a save fit the preemption lead time? --------------------------------------------------


def test_the_save_time_check_warns_with_the_numbers():
    stage1 = load_run_config(ROOT / "examples/idefics2_8b_stage1.yaml")
    size = preflight.predicted_checkpoint_bytes(stage1)  # bf16 model + Adam for what trains (LoRA: not the bases)
    full = preflight.predicted_checkpoint_bytes(
        load_run_config(ROOT / "examples/idefics2_8b_stage1.yaml", ["trainable.lora_rank=0"])
    )
    assert 16e9 < size < full and full == pytest.approx(8.4e9 * 14, rel=0.02)  # 2 + 4 + 8 bytes a parameter
    warning = preflight.checkpoint_time_warning(stage1, 0.05e9, measured=True)
    seconds = size / 0.05e9
    assert f"predicted to take {seconds:.0f} s ({size / 1e9:.1f} GB at 0.05 GB/s, measured by one writer" in warning
    assert "longer than the 300 s between the time-limit signal and the limit" in warning
    assert f"--signal=B:USR1@{seconds * 1.5:.0f}" in warning
    assert preflight.checkpoint_time_warning(stage1, 1e9, measured=False) is None  # about 29 s: fits
    tight = load_run_config(ROOT / "examples/idefics2_8b_stage1.yaml", ["training.preemption_lead_s=20"])
    assert "training.checkpoint_write_gbps), longer than the 20 s" in preflight.checkpoint_time_warning(
        tight, 1e9, False
    )


def test_the_write_rate_is_measured_without_leaving_a_file(tmp_path):
    rate = checkpoint.measure_write_bandwidth(tmp_path, size=8 * 2**20)
    assert rate is not None and rate > 1e6  # bytes/s
    assert list(tmp_path.iterdir()) == []
