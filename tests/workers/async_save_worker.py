"""Run under torchrun (2 gloo ranks) by tests/test_async_save.py: asynchronous checkpoint saves
(megatron_vlm.training.async_save) of a sharded state dict while "training" keeps changing the
tensors in place, then saves whose background write fails on rank 1 only. Each rank writes what it
saw to OUT/result<rank>.json; the test asserts on it.

1. a save (dist_checkpointing model + per-rank file; rank 1's per-rank file is written 2 s after
   rank 0's writes ended): the finalize callbacks (check what every rank wrote, publish it as
   ``latest``) run once, in order, after rank 1's write, while both ranks kept stepping; what loads
   back equals the state when the requests were made, not the tensors as training left them;
2. rank 1's dist_checkpointing file cannot be created (a directory stands at its name: fails for
   root too): every rank raises AsyncSaveFailed naming rank 1's error, no finalize callback runs,
   ``latest`` still loads save 1;
3. (--full DIR, a small tmpfs) rank 1's shard does not fit: ENOSPC, through the caller's on_failure;
4. a save after those failures succeeds (nothing of theirs is left for it to read).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class ConvertedFailure(RuntimeError):
    """What this worker's on_failure makes of a failed save (the trainer's: CheckpointSaveFailed)."""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--full", type=Path, default=None, help="a small filesystem for the ENOSPC save")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_vlm import backend
    from megatron_vlm.training import async_save

    backend.apply_cpu_patches()  # as the trainer: DCP's finalization asks for torch.cuda.current_device()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    root = args.out / "checkpoints"
    result: dict = {"rank": rank}
    writer = async_save.AsyncCheckpointWriter()

    torch.manual_seed(0)
    bias = torch.randn(4096)  # replicated: the same on every rank
    torch.manual_seed(1 + rank)
    weight = torch.randn(256, 4096)  # this rank's rows of a (256 * world, 4096) tensor

    def sharded(w: torch.Tensor, b: torch.Tensor, step: int) -> dict:
        return {
            "weight": ShardedTensor.from_rank_offsets("weight", w, (0, rank, world)),
            "bias": ShardedTensor.from_rank_offsets("bias", b, replica_id=rank),
            "step": step,  # common (non-sharded) state
        }

    def load(path: Path) -> dict:
        loaded = dist_checkpointing.load(sharded(torch.zeros_like(weight), torch.zeros_like(bias), 0), str(path))
        return {"weight": loaded["weight"], "bias": loaded["bias"], "step": loaded["step"]}

    def incomplete(iteration: int, base: Path = root) -> Path:
        directory = base / f".iter_{iteration:07d}.incomplete"
        if rank == 0:
            (directory / "model").mkdir(parents=True)
        dist.barrier()
        return directory

    def publish(directory: Path, base: Path = root) -> None:
        """What the trainer's finalize callbacks do (rank 0 renames, then `latest`), collectively."""
        final = base / directory.name.removeprefix(".").removesuffix(".incomplete")
        dist.barrier()  # every rank is done with the directory (the trainer's manifest is collective too)
        if rank == 0:
            os.replace(directory, final)
            (base / "latest.tmp").write_text(final.name)
            os.replace(base / "latest.tmp", base / "latest")
        dist.barrier()

    def train_until_finalized(limit_s: float = 60.0) -> list[float]:
        """Steps (in-place updates, as an optimizer's) until the save is finalized; when each step
        found it not finalized yet."""
        not_ready: list[float] = []
        started = time.monotonic()
        while not writer.maybe_finalize(blocking=False):
            not_ready.append(time.time())
            weight.add_(1.0)
            bias.mul_(2.0)
            time.sleep(0.05)
            if time.monotonic() - started > limit_s:
                raise TimeoutError(f"rank {rank}: the save was not finalized within {limit_s} s")
        return not_ready

    class TimedFileSave(async_save.FileSave):
        """A real per-rank write, ``delay`` seconds late (rank 1: a slow disk); records when it ended."""

        def __init__(self, obj: object, path: Path, delay: float) -> None:
            super().__init__(obj, path)
            self.delay = delay
            self.finished_at: float | None = None

        def write(self) -> None:
            time.sleep(self.delay)
            super().write()
            self.finished_at = time.time()

    class Marker(async_save.SaveRequest):
        def __init__(self, path: Path) -> None:
            self.path = path

        def write(self) -> None:
            self.path.write_text("done")

    class AfterFile(async_save.SaveRequest):
        """Waits (on the writer thread) until another rank's Marker exists."""

        def __init__(self, path: Path) -> None:
            self.path = path

        def write(self) -> None:
            deadline = time.monotonic() + 120
            while not self.path.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.path} did not appear")
                time.sleep(0.02)

    # --- 1. a save while training goes on ---------------------------------------------------------
    directory = incomplete(1)
    snapshot = {"weight": weight.clone(), "bias": bias.clone()}
    rank_file = TimedFileSave({"weight": weight, "note": "per-rank"}, directory / f"rank{rank:05d}.pt", 2.0 * rank)
    rank0_done = args.out / "rank0_wrote_save_1"
    calls: list[str] = []

    def check_every_rank_wrote() -> None:
        calls.append("check")
        result["finalized_at"] = time.time()
        result["seen_at_finalize"] = {
            "rank_files": [torch.load(directory / f"rank{r:05d}.pt", weights_only=True)["note"] for r in range(world)],
            "model_files": sorted(p.name for p in (directory / "model").iterdir()),
        }

    def publish_first() -> None:
        calls.append("publish")
        publish(directory)

    model = async_save.sharded_save(sharded(weight, bias, 1), directory / "model")
    # Rank 1's per-rank file is written 2 s after rank 0's writes ended, whatever the load here.
    requests = [model, rank_file, Marker(rank0_done)] if rank == 0 else [model, AfterFile(rank0_done), rank_file]
    weight.add_(1.0)  # the optimizer steps before the writes even start: the requests hold their own copy
    bias.mul_(2.0)
    writer.schedule(requests, [check_every_rank_wrote, publish_first])
    result["pending_after_schedule"] = writer.pending
    result["not_ready_at"] = train_until_finalized()
    result["own_write_finished_at"] = rank_file.finished_at
    result["finalize_calls"] = calls
    result["pending_after_finalize"] = writer.pending
    # Nothing pending: no collective (rank 0 alone calls it; a collective here would pair with the barrier).
    result["idle_finalize"] = [writer.maybe_finalize() for _ in range(3)] if rank == 0 else []
    dist.barrier()
    final = root / "iter_0000001"
    loaded = load(final / "model")
    result["loaded_equals_snapshot"] = all(torch.equal(loaded[k], snapshot[k]) for k in snapshot)
    result["loaded_step"] = loaded["step"]
    result["training_changed_tensors"] = not torch.equal(weight, snapshot["weight"])
    own = torch.load(final / f"rank{rank:05d}.pt", weights_only=True)
    result["rank_file_equals_snapshot"] = torch.equal(own["weight"], snapshot["weight"])
    result["latest"] = (root / "latest").read_text()
    rank1_files = sorted(p.name for p in (final / "model").glob("__1_*"))  # what rank 1 writes of a save
    result["rank1_model_files"] = rank1_files

    # --- 2. rank 1's background write fails --------------------------------------------------------
    directory = incomplete(2)
    if rank == 1:
        for name in rank1_files:  # open(name, "wb") fails with EISDIR, for root too
            (directory / "model" / name).mkdir()
    dist.barrier()
    ran: list[str] = []
    requests = [
        async_save.sharded_save(sharded(weight, bias, 2), directory / "model"),
        async_save.FileSave({"weight": weight}, directory / f"rank{rank:05d}.pt"),
    ]
    writer.schedule(requests, [lambda: ran.append("finalize"), lambda: publish(directory)])
    try:
        train_until_finalized()
        result["failure_error"] = None
    except async_save.AsyncSaveFailed as error:
        result["failure_error"] = str(error)
    result["failure_finalize_ran"] = ran
    result["pending_after_failure"] = writer.pending
    result["latest_after_failure"] = (root / "latest").read_text()
    loaded = load(root / (root / "latest").read_text() / "model")
    result["latest_loads_save_1"] = all(torch.equal(loaded[k], snapshot[k]) for k in snapshot)

    # --- 3. a full disk on rank 1 (a real small tmpfs), through on_failure ----------------------------
    if args.full is not None:
        full_root = args.full / "checkpoints"
        directory = incomplete(1, full_root)
        # Rank 1's shard (64 MiB) is larger than the filesystem, rank 0's small; rank 1 fills the
        # disk only once rank 0's writes are done (else they could fail too: a race, not the point).
        big = torch.ones(16 * 2**20 if rank == 1 else 1024)
        model = async_save.sharded_save(
            {f"part{rank}": ShardedTensor.from_rank_offsets(f"part{rank}", big)}, directory / "model"
        )
        rank_file = async_save.FileSave({"step": torch.tensor(3)}, directory / f"rank{rank:05d}.pt")
        rank0_done = args.out / "rank0_wrote_to_the_small_filesystem"
        requests = [model, rank_file, Marker(rank0_done)] if rank == 0 else [AfterFile(rank0_done), model, rank_file]
        ran = []
        writer.schedule(
            requests,
            [lambda: ran.append("finalize")],
            on_failure=lambda error: ConvertedFailure(f"checkpoint not written: {error}"),
        )
        try:
            train_until_finalized()
            result["full_error"] = None
        except ConvertedFailure as error:
            result["full_error"] = str(error)
            result["full_error_cause"] = type(error.__cause__).__name__
        result["full_finalize_ran"] = ran
        result["full_latest_exists"] = (full_root / "latest").exists()

    # --- 4. the next save after the failures ----------------------------------------------------------
    directory = incomplete(3)
    snapshot = {"weight": weight.clone(), "bias": bias.clone()}
    writer.schedule(
        [async_save.sharded_save(sharded(weight, bias, 3), directory / "model")], [lambda: publish(directory)]
    )
    weight.add_(1.0)
    bias.mul_(2.0)
    writer.close()  # as at the end of training: waits and finalizes
    loaded = load(root / "iter_0000003" / "model")
    result["after_failures_equals_snapshot"] = all(torch.equal(loaded[k], snapshot[k]) for k in snapshot)
    result["after_failures_step"] = loaded["step"]
    result["after_failures_latest"] = (root / "latest").read_text()

    (args.out / f"result{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
