"""Asynchronous checkpoint saving (megatron_vlm.training.async_save, issue 14) on 2 real gloo ranks
(torchrun, tests/workers/async_save_worker.py, one run for every test here):
- training keeps stepping (in-place updates) while a sharded save and per-rank files are written;
  what loads back is the state at schedule time;
- the finalize callbacks run once, in order, on every rank, only after every rank's writes ended
  (rank 1's is slower: rank 0 keeps stepping although its own write is done); with nothing pending
  ``maybe_finalize`` is no collective;
- a background write that fails on rank 1 only (a directory where its dist_checkpointing file
  goes; a full 8 MiB tmpfs, root only) raises on every rank naming rank 1's error, runs no
  finalize callback, leaves ``latest`` on the previous checkpoint, which loads; the next save works.
"""

import json
import re

import pytest
from parity import run_torchrun, small_tmpfs


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's findings (result<rank>.json) from one run of the worker, with a full-disk phase
    on a small tmpfs."""
    out = tmp_path_factory.mktemp("async_save")
    with small_tmpfs(out / "small", "8m") as full:
        run_torchrun("async_save_worker.py", 2, ["--out", str(out), "--full", str(full)], timeout=240)
    return [json.loads((out / f"result{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.multiprocess
def test_training_continues_while_the_save_is_written_and_the_snapshot_is_what_loads(ranks):
    for rank in ranks:
        assert rank["pending_after_schedule"] is True
        assert len(rank["not_ready_at"]) >= 1  # steps ran while the save was pending
        assert rank["training_changed_tensors"] is True  # they changed the tensors in place ...
        assert rank["loaded_equals_snapshot"] is True  # ... and the checkpoint holds them as scheduled
        assert rank["rank_file_equals_snapshot"] is True
        assert rank["loaded_step"] == 1


@pytest.mark.multiprocess
def test_finalize_callbacks_run_in_order_after_every_rank_has_written(ranks):
    first, second = ranks
    for rank in ranks:
        assert rank["finalize_calls"] == ["check", "publish"]
        assert rank["pending_after_finalize"] is False
        assert rank["latest"] == "iter_0000001"
        seen = rank["seen_at_finalize"]
        assert seen["rank_files"] == ["per-rank", "per-rank"]  # both ranks' files complete and loadable
        assert {".metadata", "metadata.json", *rank["rank1_model_files"]} <= set(seen["model_files"])
        # not before rank 1's slower write ended (one host, one clock) ...
        assert rank["finalized_at"] >= second["own_write_finished_at"]
    # ... although rank 0's own write had ended long before, and it kept stepping meanwhile
    # (``maybe_finalize`` returned at once, not blocked inside a collective of the finalization).
    assert first["finalized_at"] - first["own_write_finished_at"] > 2.0
    steps_after_own_write = [t for t in first["not_ready_at"] if t > first["own_write_finished_at"]]
    assert len(steps_after_own_write) >= 3, first["not_ready_at"]
    assert first["idle_finalize"] == [True, True, True]  # nothing pending: rank 0 alone, no collective


@pytest.mark.multiprocess
def test_a_write_failing_on_one_rank_raises_on_every_rank_and_publishes_nothing(ranks):
    errors = {rank["failure_error"] for rank in ranks}
    assert len(errors) == 1, errors  # the same error on both ranks, rank 1's cause included
    (error,) = errors
    assert error is not None
    assert error.startswith("background checkpoint write failed: rank 1: "), error
    assert re.search(r"\.iter_0000002\.incomplete/model failed \(\d+ bytes free there\)", error), error
    assert "Is a directory" in error and "rank 0:" not in error, error
    for rank in ranks:
        assert rank["failure_finalize_ran"] == []
        assert rank["pending_after_failure"] is False
        assert rank["latest_after_failure"] == "iter_0000001"
        assert rank["latest_loads_save_1"] is True
        # The next save after the failures: nothing of theirs is read as its own.
        assert rank["after_failures_equals_snapshot"] is True
        assert rank["after_failures_step"] == 3
        assert rank["after_failures_latest"] == "iter_0000003"


@pytest.mark.multiprocess
def test_a_full_disk_on_one_rank_reaches_every_rank_through_on_failure(ranks):
    errors = {rank["full_error"] for rank in ranks}
    assert len(errors) == 1, errors
    (error,) = errors
    prefix = "checkpoint not written: background checkpoint write failed: rank 1: "
    assert error is not None and error.startswith(prefix), error
    # Megatron-Core's writers drop the OSError (0.16 pickles the failure across processes, 0.19
    # keeps its type only): the free space says it, as the trainer's ENOSPC check reads it.
    free = re.search(r"\.iter_0000001\.incomplete/model failed \((\d+) bytes free there\)", error)
    assert free is not None and int(free.group(1)) < 2**20, error
    for rank in ranks:
        assert rank["full_error_cause"] == "AsyncSaveFailed"
        assert rank["full_finalize_ran"] == []
        assert rank["full_latest_exists"] is False
