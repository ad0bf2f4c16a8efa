"""Validation during pretraining and the token-weighted loss.

* A held-out split is never trained on, and an overlapping or missing one is refused by name.
* The validation micro-batches are fixed: the same plan whatever the seed and data-parallel rank.
* The training loss of a global batch is the per-token mean over all its micro-batches, computed
  transformers' own next-token loss summed over the micro-batches (the old mean of per-micro-batch
  means is not).
* The trainer logs the validation loss per source to TensorBoard and its log at every
  ``eval_interval`` and at the end; a resumed run evaluates the same; the same checkpoint
  evaluates the same at TP1 (the trainer) and at TP2xPP2 (real torchrun processes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from parity import run_torchrun
from test_training import run, train_command

from megatron_vlm.data.loader import MultimodalLoader, load_data_config
from megatron_vlm.data.preprocess import preprocess
from megatron_vlm.data.shards import Sample, Shard, ShardWriter, shard_paths
from megatron_vlm.data.tokens import load_tokenizer
from megatron_vlm.data.validation import ValidationSet, evenly_spaced

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
SOURCES = {"obelics": "interleaved", "pairs": "pairs", "pdfs": "pages"}  # the tiny mixture's
IMAGE_SEQ_LEN, IMAGE_TOKEN_ID = 8, 32001  # the tiny preset's num_latents and <image> id


def write_shards(samples: list[Sample], directory: Path, name: str, per_shard: int = 4) -> None:
    for start in range(0, len(samples), per_shard):
        writer = ShardWriter(directory / f"{name}-{start // per_shard:05d}.tar")
        for sample in samples[start : start + per_shard]:
            writer.write(sample)
        writer.close()


def carve_validation(directory: Path, every: int = 3) -> list[Sample]:
    """Hold out every ``every``-th sample of a preprocessed source (its first one included) as
    ``directory/validation``, the rest staying the training shards; returns the held-out samples."""
    paths = shard_paths(directory)
    samples = [sample for path in paths for sample in Shard(path)]
    for path in paths:
        path.unlink()
        Path(f"{path}.idx.json").unlink()
    held = [s for i, s in enumerate(samples) if i % every == 0]
    write_shards([s for i, s in enumerate(samples) if i % every], directory, directory.name)
    write_shards(held, directory / "validation", directory.name)
    return held


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The bundled data with a validation split per source (obelics 3 of 8, pairs 5 of 13, pdfs 1 of 2)."""
    root = tmp_path_factory.mktemp("data")
    for directory in SOURCES.values():
        preprocess([DATA / f"{directory}.jsonl"], root / directory, samples_per_shard=4, progress=False)
        carve_validation(root / directory)
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def tiny_loader(root, tokenizer, mixture="tiny", seed=1234, dp_rank=0, dp_size=1):
    config = load_data_config(mixture, root, micro_batch_size=2, image_backend="pillow", seed=seed)
    return MultimodalLoader(config, tokenizer, IMAGE_SEQ_LEN, IMAGE_TOKEN_ID, dp_rank, dp_size)


def row_documents(batch, pad_token_id: int = 0) -> list[list[int]]:
    """Every document of a micro-batch, as its tokens: positions restart at 0 at each document
    (and are 0 on padding, whose tokens are the pad id)."""
    documents = []
    for tokens, positions in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist(), strict=True):
        starts = [i for i, position in enumerate(positions) if position == 0] + [len(tokens)]
        for begin, end in zip(starts, starts[1:], strict=False):
            if tokens[begin:end] != [pad_token_id]:
                documents.append(tokens[begin:end])
    return documents


def seen_in(document: list[int], trained: list[list[int]], eos: int) -> bool:
    """Whether a document's tokens were trained on: whole, or as the prefix a truncated copy kept."""
    return any(t == document if t[-1] == eos else t == document[: len(t)] for t in trained)


def test_validation_samples_are_never_trained_on(data_root, tokenizer):
    """Several epochs of every source: each training sample shows up, no held-out one ever does."""
    loader = tiny_loader(data_root, tokenizer)
    trained = {name: [] for name in SOURCES}
    for _ in range(60):
        batch = next(loader)
        trained[batch["source"]] += row_documents(batch, tokenizer.pad_token_id or 0)
    assert all(loader.epochs_completed(name) >= 1 for name in SOURCES), {n: loader.epochs_completed(n) for n in SOURCES}
    eos = tokenizer.eos_token_id
    for name, directory in SOURCES.items():
        held = [s for path in shard_paths(data_root / directory / "validation") for s in Shard(path)]
        kept = [s for path in shard_paths(data_root / directory) for s in Shard(path)]
        assert held and kept and not {s.key for s in held} & {s.key for s in kept}
        for sample in kept:  # the check finds what was trained on
            assert seen_in(loader.tokens(sample, name), trained[name], eos), (name, sample.key)
        for sample in held:
            assert not seen_in(loader.tokens(sample, name), trained[name], eos), (name, sample.key)


def test_a_split_held_out_by_preprocessing_is_never_trained_on(tokenizer, tmp_path):
    """``preprocess(validation_fraction=...)`` (tools/preprocess_data.py --validation-fraction) writes
    the split where the loader finds it by default; training never reads it."""
    preprocess([DATA / "pairs.jsonl"], tmp_path / "pairs", samples_per_shard=4, progress=False, validation_fraction=0.5)
    mixture = tmp_path / "pairs.yaml"
    mixture.write_text(
        yaml.safe_dump(
            {
                "image": {"longest_edge": 112, "shortest_edge": 56},
                "sources": [{"name": "pairs", "shards": "pairs", "seq_len": 192}],
            }
        )
    )
    loader = tiny_loader(tmp_path, tokenizer, mixture)
    assert loader.config.sources[0].validation == str(tmp_path / "pairs" / "validation")
    trained = [document for _ in range(16) for document in row_documents(next(loader))]
    assert loader.epochs_completed("pairs") >= 1
    held = [s for path in shard_paths(tmp_path / "pairs" / "validation") for s in Shard(path)]
    kept = [s for path in shard_paths(tmp_path / "pairs") for s in Shard(path)]
    assert held and kept and len(held) + len(kept) == 13
    eos = tokenizer.eos_token_id
    assert all(seen_in(loader.tokens(sample, "pairs"), trained, eos) for sample in kept)
    assert not any(seen_in(loader.tokens(sample, "pairs"), trained, eos) for sample in held)
    assert ValidationSet(loader, 32).chosen == {"pairs": len(held)}


def test_validation_plans_do_not_depend_on_seed_or_data_parallel_rank(data_root, tokenizer, tmp_path):
    reference = ValidationSet(tiny_loader(data_root, tokenizer), samples=4)
    assert reference.sources == list(SOURCES)
    assert reference.chosen == {"obelics": 3, "pairs": 4, "pdfs": 1}  # all of a smaller split
    assert reference.skipped == {}
    assert ValidationSet(tiny_loader(data_root, tokenizer, seed=7), 4).plans == reference.plans
    # Without pdfs (one training sample): data-parallel loaders.
    mixture = yaml.safe_load((ROOT / "examples/data_mixtures/tiny.yaml").read_text())
    mixture["sources"] = mixture["sources"][:2]
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(mixture))
    two = [p for p in reference.plans if p.source != "pdfs"]
    for seed, dp_rank, dp_size in [(1234, 1, 2), (99, 2, 3)]:
        loader = tiny_loader(data_root, tokenizer, tmp_path / "two.yaml", seed, dp_rank, dp_size)
        assert ValidationSet(loader, 4).plans == two
    # The ranks' shares cover every micro-batch once; the interleaved schedule's multiple pads with empty ones.
    shares = [reference.plans_for(rank, 2, multiple=2) for rank in range(2)]
    assert all(len(share) % 2 == 0 for share in shares)
    assert sorted((p for share in shares for p in share if p.source), key=reference.plans.index) == reference.plans
    # A planned micro-batch: the planned documents, in the training format, with their loss tokens.
    plan = reference.plans[0]
    batch = reference.micro_batch(plan)
    assert batch["source"] == plan.source and batch["input_ids"].shape == (2, 256)
    assert len(row_documents(batch)) == sum(len(row) for row in plan.rows)
    empty = reference.micro_batch(reference.plans_for(0, 1, multiple=len(reference.plans) + 1)[-1])
    assert empty["source"] is None and empty["loss_mask"].sum() == 0
    assert evenly_spaced(4, 13) == [0, 4, 8, 12] and evenly_spaced(5, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="at least 1"):
        ValidationSet(tiny_loader(data_root, tokenizer), samples=0)


def test_overlapping_or_missing_validation_splits_are_refused(data_root, tokenizer, tmp_path):
    def mixture(validation):
        path = tmp_path / "mixture.yaml"
        source = {"name": "pairs", "shards": "pairs", "seq_len": 192}
        if validation is not None:
            source["validation"] = validation
        path.write_text(yaml.safe_dump({"image": {"longest_edge": 112, "shortest_edge": 56}, "sources": [source]}))
        return path

    with pytest.raises(ValueError, match="both a training and a validation shard"):
        tiny_loader(data_root, tokenizer, mixture=mixture("pairs"))
    with pytest.raises(FileNotFoundError, match="validation split .*nowhere does not exist"):
        tiny_loader(data_root, tokenizer, mixture=mixture("nowhere"))
    assert load_data_config(mixture(False), data_root).sources[0].validation is None
    assert load_data_config(mixture("pairs/validation"), data_root).sources[0].validation == str(
        data_root / "pairs" / "validation"
    )
    assert load_data_config(mixture(None), data_root).sources[0].validation == str(data_root / "pairs" / "validation")
    empty = tmp_path / "empty"  # a validation directory without shards (nothing held out): no split
    shutil.copytree(data_root / "pairs", empty / "pairs", ignore=shutil.ignore_patterns("validation"))
    (empty / "pairs" / "validation").mkdir()
    assert load_data_config(mixture(None), empty).sources[0].validation is None


def test_eval_settings_are_checked():
    from megatron_vlm.config import load_run_config
    from megatron_vlm.training.preflight import check_batch_layout

    with pytest.raises(ValueError, match=r"unknown keys \['eval_iters'\]"):
        load_run_config(ROOT / "examples/tiny_cpu.yaml", ["training.eval_iters=5"])
    with pytest.raises(ValueError, match="eval_samples=0 must be at least 1"):
        check_batch_layout(load_run_config(ROOT / "examples/tiny_cpu.yaml", ["training.eval_samples=0"]), 1)
    with pytest.raises(ValueError, match="eval_interval=-1 must be >= 0"):
        check_batch_layout(load_run_config(ROOT / "examples/tiny_cpu.yaml", ["training.eval_interval=-1"]), 1)
    with pytest.raises(ValueError, match="save_interval=0 must be at least 1"):  # was a ZeroDivisionError mid-run
        check_batch_layout(load_run_config(ROOT / "examples/tiny_cpu.yaml", ["training.save_interval=0"]), 1)


def test_evaluations_count_in_the_eta():
    from megatron_vlm.training.evaluation import evaluations_left
    from megatron_vlm.training.metrics import log_line

    assert [evaluations_left(step, 60, 20) for step in (5, 20, 59, 60)] == [3, 2, 1, 0]
    assert [evaluations_left(step, 50, 20) for step in (5, 40, 45)] == [3, 1, 1]  # 20, 40 and the end
    assert evaluations_left(5, 60, 0) == 0
    values = dict.fromkeys(["loss", "learning_rate", "grad_norm", "tokens_per_second", "images_per_second"], 1.0)
    values.update(dict.fromkeys(["tflops_per_second", "mfu", "memory_gib", "skipped_samples", "skipped_steps"], 0.0))
    assert "ETA 0:00:40" in log_line(10, 20, values, 1.0, 30.0)  # 10 steps of 1 s and 30 s of evaluation


# --- the loss of a global batch --------------------------------------------------------------


def test_training_loss_is_the_token_weighted_mean_of_the_global_batch(megatron_single_process):
    """Two micro-batches with 4x different loss-token counts: the step's loss and gradient are those
    of the per-token mean over both, computed by transformers' own next-token loss (its labels the
    input ids: our labels, shift and masks are not used)."""
    from megatron.core.optimizer import OptimizerConfig
    from parity import hf_inputs, hf_model, make_batch, tiny_config, training_inputs

    from megatron_vlm.config import ParallelConfig, PrecisionConfig
    from megatron_vlm.conversion.mapping import load_hf_weights
    from megatron_vlm.models.idefics2 import build_model_chunks
    from megatron_vlm.training.step import build_optimizer, train_step, wrap_ddp

    config = tiny_config()
    hf = hf_model(config)
    with torch.no_grad():  # sharper logits: token losses (and micro-batch means) far apart
        hf.lm_head.weight.mul_(30.0)
    state = hf.state_dict()
    chunks = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
    load_hf_weights(chunks, state.__getitem__, set(state), config, 0, 1)
    full = make_batch(config, seed=3)
    short = make_batch(config, seed=4, images_per_row=[[], [], [], []])
    short.padding[:, 12:] = 0  # a quarter of the rows' tokens: few loss tokens
    short.input_ids[:, 12:] = 0
    batches = [full, short]
    inputs = [training_inputs(batch) for batch in batches]

    # The reference is transformers' own causal-LM loss (its shift: logits[:, i] predicts
    # labels[:, i + 1]), labels the tokens themselves with -100 on padding and <image> placeholders,
    # summed over both micro-batches with one token count: nothing here comes from our labels code.
    hf_labels = [
        batch.input_ids.masked_fill((batch.padding == 0) | (batch.input_ids == batch.image_token_id), -100)
        for batch in batches
    ]
    counts = [int((labels[:, 1:] != -100).sum()) for labels in hf_labels]
    assert counts[0] > 3 * counts[1] > 0
    total = torch.tensor(sum(counts))
    by_hand = sum(
        hf(**hf_inputs(batch), labels=labels, num_items_in_batch=total).loss
        for batch, labels in zip(batches, hf_labels, strict=True)
    )
    with torch.no_grad():
        means = [
            float(hf(**hf_inputs(batch), labels=labels).loss) for batch, labels in zip(batches, hf_labels, strict=True)
        ]
    by_hand.backward()
    hf_grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in hf.parameters() if p.grad is not None))
    mean_of_means = sum(means) / 2
    assert abs(mean_of_means - float(by_hand)) > 0.02 * float(
        by_hand
    )  # the two weightings differ by far more than the tolerance

    model = wrap_ddp(chunks)
    optimizer = build_optimizer(model, OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, weight_decay=0.0))
    step = train_step(model, optimizer, inputs)
    assert step["loss"] == pytest.approx(float(by_hand), rel=1e-5)
    assert step["grad_norm"] == pytest.approx(float(hf_grad_norm), rel=1e-4)


# --- the trainer -----------------------------------------------------------------------------


def scalars(tensorboard_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}


def train(output: Path, data_root: Path) -> str:
    overrides = ["data.image_backend=pillow", "training.train_steps=4", "training.warmup_steps=1"]
    overrides += ["training.eval_interval=2", "training.eval_samples=4", "training.log_interval=2"]
    return run(train_command(1, output, data_root, *overrides, "training.save_interval=2"))


@pytest.mark.multiprocess
def test_trainer_reports_validation_loss_per_source_the_same_after_resume_and_at_tp2pp2(data_root, tmp_path):
    output = train(tmp_path / "whole", data_root)
    assert "validation every 2 steps and at the end: obelics (3 of 3 samples" in output
    lines = [line for line in output.splitlines() if "validation loss" in line]
    assert len(lines) == 2 and "step      2/4 | validation loss obelics" in lines[0] and "pdfs" in lines[1]
    tags = scalars(tmp_path / "whole" / "tensorboard")
    validation = {name: tags[f"validation/{name}/loss"] for name in SOURCES}
    for name, losses in validation.items():
        assert sorted(losses) == [2, 4] and losses[4] < losses[2] < 11, (name, losses)  # ln(32003) = 10.4
    results = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert results["validation_loss"] == pytest.approx({name: losses[4] for name, losses in validation.items()})

    # Resumed from the step-2 checkpoint (as after a kill before step 4 was saved): the same evaluation.
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "iter_0000002", resumed / "iter_0000002")
    (resumed / "latest").write_text("iter_0000002\n")
    again = train(tmp_path / "resumed", data_root)
    assert "iter_0000002 at step 2" in again
    assert [
        line.split("| validation", 1)[1].rsplit("|", 1)[0] for line in again.splitlines() if "validation loss" in line
    ] == [lines[1].split("| validation", 1)[1].rsplit("|", 1)[0]]
    after = scalars(tmp_path / "resumed" / "tensorboard")
    for name, losses in validation.items():
        assert after[f"validation/{name}/loss"] == {4: losses[4]}, name
    # The images and text tokens trained on continue with the data stream (the benchmarks' x-axes).
    resumed_results = json.loads((tmp_path / "resumed" / "results.json").read_text())
    seen = {key: results[key] for key in ("images_seen", "text_tokens_seen")}
    assert {key: resumed_results[key] for key in seen} == seen and min(seen.values()) > 0

    # The trainer's checkpoints evaluated at TP2xPP2 (4 processes): equal within 1e-5 relative, same tokens.
    out = tmp_path / "tp2pp2"
    checkpoints = tmp_path / "whole" / "checkpoints"
    run_torchrun(
        "validation_worker.py",
        4,
        [
            *("--tp", "2", "--pp", "2", "--first-stage-layers", "1", "--samples", "4"),
            *("--data-root", str(data_root), "--out", str(out)),
            *("--checkpoint", str(checkpoints / "iter_0000002"), "--checkpoint", str(checkpoints / "iter_0000004")),
        ],
    )
    tokens = {name: int(lines[0].split(f"{name} ")[1].split("(")[1].split(" ")[0]) for name in SOURCES}
    for rank in range(4):
        measured = json.loads((out / f"rank{rank}.json").read_text())
        for step in (2, 4):
            for name in SOURCES:
                loss, count = measured[f"iter_{step:07d}"][name]
                assert loss == pytest.approx(validation[name][step], rel=1e-5), (rank, step, name)
                assert count == tokens[name], (rank, step, name)
