"""Micro-batches made ahead in a background thread (data/prefetch.py, training/data_feed.py): the
same stream as made on demand, a checkpointed state that describes what was consumed (not what was
prefetched) and resumes to the same next micro-batches, loader errors raised in the consumer by
name, and a thread that stops when closed. In process, on the bundled data."""

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from parity import tiny_config

from megatron_vlm.data.batch import MODEL_INPUTS
from megatron_vlm.data.images import ImageConfig
from megatron_vlm.data.loader import DataConfig, MultimodalLoader, SourceConfig
from megatron_vlm.data.prefetch import Prefetcher, PrefetchError
from megatron_vlm.data.tokens import load_tokenizer

IMAGE_TOKEN = 32001
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def make_loader(root, tokenizer, lanes=2):
    config = DataConfig(
        sources=(
            SourceConfig("obelics", str(root / "interleaved"), 0.5, 384),
            SourceConfig("pairs", str(root / "pairs"), 0.3, 256),
            SourceConfig("pages", str(root / "pages"), 0.2, 256),
        ),
        image=ImageConfig(longest_edge=112, shortest_edge=56),
        micro_batch_size=2,
        image_backend="pillow",
    )
    return MultimodalLoader(config, tokenizer, 64, IMAGE_TOKEN, lanes=lanes)


def assert_same_batch(got, expected):
    for name in MODEL_INPUTS:
        assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]), name
    for name in ("source", "lane", "positions", "num_images", "num_tokens"):
        assert got[name] == expected[name], name


def wait_for(condition, seconds=60):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def with_state(loader):
    """What the trainer's feed pairs: a micro-batch and the loader's state right after it."""
    return lambda: (next(loader), loader.state_dict())


def test_prefetched_stream_and_resume_equal_the_synchronous_ones(data_root, tokenizer):
    synchronous = make_loader(data_root, tokenizer)
    reference = [next(synchronous) for _ in range(9)]
    ahead = make_loader(data_root, tokenizer)
    with Prefetcher(with_state(ahead), depth=3) as prefetcher:
        consumed = [next(prefetcher) for _ in range(5)]
        for (batch, _), expected in zip(consumed, reference, strict=False):
            assert_same_batch(batch, expected)
        saved = consumed[-1][1]  # the state after the 5th micro-batch, the last one consumed
        wait_for(lambda: prefetcher.waiting == 3)  # the thread fills its 3 slots meanwhile
    assert not prefetcher.alive
    assert ahead.state_dict() != saved  # the loader itself is 3 micro-batches ahead
    resumed = make_loader(data_root, tokenizer)
    resumed.load_state_dict(saved)
    for expected in reference[5:]:
        assert_same_batch(next(resumed), expected)


def test_loader_errors_reach_the_consumer_by_name(data_root, tokenizer, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    loader = make_loader(root, tokenizer)
    for shard in root.rglob("*.tar"):  # the shards vanish after indexing: reading them fails
        shard.unlink()
    prefetcher = Prefetcher(lambda: next(loader), depth=2, name="data prefetch (test)")
    with pytest.raises(PrefetchError, match=r"data prefetch \(test\) failed: FileNotFoundError") as error:
        next(prefetcher)
    assert isinstance(error.value.__cause__, FileNotFoundError)
    assert not prefetcher.alive


def test_close_stops_a_producer_blocked_on_a_full_queue():
    produced = []
    prefetcher = Prefetcher(lambda: produced.append(len(produced)) or len(produced), depth=2)
    assert next(prefetcher) == 1
    wait_for(lambda: prefetcher.waiting == 2)  # it runs ahead: 2 more, then waits for room
    time.sleep(0.2)
    assert len(produced) == 3 and prefetcher.alive
    prefetcher.close()
    assert not prefetcher.alive and len(produced) == 3
    assert not any(t.name == "data prefetch" for t in threading.enumerate())
    with pytest.raises(PrefetchError, match="after close"):
        next(prefetcher)
    with pytest.raises(ValueError, match="prefetch depth"):
        Prefetcher(lambda: 0, depth=-1)


def test_data_feed_state_resumes_after_what_was_trained(data_root, tokenizer, megatron_single_process):
    """The trainer's feed, 2 steps of 2 micro-batches: prefetched steps equal synchronous ones, and
    its state after step k (the checkpoint's) resumes a new feed at step k + 1."""
    from megatron_vlm.training.data_feed import DataFeed

    model = tiny_config()

    def feed(prefetch):
        return DataFeed(make_loader(data_root, tokenizer), 2, model, prefetch=prefetch, loading="broadcast")

    synchronous, ahead = feed(0), feed(2)
    reference = [synchronous.next_step() for _ in range(4)]
    steps = [ahead.next_step() for _ in range(2)]
    saved = ahead.state_dict()
    wait_for(lambda: ahead.prefetcher.waiting == 2)
    ahead.close()
    assert not ahead.prefetcher.alive
    assert saved == reference[1].state and saved != ahead.loader.state_dict()  # trained, not prefetched
    resumed = feed(2)
    resumed.load_state_dict(saved)
    steps += [resumed.next_step() for _ in range(2)]
    resumed.close()
    for step, expected in zip(steps, reference, strict=True):
        assert step.meta == expected.meta and step.state == expected.state
        assert step.meta[0]["flops"] > 0 and "patches" in step.meta[0]
        for got, want in zip(step.inputs, expected.inputs, strict=True):
            assert got.keys() == set(MODEL_INPUTS)
            for name in MODEL_INPUTS:
                assert torch.equal(got[name], want[name]), name
    assert sum(len(s.meta) for s in steps) == 8


@pytest.mark.parametrize(
    ("override", "message"),
    [("data.prefetch=-1", "data.prefetch=-1: give the steps to prefetch"), ("data.loading=all", "data.loading='all'")],
)
def test_bad_data_feed_settings_are_refused_by_name(override, message):
    from megatron_vlm.config import load_run_config

    with pytest.raises(ValueError, match=message):
        load_run_config(ROOT / "examples" / "tiny_cpu.yaml", [override])
    run = load_run_config(ROOT / "examples" / "tiny_cpu.yaml")
    assert (run.data.prefetch, run.data.loading) == (2, "broadcast")
