"""Process environment (torchrun, Slurm srun, MPI) -> torch.distributed + Megatron parallel state.

Layouts are checked against the model before anything is allocated, with the fix named.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    timeout_s: float = 600.0,
    env: ProcessEnvironment | None = None,
) -> ProcessEnvironment:
    """Start torch.distributed from the launcher's environment and Megatron's parallel state.

    ``timeout_s`` is every process group's collective timeout (the default group's and each of
    Megatron's groups): start-up, where one rank may read files the others wait for, runs under it;
    the trainer then switches phase by phase through :func:`heartbeat`."""
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
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        # Megatron's own default (30 min) differs from init_process_group's: one value for all groups.
        distributed_timeout_minutes=timeout_s / 60,  # a float is fine: it only builds a timedelta
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return env


def collective_device() -> torch.device:
    """Where small tensors for collectives must live: NCCL takes CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if backend.has_cuda() else torch.device("cpu")


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def all_gather_object(value: Any, group: Any = None) -> list[Any]:
    """Every rank's ``value`` (of ``group``; default: all ranks) in rank order, on every rank.
    Pickled between this job's own processes only."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def broadcast_object(value: Any) -> Any:
    """Global rank 0's ``value`` on every rank (pickled between this job's own processes only)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    from megatron.core import parallel_state

    stop_watching()  # before the store (hosted by rank 0) goes away
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


def start_tool(model: ModelConfig, parallel: ParallelConfig, world_size: int) -> None:
    """For tools: refuse an impossible layout by name, run this same command under torchrun on this
    node when it needs ``world_size`` ranks and was started as one process, then initialise
    torch.distributed and the parallel state (end with ``shutdown()``)."""
    check_layout(model, parallel, world_size)
    run_with_world_size(world_size)
    initialize(parallel, model)


# --- Collective timeouts that name the rank ---------------------------------------------------
#
# A rank that stops answering (a frozen node, a process stuck in its data loader or a filesystem
# call, a SIGSTOPped process) leaves its peers waiting inside a collective. The backends' own
# timeouts do not say who is missing: gloo raises "Timed out waiting N ms for recv operation" in
# the waiting rank; NCCL's watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING at torch's default 3, "tear
# down without cleaning up the communicators") kills the *process* from its own thread, reporting
# only the waiting rank's operation and sequence number, and the Python caller never gets an
# exception (1 aborts the communicators first, 2 aborts them without killing the process and leaves
# the CUDA stream running on garbage: neither names the missing rank). So a heartbeat decides, the
# same way for both backends:
# - every rank posts (beat count, allowed seconds, step, phase, host) to the rendezvous store when
#   the trainer *enters* a phase (:func:`heartbeat`: each training step, an evaluation, a checkpoint
#   save, the end); every rank goes through the same phases, so beat counts line up. The allowance
#   is the run's ``collective_timeout_s`` for a step and ``checkpoint_timeout_s`` for saves and
#   evaluation, which are collective too but legitimately long;
# - a watcher thread on every rank ticks its own key once a second (the process is alive), and
#   reads the others' records: rank 0 every rank's (one multi_get), the others rank 0's only;
# - a watched rank is named when, for longer than its own allowance, either its ticks stopped (the
#   process is frozen or gone) or its beat count stayed behind this rank's (it never reached the
#   phase this rank is waiting in). Ranks waiting in the same collective are even, so a waiting rank
#   is never blamed; if *every* rank entered the same phase and none left it within the allowance,
#   rank 0 says so (a rank is stuck inside that phase, or the timeout is shorter than a step);
# - the watcher logs "rank N on HOST did not answer within T s (last seen ...)" and exits the
#   process, non-zero (EXIT_PEER_LOST): its main thread is blocked inside the collective (NCCL's
#   for good), and the launcher then stops the job so that Slurm's requeue can take over;
# - staleness is timed by the watcher's own clock from when it saw a record change: hosts' clocks
#   need not agree.
# The process groups' own timeouts stay as the backstop, a little longer than the allowance
# (``_backstop``) so that the heartbeat, which names the rank, fires first; they follow the phase
# (short in steps, long in saves and evaluation) through torch's set_timeout.

_BEAT = "megatron_vlm/heartbeat/"
_TICK = "megatron_vlm/alive/"
EXIT_PEER_LOST = 75  # EX_TEMPFAIL: the job may be requeued
# Test hook (tests/test_collective_timeout.py): "RANK:STEP" makes that rank's main thread sleep
# forever before it enters that training step (as a rank stuck in its data loader: the others
# wait for it in step STEP); "RANK:STEP:stop" freezes the whole process (SIGSTOP) just after it
# entered the step (as a node that dies mid-step: every rank entered it). Never set in production.
HANG_TEST_HOOK = "MEGATRON_VLM_TEST_HANG_AT_STEP"


def _backstop(seconds: float) -> float:
    """The process groups' timeout for a phase allowed ``seconds``: the heartbeat names the rank first."""
    return seconds + max(10.0, 0.1 * seconds)


class _Watch:
    def __init__(self, store: dist.Store, rank: int, world: int) -> None:
        self.store, self.rank, self.world = store, rank, world
        self.count = 0  # this rank's beats (written by the main thread, read by the watcher)
        self.allowed = 0.0
        self.timeout: float | None = None  # what the process groups are set to now
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def post(self, step: int, phase: str, allowed: float) -> None:
        record = {"count": self.count + 1, "allowed": allowed, "step": step, "phase": phase}
        self.store.set(f"{_BEAT}{self.rank}", json.dumps({**record, "host": socket.gethostname()}))
        self.count, self.allowed = self.count + 1, allowed

    def run(self, interval: float = 1.0) -> None:
        ranks = [r for r in range(self.world) if r != self.rank] if self.rank == 0 else [0]
        keys = [f"{_BEAT}{r}" for r in ranks] + [f"{_TICK}{r}" for r in ranks]
        beats: dict[int, tuple[int, float]] = {}  # rank -> (beat count, when this watcher saw it change)
        ticks: dict[int, tuple[bytes, float]] = {}
        mine = (0, time.monotonic())
        tick = 0
        while not self.stopped.wait(interval):
            try:
                tick += 1
                self.store.set(f"{_TICK}{self.rank}", str(tick))
                values = self.store.multi_get(keys)
            except Exception as error:  # noqa: BLE001 - rank 0 (the store) gone: the backstop decides
                if not self.stopped.is_set():
                    logging.getLogger("megatron_vlm").warning("heartbeat watcher stops: store unreachable (%s)", error)
                return
            now = time.monotonic()
            if mine[0] != self.count:
                mine = (self.count, now)
            records = {}
            late = []
            for rank, beat, alive in zip(ranks, values[: len(ranks)], values[len(ranks) :], strict=True):
                record = records[rank] = json.loads(bytes(beat).decode())
                if beats.get(rank, (None,))[0] != record["count"]:
                    beats[rank] = (record["count"], now)
                if ticks.get(rank, (None,))[0] != bytes(alive):
                    ticks[rank] = (bytes(alive), now)
                silent = now - beats[rank][1]  # since it entered its last phase
                quiet = min(silent, now - ticks[rank][1])  # since any sign of life (a tick or a beat)
                if quiet > record["allowed"]:
                    late.append(f"{self._who(rank, record, quiet)}: its process stopped responding")
                elif record["count"] < self.count and min(silent, now - mine[1]) > min(record["allowed"], self.allowed):
                    # Behind: every phase ends in a collective, so it left its last phase (a save, with
                    # the long allowance) with the others; then the phase they wait in sets the limit.
                    behind, limit = min(silent, now - mine[1]), min(record["allowed"], self.allowed)
                    late.append(
                        f"{self._who(rank, record, behind, limit)}: it never reached the phase the others wait in"
                    )
            if late and not self.stopped.is_set():
                self.lost("; ".join(late))
            # Everyone alive (a frozen one is named above once its ticks are stale too), even, and silent.
            stuck = now - mine[1] > self.allowed and all(
                r["count"] == self.count and now - beats[k][1] > self.allowed and now - ticks[k][1] <= r["allowed"]
                for k, r in records.items()
            )
            if self.rank == 0 and stuck and not self.stopped.is_set():
                self.lost(
                    f"every rank entered step {records[ranks[0]]['step'] if ranks else '?'} "
                    f"({records[ranks[0]]['phase'] if ranks else '?'}) and none left it within "
                    f"{self.allowed:g} s: one is stuck inside it (or the timeout is shorter than the phase)"
                )

    @staticmethod
    def _who(rank: int, record: dict[str, Any], silent: float, limit: float | None = None) -> str:
        return (
            f"rank {rank} on {record['host']} did not answer within {record['allowed'] if limit is None else limit:g} s "
            f"(last seen {silent:.0f} s ago; the last phase it entered: step {record['step']}, {record['phase']})"
        )

    def lost(self, reason: str) -> None:
        message = (
            f"rank {self.rank} on {socket.gethostname()}: {reason}; exiting (code {EXIT_PEER_LOST}) so that the "
            f"launcher stops the job and it can be requeued (training.collective_timeout_s / checkpoint_timeout_s)"
        )
        logging.getLogger("megatron_vlm").critical(message)
        print(message, file=sys.stderr, flush=True)
        for callback in _on_lost:
            try:
                callback()
            except Exception:  # noqa: BLE001, S110 - exiting anyway; the callback is best effort
                pass
        sys.stdout.flush()
        os._exit(EXIT_PEER_LOST)  # the main thread is blocked inside a collective: no exception reaches it


_watch: _Watch | None = None
_on_lost: list[Callable[[], None]] = []


def _set_group_timeouts(seconds: float) -> None:
    """Every process group this rank belongs to (the default one and Megatron's) gets ``seconds``."""
    set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout  # torch < 2.14
    timeout = datetime.timedelta(seconds=seconds)
    for group in list(dist.distributed_c10d._world.pg_map):
        try:
            set_timeout(timeout, group)
        except (ValueError, RuntimeError):  # not a member, or a backend without timeouts
            pass


def _test_hook(rank: int, step: int, entered: bool) -> None:
    """See HANG_TEST_HOOK."""
    spec = os.environ.get(HANG_TEST_HOOK, "").split(":")
    if spec[:2] != [str(rank), str(step)] or (spec[2:] == ["stop"]) != entered:
        return
    print(f"{HANG_TEST_HOOK}: rank {rank} stops answering at step {step}", file=sys.stderr, flush=True)
    if entered:
        os.kill(os.getpid(), signal.SIGSTOP)
    while True:
        time.sleep(3600)


def heartbeat(step: int, phase: str, allowed_s: float) -> None:
    """This rank enters ``phase`` (at ``step``) and will be back within ``allowed_s`` seconds; past
    that, the other ranks exit naming it. The first call starts watching (collective: every rank
    of the trainer calls it at the same point). No-op without torch.distributed or with one rank."""
    global _watch
    if not dist.is_initialized() or dist.get_world_size() == 1:  # nobody to wait for
        return
    if _watch is None:
        _watch = _Watch(dist.distributed_c10d._get_default_store(), dist.get_rank(), dist.get_world_size())
        _watch.store.set(f"{_TICK}{_watch.rank}", "0")
        _watch.post(step, phase, allowed_s)
        dist.barrier()  # every record exists before anyone reads them
        _watch.thread = threading.Thread(target=_watch.run, name="heartbeat-watcher", daemon=True)
        _watch.thread.start()
    else:
        if phase == "training step":
            _test_hook(_watch.rank, step, entered=False)
        _watch.post(step, phase, allowed_s)
        if phase == "training step":
            _test_hook(_watch.rank, step, entered=True)
    if _watch.timeout != _backstop(allowed_s):
        _set_group_timeouts(_backstop(allowed_s))
        _watch.timeout = _backstop(allowed_s)


def on_peer_lost(callback: Callable[[], None]) -> None:
    """Run ``callback`` (e.g. release the run lock) before the process exits for a silent peer."""
    _on_lost.append(callback)


def stop_watching() -> None:
    """Stop the heartbeat watcher (before the process group and its store go away)."""
    global _watch
    if _watch is not None:
        _watch.stopped.set()
        _watch = None
    _on_lost.clear()


# --------------------------------------------------------------------------------------------
# One rank loads, the others receive (the trainer's per-rank loading)
# --------------------------------------------------------------------------------------------


def broadcast_tensors(
    tensors: dict[str, torch.Tensor] | None,
    meta: Any,
    src: int,
    group: Any,
    device: torch.device | str,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Collective over ``group``: the ``src`` rank's named tensors, of any shapes and dtypes (which
    the others do not know in advance: a micro-batch's ``[images, 3, H, W]`` varies), and its
    JSON-able ``meta`` reach every rank of the group. Other ranks pass ``tensors=None, meta=None``.

    Megatron-LM's ``broadcast_data`` sends a fixed key set of one dtype with sizes it can size in
    advance; here a header (names, dtypes, shapes and ``meta``, as JSON) goes first, then one flat
    buffer per dtype. Tensors arrive on ``device`` (the collectives' device: CUDA for NCCL), bit
    for bit; bool travels as uint8. Returns (tensors, meta) on every rank (``src``'s own, moved to
    ``device``)."""
    sending = dist.get_rank() == src
    if sending:
        if tensors is None:
            raise ValueError(f"rank {src} broadcasts but was given no tensors")
        moved = {name: tensor.to(device, non_blocking=True) for name, tensor in tensors.items()}
        described = [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in moved.items()]
        header = json.dumps({"meta": meta, "tensors": described}).encode()
        length = torch.tensor([len(header)], dtype=torch.int64, device=device)
    else:
        length = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(length, src, group=group)
    if sending:
        payload = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(device)
    else:
        payload = torch.empty(int(length[0]), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src, group=group)
    # The sender decodes its own header too: every rank returns the same (JSON round-tripped) meta.
    decoded = json.loads(header) if sending else json.loads(payload.cpu().numpy().tobytes())
    meta, described = decoded["meta"], decoded["tensors"]
    by_dtype: dict[str, list[list[Any]]] = {}
    for entry in described:
        by_dtype.setdefault(entry[1], []).append(entry)
    out: dict[str, torch.Tensor] = {}
    for dtype_name, entries in sorted(by_dtype.items()):
        dtype = getattr(torch, dtype_name)
        wire = torch.uint8 if dtype == torch.bool else dtype
        sizes = [math.prod(shape) for _, _, shape in entries]
        if sending:
            parts = [moved[name].reshape(-1).view(wire) for name, _, _ in entries]
            buffer = torch.cat(parts) if parts else torch.empty(0, dtype=wire, device=device)
        else:
            buffer = torch.empty(sum(sizes), dtype=wire, device=device)
        if sum(sizes):
            dist.broadcast(buffer, src, group=group)
        if sending:
            continue
        for (name, _, shape), piece in zip(entries, buffer.split(sizes), strict=True):
            out[name] = piece.view(dtype).reshape(shape)
    return (moved if sending else out), meta
