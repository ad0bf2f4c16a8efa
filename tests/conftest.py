import faulthandler
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import subprocess  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# SIGUSR2 prints every thread's Python stack instead of ending pytest: bench/gpu_check.sh sends it
# when a step runs out of time, so a hanging test shows where it hangs before it is killed.
if hasattr(signal, "SIGUSR2"):
    faulthandler.register(signal.SIGUSR2, all_threads=True)


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests need CUDA: skipped (not failed) on CPU-only hosts."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false): `pytest -m gpu` on a GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def megatron_single_process():
    """torch.distributed + Megatron parallel state for one process (TP=PP=1), shared by the session."""
    from parity import tiny_config

    from megatron_vlm import distributed
    from megatron_vlm.config import ParallelConfig

    for name in ("MASTER_PORT", "RANK", "WORLD_SIZE", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        os.environ.pop(name, None)
    distributed.initialize(ParallelConfig(), tiny_config())
    yield
    distributed.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoints(megatron_single_process, tmp_path_factory):
    """preset -> a tiny converted checkpoint with a sharpened output layer and its HF export
    (``generation_models.build_checkpoint``), built once per session on first use."""
    from generation_models import build_checkpoint

    root = tmp_path_factory.mktemp("tiny_checkpoints")
    built = {}

    def get(preset: str):
        if preset not in built:
            built[preset] = build_checkpoint(preset, root)
        return built[preset]

    return get


@pytest.fixture(scope="session")
def tiny_benchmarks(tmp_path_factory):
    """The bundled tiny VQAv2 / TextVQA / OK-VQA / COCO sets, built in both layouts
    (``examples/benchmarks/build.py``): ROOT/<task>/{hub,release}."""
    out = tmp_path_factory.mktemp("benchmarks")
    subprocess.run([sys.executable, str(ROOT / "examples/benchmarks/build.py"), str(out)], check=True, timeout=300)
    return out


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The cluster .ci/run started (SLURM_CONF), or one started here for this module."""
    if os.environ.get("SLURM_CONF"):
        yield os.environ["SLURM_CONF"]
        return
    state = tmp_path_factory.mktemp("slurm")
    subprocess.run(["bash", str(ROOT / "slurm/local_cluster.sh"), "start", str(state)], check=True, timeout=600)
    yield str(state / "slurm.conf")
    subprocess.run(["bash", str(ROOT / "slurm/local_cluster.sh"), "stop", str(state)], check=False, timeout=60)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    from megatron_vlm.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("data")
    for name in ("interleaved", "pairs", "pages"):
        preprocess([ROOT / "examples" / "data" / f"{name}.jsonl"], root / name, samples_per_shard=4, progress=False)
    # The tiny benchmark sets the run configs score on (training.benchmarks), as the launcher builds them.
    subprocess.run([sys.executable, str(ROOT / "examples/benchmarks/build.py"), str(root / "benchmarks")], check=True)
    return root
