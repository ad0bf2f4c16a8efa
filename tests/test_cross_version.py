"""Checkpoints across Megatron-Core versions: a training checkpoint (model + optimizer + scheduler +
RNG + loader state) written under an older supported version resumes under a newer one, and the run
continues as the writer's own uninterrupted run did. Downwards, from 0.19 (common state inside the
sharded files) to an older version (which needs common.pt), it is refused by name.

Needs a second environment with another Megatron-Core version: ``MEGATRON_VLM_OTHER_PYTHON`` names
its Python (``.ci/run`` sets it to the Python 3.12 + megatron-core 0.19.2 environment while the
Python 3.11 + 0.16.1 suite runs).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version
from test_training import environment, scalars, trainer_args

pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).resolve().parents[1]
OTHER = os.environ.get("MEGATRON_VLM_OTHER_PYTHON")

if not OTHER:
    pytestmark = [
        pytestmark,
        pytest.mark.skip(
            reason="MEGATRON_VLM_OTHER_PYTHON is not set (the Python of an environment with another "
            "Megatron-Core version; .ci/run sets it)"
        ),
    ]


def megatron_core_version(python: str) -> str:
    done = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('megatron-core'))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return done.stdout.strip()


def train(python: str, output: Path, data_root: Path, *overrides: str) -> str:
    steps = ["training.train_steps=4", "training.save_interval=2", "training.log_interval=1", "training.warmup_steps=1"]
    command = [python, *trainer_args(output, data_root, *steps, *overrides)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=environment(), cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done.stdout


@pytest.fixture(scope="module")
def pythons():
    versions = {sys.executable: megatron_core_version(sys.executable), OTHER: megatron_core_version(OTHER)}
    assert len(set(versions.values())) == 2, f"both environments have megatron-core {versions[sys.executable]}"
    return versions


@pytest.fixture(scope="module")
def written(pythons, data_root, tmp_path_factory):
    """Each environment's uninterrupted 4-step run (checkpoints at steps 2 and 4), per optimizer."""
    runs = {}
    for variant, overrides in VARIANTS.items():
        for python in pythons:
            output = tmp_path_factory.mktemp(f"{variant}-{pythons[python]}")
            train(python, output, data_root, *overrides)
            runs[variant, python] = output
    return runs


VARIANTS = {
    "adam": [],  # optimizer state through dist_checkpointing
    "bf16": ["precision.params_dtype=bfloat16"],  # per-rank optimizer state with fp32 main weights
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("direction", ["this->other", "other->this"])
def test_training_checkpoint_resumes_under_the_other_version(pythons, written, data_root, tmp_path, variant, direction):
    this, other = sys.executable, OTHER
    writer, reader = (this, other) if direction == "this->other" else (other, this)
    source = written[variant, writer]
    reference = scalars(source / "tensorboard", "loss")

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / "iter_0000002", resumed / "checkpoints" / "iter_0000002")
    (resumed / "checkpoints" / "latest").write_text("iter_0000002\n")
    if Version(pythons[reader]) < Version("0.19") <= Version(pythons[writer]):
        with pytest.raises(RuntimeError) as refused:
            train(reader, resumed, data_root, *VARIANTS[variant])
        assert (
            f"was written by megatron-core {pythons[writer]}, which keeps the checkpoint's common state inside "
            f"its sharded files (no common.pt); megatron-core {pythons[reader]} cannot read that layout"
        ) in str(refused.value)
        return
    output = train(reader, resumed, data_root, *VARIANTS[variant])
    assert "resumed from" in output and "at step 2" in output
    losses = scalars(resumed / "tensorboard", "loss")
    for step in (3, 4):
        assert losses[step] == pytest.approx(reference[step], rel=1e-5), (pythons[writer], pythons[reader], step)
    # The two versions' own uninterrupted runs agree too: the same math.
    other_run = scalars(written[variant, reader] / "tensorboard", "loss")
    assert other_run[4] == pytest.approx(reference[4], rel=1e-5)
