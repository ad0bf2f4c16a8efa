"""The trainer on real processes: loss falls on the bundled data, every metric reaches TensorBoard,
a 2-process run SIGKILLed while writing a checkpoint resumes bit for bit from the previous one,
MPI launches work, NaN/Inf steps are skipped, and impossible layouts are refused up front."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from parity import free_port

from megatron_vlm.data.preprocess import preprocess
from megatron_vlm.training.metrics import TENSORBOARD_METRICS

pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name in ("interleaved", "pairs", "pages"):
        preprocess([DATA / f"{name}.jsonl"], root / name, samples_per_shard=4, progress=False)
    return root


def trainer_args(output, data_root, *overrides):
    """``-m megatron_vlm.train`` on the tiny preset and the given data, writing into ``output``
    (without the preset's benchmarks, which the README run and the sweeps test; an override may
    turn them on)."""
    return [
        "-m",
        "megatron_vlm.train",
        "--config",
        str(ROOT / "examples/tiny_cpu.yaml"),
        f"training.output_dir={output}",
        f"data.root={data_root}",
        "training.benchmarks.interval=0",
        *overrides,
    ]


def train_command(processes, output, data_root, *overrides):
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        f"--master_port={free_port()}",
    ]
    return [*launch, *trainer_args(output, data_root, *overrides)]


def environment():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    return env


def run(command, timeout=900, extra_env=None):
    env = {**environment(), **(extra_env or {})}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done.stdout


def scalars(tensorboard_dir, name):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {event.step: event.value for event in accumulator.Scalars(f"train/{name}")}


@pytest.mark.first_env_only
def test_tiny_run_learns_and_reports_every_metric(data_root, tmp_path):
    output = run(
        train_command(
            1,
            tmp_path / "run",
            data_root,
            "training.train_steps=30",
            "training.log_interval=3",
            "training.save_interval=30",
        )
    )
    assert "step     30/30" in output and "ETA" in output and "MFU" in output
    losses = scalars(tmp_path / "run" / "tensorboard", "loss")
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < first - 1.0, losses  # from ~ln(32003) = 10.4, clearly down
    for name in TENSORBOARD_METRICS:
        values = scalars(tmp_path / "run" / "tensorboard", name)
        assert sorted(values) == list(range(3, 31, 3)), name
    rates = scalars(tmp_path / "run" / "tensorboard", "learning_rate")
    assert rates[6] > rates[30] and rates[30] == pytest.approx(2e-4, rel=1e-3)  # warm-up, then cosine down to min
    assert scalars(tmp_path / "run" / "tensorboard", "tokens_per_second")[30] > 0
    # Packed documents fill most positions; the packed vision tower computes no padded patch.
    assert 0.3 < scalars(tmp_path / "run" / "tensorboard", "real_token_fraction")[30] <= 1
    assert set(scalars(tmp_path / "run" / "tensorboard", "real_patch_fraction").values()) == {1.0}
    assert 0 < scalars(tmp_path / "run" / "tensorboard", "mfu")[30] < 1
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "iter_0000030"


def kill_everything_running(output, processes=3):
    """SIGKILL every process whose command line names this run's output directory (torchrun starts
    its workers in sessions of their own, so a process-group kill would miss them): at least
    ``processes`` of them (torchrun + its ranks)."""
    import psutil

    named = [
        p for p in psutil.process_iter(["cmdline"]) if any(str(output) in part for part in p.info["cmdline"] or [])
    ]
    # Their helpers too (e.g. checkpoint writer processes), which a real SIGKILL would orphan.
    victims = {p for process in named for p in [process, *process.children(recursive=True)]}
    for victim in victims:
        victim.send_signal(signal.SIGKILL)
    psutil.wait_procs(list(victims), timeout=30)
    assert len(named) >= processes


@pytest.mark.parametrize(
    "optimizer",
    # fp32 Adam's resume is the cross-version test's (tests/test_cross_version.py, both directions).
    [
        # Both overlaps: the checkpoints are written through parameters_gathered.
        [
            "training.distributed_optimizer=true",
            "training.overlap_grad_reduce=true",
            "training.overlap_param_gather=true",
        ],
        # With NEFTune's noise (issue #23): drawn per micro-batch from its data, so the resume is exact.
        ["precision.params_dtype=bfloat16", "training.neftune_alpha=5"],
    ],
    ids=["distributed-adam-overlapped", "bf16-neftune"],
)
def test_killed_two_process_run_resumes_bit_for_bit(data_root, tmp_path, optimizer):
    steps = ["training.train_steps=8", "training.save_interval=4", "training.log_interval=1", *optimizer]
    whole = run(train_command(2, tmp_path / "whole", data_root, *steps))
    reference = scalars(tmp_path / "whole" / "tensorboard", "loss")
    assert ("NEFTune: noise of alpha 5" in whole) == ("training.neftune_alpha=5" in optimizer)
    # Written in the background while step 5 trains, published after it (training.async_save).
    assert whole.index("step      5/8") < whole.index(f"saved {tmp_path / 'whole' / 'checkpoints' / 'iter_0000004'}")

    process = subprocess.Popen(
        train_command(2, tmp_path / "cut", data_root, *steps),
        env=environment(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill it while it writes its step-8 checkpoint: the step-4 one must stay the latest and load.
    writing = tmp_path / "cut" / "checkpoints" / ".iter_0000008.incomplete"
    deadline = time.time() + 600
    while not writing.exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before writing step 8"
        time.sleep(0.01)
    kill_everything_running(tmp_path / "cut")  # the launcher and every rank, mid-write
    process.wait()
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "iter_0000004"
    assert not (tmp_path / "cut" / "checkpoints" / "iter_0000008").exists()

    output = run(train_command(2, tmp_path / "cut", data_root, *steps))
    assert "resumed from" in output and "iter_0000004 at step 4" in output
    resumed = scalars(tmp_path / "cut" / "tensorboard", "loss")
    for step in range(5, 9):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])
    assert not list((tmp_path / "cut" / "checkpoints").glob(".iter_*"))  # the cut-off write was cleared
    assert reference[8] != reference[5]
    if "training.distributed_optimizer=true" in optimizer:  # Adam's state, gathered from both ranks' shards
        description = json.loads((tmp_path / "cut" / "checkpoints" / "iter_0000008" / "megatron_vlm.json").read_text())
        assert description["optimizer"] == {"format": "model_space", "step": 8, "state_keys": ["exp_avg", "exp_avg_sq"]}


@pytest.mark.first_env_only
def test_a_slow_rank_is_named_within_the_configured_steps(data_root, tmp_path):
    """Issue #26: rank 1 of a data-parallel pair sleeps 1 s in its compute phase every step (the test
    hook of training/stragglers.py). Timing every step and naming after 3 slow timed steps in a row, the
    log names rank 1 (with its host and device) at step 3 and never rank 0, and TensorBoard has both
    ranks' phase times. The even run (test_mpi_launch, same settings) names nobody."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = ["training.straggler_interval=1", "training.straggler_samples=3", "training.straggler_margin=0.5"]
    steps = ["training.train_steps=4", "training.warmup_steps=1", "training.save_interval=4"]
    command = train_command(2, tmp_path / "slow", data_root, *steps, *settings)
    output = run(command, extra_env={"MEGATRON_VLM_TEST_COMPUTE_DELAY": "1:1.0"})
    named = [line for line in output.splitlines() if "straggler:" in line]
    assert named and "step 3 | straggler: rank 1 (" in named[0], named
    assert not any("straggler: rank 0" in line for line in named)
    events = EventAccumulator(str(tmp_path / "slow" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    slow = [e.value for e in events.Scalars("ranks/00001/compute_s")]
    fast = [e.value for e in events.Scalars("ranks/00000/compute_s")]
    assert len(slow) == len(fast) == 4 and all(s > f + 0.8 for s, f in zip(slow, fast, strict=True))
    # The fast rank waits for the slow one in the gradient reduction.
    assert all(e.value > 0.5 for e in events.Scalars("ranks/00000/grad_sync_s"))


def test_mpi_launch(data_root, tmp_path):
    """Ranks from an MPI launcher's environment (mpich's mpiexec sets PMI_RANK / PMI_SIZE, not
    MASTER_ADDR / MASTER_PORT): the ranks agree on rank 0's host and a free port through mpi4py.
    Every step is timed for stragglers (as in the slowed run above): nobody is named in this even run."""
    command = [
        str(Path(sys.executable).parent / "mpiexec"),
        "-n",
        "2",
        sys.executable,
        *trainer_args(
            tmp_path / "mpi",
            data_root,
            "training.train_steps=6",
            "training.save_interval=6",
            "training.straggler_interval=1",
            "training.straggler_samples=3",
            "training.straggler_margin=0.5",
        ),
    ]
    env = environment()
    env.pop("MASTER_ADDR", None)
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    output = done.stdout
    first = next(line for line in output.splitlines() if " INFO " in line)
    assert "rank 0/2 (local 0) launched by pmi; rendezvous at " in first and "(mpi4py)" in first
    assert "on 2 ranks" in output and "step      6/6" in output
    assert "straggler" not in output
    assert (tmp_path / "mpi" / "checkpoints" / "latest").read_text().strip() == "iter_0000006"


def test_nonfinite_steps_are_skipped_then_the_run_stops(data_root, tmp_path):
    """A learning rate that blows the weights up: NaN/Inf steps are skipped (the learning-rate
    schedule does not advance on them) and counted (in the log and in TensorBoard), and past the
    limit the run stops with a message naming the cause."""
    import math

    with pytest.raises(RuntimeError) as error:
        run(
            train_command(
                1,
                tmp_path / "nan",
                data_root,
                "training.lr=1e30",
                "training.warmup_steps=5",
                "training.max_nonfinite_steps=2",
                "training.log_interval=1",
                "training.train_steps=20",
            ),
            timeout=600,
        )
    message = str(error.value)
    assert "3 steps with NaN/Inf loss or gradients (limit 2): lower the learning rate or check the data" in message
    assert message.count("update skipped") >= 3
    losses = scalars(tmp_path / "nan" / "tensorboard", "loss")
    first = min(step for step, loss in losses.items() if not math.isfinite(loss))  # the first skipped step
    for count in (1, 2, 3):
        assert f"step {first + count - 1}: non-finite loss or gradients, update skipped ({count} so far)" in message
    # Steps up to the second skip are logged (the third raises before its line), the earlier ones finite.
    assert sorted(losses) == list(range(1, first + 2)) and all(math.isfinite(losses[s]) for s in range(1, first))
    skipped = scalars(tmp_path / "nan" / "tensorboard", "skipped_steps")
    assert skipped == {step: float(max(0, step - first + 1)) for step in losses}, skipped
    # Linear warm-up over 5 steps, advanced by updated steps only: held from the first skipped step on.
    rates = scalars(tmp_path / "nan" / "tensorboard", "learning_rate")
    assert rates == {step: pytest.approx(1e30 * min(step, first - 1) / 5, rel=1e-6) for step in losses}, rates


@pytest.mark.first_env_only
@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        (["parallel.tensor_parallel=3"], "choose TP from"),
        (["training.global_batch_size=3"], "use a multiple of 2"),
        (["parallel.pipeline_parallel=8"], "not divisible by TP\\*PP"),
        (["training.warmup_steps=100"], "warmup_steps=100 must be smaller than train_steps=60"),
        (["training.overlap_param_gather=true"], "overlap_param_gather=true .* needs distributed_optimizer=true"),
    ],
)
def test_impossible_layouts_are_refused_before_allocation(data_root, tmp_path, overrides, fix):
    import re

    with pytest.raises(RuntimeError) as error:
        run(train_command(1, tmp_path / "bad", data_root, *overrides), timeout=300)
    assert re.search(fix, str(error.value))
    assert not (tmp_path / "bad" / "checkpoints").exists()
