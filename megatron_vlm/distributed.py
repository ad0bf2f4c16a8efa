"""Process environment (torchrun, Slurm srun, MPI) -> torch.distributed + Megatron parallel state.

Layouts are checked against the model before anything is allocated, with the fix named.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_vlm import backend
from megatron_vlm.config import ModelConfig, ParallelConfig

# Launchers that say how many of their ranks share this node: all of them on one node means the
# rendezvous can be this host even without MASTER_ADDR.
_LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "PMIX_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")
MPI_LAUNCHERS = ("openmpi", "pmix", "pmi")


@dataclass(frozen=True)
class ProcessEnvironment:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None  # None: the launcher did not say; agree_rendezvous decides
    master_port: int | None
    launcher: str
    rendezvous: str = "environment"  # where the address came from: environment, mpi4py, local, single

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size} (local {self.local_rank}) launched by {self.launcher}; "
            f"rendezvous at {self.master_addr}:{self.master_port} ({self.rendezvous})"
        )


def _first(*names: str) -> str | None:
    for name in names:
        if os.environ.get(name) not in (None, ""):
            return os.environ[name]
    return None


def detect_environment() -> ProcessEnvironment:
    """Rank and world size from torchrun, Slurm (srun) or MPI (OpenMPI / PMI / PMIx) variables."""
    launchers = (
        ("torchrun", ("RANK",), ("WORLD_SIZE",), ("LOCAL_RANK",)),
        ("slurm", ("SLURM_PROCID",), ("SLURM_NTASKS",), ("SLURM_LOCALID",)),
        ("openmpi", ("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_SIZE",), ("OMPI_COMM_WORLD_LOCAL_RANK",)),
        ("pmix", ("PMIX_RANK",), ("PMIX_SIZE", "OMPI_COMM_WORLD_SIZE"), ("PMIX_LOCAL_RANK",)),
        ("pmi", ("PMI_RANK",), ("PMI_SIZE",), ("MPI_LOCALRANKID", "PMI_LOCAL_RANK")),
    )
    for launcher, rank_vars, size_vars, local_vars in launchers:
        rank, size = _first(*rank_vars), _first(*size_vars)
        if rank is not None and size is not None:
            local = _first(*local_vars)
            address, port = os.environ.get("MASTER_ADDR") or None, os.environ.get("MASTER_PORT") or None
            if launcher not in MPI_LAUNCHERS:  # torchrun sets both; srun jobs get them from the batch script
                address, port = address or "127.0.0.1", port or "29500"
            return ProcessEnvironment(
                rank=int(rank),
                world_size=int(size),
                local_rank=int(local) if local is not None else 0,
                master_addr=address,
                master_port=int(port) if port else None,
                launcher=launcher,
            )
    # A lone process rendezvouses with itself: any free port will do.
    return ProcessEnvironment(
        0, 1, 0, "127.0.0.1", int(os.environ.get("MASTER_PORT") or free_port()), "single", rendezvous="single"
    )


def agree_rendezvous(env: ProcessEnvironment) -> ProcessEnvironment:
    """The address and port every rank connects to. MPI launchers (mpirun / mpiexec of OpenMPI,
    MPICH, PMIx) do not set MASTER_ADDR: rank 0 offers its host name and a free port through
    mpi4py, and every rank takes them (also written to MASTER_ADDR / MASTER_PORT, so that asking
    again gives the same answer). Collective over the MPI job when it has to agree."""
    if env.master_addr is not None and env.master_port is not None:
        return env
    try:
        from mpi4py import MPI
    except ImportError:
        local_size = _first(*_LOCAL_SIZE_VARS)
        if env.world_size == 1 or (local_size is not None and int(local_size) == env.world_size):  # one node
            offer = (env.master_addr or "127.0.0.1", env.master_port or 29500)
            rendezvous = "local"
        else:
            raise RuntimeError(
                f"launched by {env.launcher} with MASTER_ADDR/MASTER_PORT unset and mpi4py not installed: "
                f"ranks on several nodes cannot agree where to meet. Install mpi4py (pip install "
                f"'megatron-vlm[mpi]') or export MASTER_ADDR (rank 0's host) and MASTER_PORT to every rank"
            ) from None
    else:
        comm = MPI.COMM_WORLD
        if comm.Get_size() != env.world_size:
            raise RuntimeError(
                f"mpi4py sees {comm.Get_size()} ranks but the {env.launcher} environment says {env.world_size}"
            )
        offer = None
        if comm.Get_rank() == 0:
            offer = (env.master_addr or socket.gethostname(), env.master_port or free_port(bind=""))
        offer = comm.bcast(offer, root=0)
        rendezvous = "mpi4py"
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = offer[0], str(offer[1])
    return dataclasses.replace(env, master_addr=offer[0], master_port=int(offer[1]), rendezvous=rendezvous)


def check_layout(model: ModelConfig, parallel: ParallelConfig, world_size: int) -> None:
    """Refuse impossible parallel layouts before allocation, naming the fix."""
    problems = layout_problems(model, parallel, world_size)
    if problems:
        raise ValueError("impossible parallel layout:\n  " + "\n  ".join(problems))


def layout_problems(model: ModelConfig, parallel: ParallelConfig, world_size: int) -> list[str]:
    """Why a layout cannot run (empty if it can)."""
    tp, pp, vpp = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.virtual_pipeline
    problems = []
    if tp < 1 or pp < 1:
        problems.append("tensor_parallel and pipeline_parallel must be >= 1")
    elif world_size % (tp * pp):
        problems.append(
            f"world size {world_size} is not divisible by TP*PP = {tp}*{pp}; use a world size "
            f"that is a multiple of {tp * pp} or change TP/PP"
        )
    for part, heads, kv in (
        ("text", model.text.num_heads, model.text.num_kv_heads),
        ("vision", model.vision.num_heads, model.vision.num_heads),
        ("resampler", model.connector.num_heads, model.connector.num_kv_heads),
    ):
        if heads % tp or kv % tp:
            problems.append(
                f"TP={tp} must divide the {part} attention heads ({heads}) and KV heads ({kv}); "
                f"choose TP from {[d for d in range(1, kv + 1) if kv % d == 0 and heads % d == 0]}"
            )
    if model.make_vocab_size_divisible_by % tp:
        problems.append(
            f"TP={tp} must divide make_vocab_size_divisible_by={model.make_vocab_size_divisible_by} "
            f"(the vocabulary is padded to that multiple and split over TP ranks)"
        )
    for name, width in (
        ("text FFN", model.text.intermediate_size),
        ("vision FFN", model.vision.intermediate_size),
    ):
        if width % tp:
            problems.append(f"TP={tp} must divide the {name} width ({width})")
    chunks = pp * (vpp or 1)
    layers = model.text.num_layers
    first = parallel.decoder_layers_in_first_stage
    if first is not None:
        if pp < 2 or vpp:
            problems.append("decoder_layers_in_first_stage needs PP >= 2 without virtual pipeline")
        elif not 0 <= first < layers or (layers - first) % (pp - 1):
            problems.append(
                f"decoder_layers_in_first_stage={first}: the other {layers - first} decoder layers "
                f"must split evenly over the remaining {pp - 1} stages"
            )
    elif layers % chunks:
        problems.append(
            f"{layers} decoder layers do not split over PP*VPP = {chunks} model chunks; choose a "
            f"PP*VPP that divides {layers} or set decoder_layers_in_first_stage"
        )
    if vpp is not None and pp < 2:
        problems.append("virtual_pipeline needs pipeline_parallel >= 2")
    if parallel.sequence_parallel and tp < 2:
        problems.append(
            "sequence_parallel splits the sequence over tensor-parallel ranks: it needs tensor_parallel >= 2"
        )
    return problems


def initialize(
    parallel: ParallelConfig,
    model: ModelConfig,
    seed: int = 1234,
    timeout_minutes: int = 10,
    env: ProcessEnvironment | None = None,
) -> ProcessEnvironment:
    """Start torch.distributed from the launcher's environment and Megatron's parallel state."""
    from megatron.core import parallel_state, tensor_parallel

    env = agree_rendezvous(env or detect_environment())
    check_layout(model, parallel, env.world_size)
    backend.apply_cpu_patches()
    if backend.has_cuda():
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend.default_distributed_backend(),
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return env


def collective_device() -> torch.device:
    """Where small tensors for collectives must live: NCCL takes CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if backend.has_cuda() else torch.device("cpu")


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port(bind: str = "127.0.0.1") -> int:
    """A TCP port free on this host (``bind=""``: on every interface, for other hosts to reach)."""
    with socket.socket() as sock:
        sock.bind((bind, 0))
        return sock.getsockname()[1]


def run_with_world_size(processes: int) -> None:
    """For tools: when started as a plain process but the layout needs ``processes`` ranks,
    run this same command under torchrun on this node and exit with its status."""
    import subprocess
    import sys

    env = detect_environment()
    if env.world_size == processes:
        return
    if env.launcher != "single":
        raise ValueError(f"launched with {env.world_size} processes ({env.launcher}) but the layout needs {processes}")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        f"--master_port={free_port()}",
        sys.argv[0],
        *sys.argv[1:],
    ]
    raise SystemExit(subprocess.call(command))
