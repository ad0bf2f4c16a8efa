import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402


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
