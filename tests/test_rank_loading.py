"""Per-rank loading (``data.loading=broadcast``) on real processes: within a model-parallel group
only tensor-parallel rank 0 of the first pipeline stage reads and decodes; every other rank gets
bit for bit the micro-batches it would have loaded itself (pixels only on the first stage), the
same stream state for checkpoints, and a training run gives the same losses as every rank loading
its own, through a resume with prefetch on."""

import json
import os
import re
import signal
import subprocess

import pytest
from parity import run_torchrun
from test_training import ROOT, environment, run, scalars, train_command

pytestmark = pytest.mark.multiprocess


def test_one_rank_decodes_and_the_others_receive_identical_batches_tp2_pp2(data_root, tmp_path):
    out = tmp_path / "ranks"
    run_torchrun(
        "rank_loading_worker.py", 4, ["--tp", "2", "--pp", "2", "--data-root", str(data_root), "--out", str(out)]
    )
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(4)]
    assert sorted((r["pp_rank"], r["tp_rank"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for report in ranks:
        loads = report["pp_rank"] == 0 and report["tp_rank"] == 0
        # The worker's reference loader (every rank loads itself) decodes; the feed's only on one rank,
        # also when resuming (its pending documents are re-read there only).
        assert report["decoded_own"] > 0
        assert (report["decoded"] > 0) == loads and (report["decoded_resumed"] > 0) == loads, report
        assert all(step["pixels"] == (report["pp_rank"] == 0) for step in report["steps"]), report
    assert sum(step["images"] for step in ranks[0]["steps"]) > 0  # the steps checked hold images


# The data path does not depend on the Megatron-Core version (the broadcast itself is checked in both
# environments above): one environment keeps the CI budget.
@pytest.mark.first_env_only
def test_training_at_tp2_broadcast_with_prefetch_resumes_to_the_same_losses(data_root, tmp_path):
    """A TP2 run whose rank 0 alone loads, prefetching 2 steps, preempted (SIGUSR1) after step 2:
    its checkpoint holds the stream after the steps trained (not the prefetched ones), and the
    resumed run's losses equal, bit for bit, a run where every rank loads its own micro-batches."""
    common = ["parallel.tensor_parallel=2", "training.log_interval=1", "training.eval_interval=0"]
    steps = ["training.train_steps=6", "training.save_interval=100", "training.warmup_steps=2"]
    run(train_command(2, tmp_path / "own", data_root, *common, *steps, "data.loading=every_rank", "data.prefetch=0"))
    reference = scalars(tmp_path / "own" / "tensorboard", "loss")

    cut = [*common, *steps, "data.loading=broadcast", "data.prefetch=2"]
    process = subprocess.Popen(
        train_command(2, tmp_path / "cut", data_root, *cut),
        env=environment(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if match := re.search(r"pid (\d+), rank 0,", line):
            rank0 = int(match[1])
        if "step      2/6" in line:
            os.kill(rank0, signal.SIGUSR1)  # a preemption: checkpoint at the end of this step, then exit
    assert process.wait(timeout=600) == 0, "".join(lines)[-4000:]
    preempted = int(re.search(r"preempted at step (\d+)", "".join(lines))[1])
    assert 2 <= preempted < 6
    output = run(train_command(2, tmp_path / "cut", data_root, *cut))
    assert f"iter_{preempted:07d} at step {preempted}" in output
    losses = scalars(tmp_path / "cut" / "tensorboard", "loss")
    assert sorted(losses) == list(range(1, 7)) and len(set(reference.values())) == 6
    for step in range(1, 7):
        assert losses[step] == reference[step], (step, losses[step], reference[step])
