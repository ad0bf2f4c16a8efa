"""Impossible parallel layouts are refused before allocation, with the fix named."""

import pytest

from megatron_vlm.config import ParallelConfig, load_model_preset
from megatron_vlm.distributed import check_layout, detect_environment

MODEL = load_model_preset("idefics2-8b")


def test_feasible_8b_layouts_pass():
    check_layout(MODEL, ParallelConfig(tensor_parallel=4, pipeline_parallel=2), world_size=64)
    check_layout(MODEL, ParallelConfig(tensor_parallel=2, pipeline_parallel=4, virtual_pipeline=2), world_size=16)
    check_layout(
        MODEL, ParallelConfig(tensor_parallel=2, pipeline_parallel=4, decoder_layers_in_first_stage=5), world_size=8
    )


@pytest.mark.parametrize(
    ("parallel", "world_size", "fix"),
    [
        (ParallelConfig(tensor_parallel=8), 8, r"choose TP from \[1, 2, 4\]"),  # 4 resampler KV heads
        (ParallelConfig(tensor_parallel=3), 3, "TP=3 must divide the text attention heads"),
        (ParallelConfig(pipeline_parallel=3), 6, "choose a PP\\*VPP that divides 32"),
        (ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 6, "not divisible by TP\\*PP"),
        (ParallelConfig(pipeline_parallel=64), 64, "choose a PP\\*VPP that divides 32"),
        (ParallelConfig(pipeline_parallel=3, decoder_layers_in_first_stage=3), 3, "must split evenly"),
        (ParallelConfig(pipeline_parallel=1, virtual_pipeline=2), 1, "virtual_pipeline needs pipeline_parallel >= 2"),
        (ParallelConfig(sequence_parallel=True), 1, "sequence_parallel .* needs tensor_parallel >= 2"),
        (ParallelConfig(tensor_parallel=256), 256, "must divide make_vocab_size_divisible_by=128"),
    ],
)
def test_impossible_layouts_name_the_fix(parallel, world_size, fix):
    with pytest.raises(ValueError, match=fix):
        check_layout(MODEL, parallel, world_size)


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, ("torchrun", 3, 8, 1)),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5"}, ("slurm", 5, 16, 5)),
        (
            {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
            ("openmpi", 2, 4, 0),
        ),
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, ("pmi", 1, 2, 0)),
        ({}, ("single", 0, 1, 0)),
    ],
)
def test_launcher_environment(monkeypatch, variables, expected):
    for name in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "PMI_RANK",
        "PMI_SIZE",
        "PMIX_RANK",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    env = detect_environment()
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == expected


def test_mpi_ranks_without_an_address_or_mpi4py_are_refused_by_name(monkeypatch):
    """Several nodes under mpirun, no MASTER_ADDR and no mpi4py: nothing to agree with; one node is fine."""
    import sys

    from megatron_vlm.distributed import agree_rendezvous

    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "SLURM_PROCID", "PMI_RANK", "PMIX_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py fails
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "16")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "8")
    env = detect_environment()
    assert env.launcher == "openmpi" and env.master_addr is None
    with pytest.raises(RuntimeError, match="MASTER_ADDR/MASTER_PORT unset and mpi4py not installed"):
        agree_rendezvous(env)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "16")
    assert agree_rendezvous(detect_environment()).rendezvous == "local"
