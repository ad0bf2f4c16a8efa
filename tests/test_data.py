"""Shards, preprocessing, packing and the resumable distributed loader on the bundled real data."""

import dataclasses
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_vlm.backbones.attention import DocumentLayout
from megatron_vlm.data.batch import MODEL_INPUTS
from megatron_vlm.data.images import ImageConfig
from megatron_vlm.data.loader import DataConfig, MultimodalLoader, SourceConfig, consumed, merge_states
from megatron_vlm.data.packing import Document, Packer, PackingConfig, collate
from megatron_vlm.data.preprocess import preprocess
from megatron_vlm.data.shards import Sample, Shard, ShardWriter
from megatron_vlm.data.tokens import load_tokenizer

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
IMAGE_TOKEN = 32001
SMALL_IMAGES = ImageConfig(longest_edge=112, shortest_edge=56)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    for name in ("pairs", "interleaved", "pages"):
        report = preprocess([DATA / f"{name}.jsonl"], root / name, samples_per_shard=3, progress=False)
        assert report.written == report.rows and not report.rejected
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def loader_config(shards, **overrides):
    values = dict(
        sources=(
            SourceConfig("obelics", str(shards / "interleaved"), 0.5, 384),
            SourceConfig("pairs", str(shards / "pairs"), 0.3, 256),
            SourceConfig("pages", str(shards / "pages"), 0.2, 256),
        ),
        image=SMALL_IMAGES,
        micro_batch_size=2,
    )
    values.update(overrides)
    return DataConfig(**values)


# --- shards ------------------------------------------------------------------------------------


def test_shards_round_trip_and_are_deterministic(shards, tmp_path):
    again = preprocess([DATA / "interleaved.jsonl"], tmp_path, samples_per_shard=3, progress=False)
    for name in again.shards:
        assert (tmp_path / name).read_bytes() == (shards / "interleaved" / name).read_bytes()
    rows = [json.loads(line) for line in (DATA / "interleaved.jsonl").read_text().splitlines()]
    samples = [s for name in again.shards for s in Shard(tmp_path / name)]
    assert len(samples) == len(rows)
    for sample, row in zip(samples, rows, strict=True):
        layout = ["image" if image else "text" for image in row["images"]]
        assert ["image" if isinstance(s, bytes) else "text" for s in sample.segments] == layout
        assert sample.texts == [t for t in row["texts"] if t is not None]
        first_image = next(i for i in row["images"] if i)
        assert sample.images[0] == (DATA / first_image).read_bytes()  # bytes copied unchanged


def test_pair_shards_are_plain_webdataset(shards):
    with tarfile.open(next((shards / "pairs").glob("*.tar"))) as tar:
        names = tar.getnames()
    keys = {n.split(".")[0] for n in names}
    for key in keys:
        assert {f"{key}.json", f"{key}.txt", f"{key}.jpg"} <= set(names)


def test_preprocess_rejects_bad_rows_with_reasons(tmp_path):
    good = (DATA / "images" / "coffee.jpg").read_bytes()
    (tmp_path / "good.jpg").write_bytes(good)
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 3])
    Image.new("RGB", (2000, 10)).save(tmp_path / "sliver.png")
    rows = [
        {"image": "good.jpg", "caption": "A cup of coffee."},
        {"image": "garbage.jpg", "caption": "Garbage."},
        {"image": "truncated.jpg", "caption": "Cut in the middle."},
        {"image": "sliver.png", "caption": "A 2000 x 10 sliver."},
        {"image": "missing.jpg", "caption": "No such file."},
        {"image": "good.jpg"},
        {"texts": ["a", None], "images": [None, "good.jpg"]},
        {"texts": ["a", "b"], "images": [None, "good.jpg"]},
    ]
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken json\n")
    report = preprocess([source], tmp_path / "out", progress=False)
    assert report.rows == 9 and report.written == 2
    assert report.rejected == {
        "corrupt_image": 2,
        "absurd_size": 1,
        "missing_image": 1,
        "missing_field": 2,
        "invalid_row": 1,
    }
    saved = json.loads((tmp_path / "out" / "rows.report.json").read_text())
    assert [r["row"] for r in saved["rejects"]] == [1, 2, 3, 4, 5, 7, 8]


# --- packing -----------------------------------------------------------------------------------


def fake_document(position, text_tokens, images, image_seq_len=4):
    tokens = [1] + [10 + position] * text_tokens
    for _ in range(images):
        tokens += [32000] + [IMAGE_TOKEN] * image_seq_len + [32000, 20]
    return Document(tokens + [2], [torch.zeros(3, 14, 14) for _ in range(images)], "s", position)


def test_packing_masks_positions_and_labels_respect_documents():
    config = PackingConfig(seq_len=40, image_token_id=IMAGE_TOKEN, image_seq_len=4)
    packer = Packer(config)
    for position, (text, images) in enumerate([(5, 1), (3, 0), (4, 1), (30, 0)]):
        packer.add(fake_document(position, text, images))
    first = packer.pop()
    assert first.positions == [0, 1, 2] and len(first.images) == 2
    batch = collate([first], config)
    docs = torch.tensor(first.document_ids + [-1] * (40 - len(first.tokens)))
    assert torch.equal(batch["document_ids"][0], docs)
    lengths = [len(fake_document(p, t, i).tokens) for p, (t, i) in enumerate([(5, 1), (3, 0), (4, 1)])]
    # The decoder's attention runs each document as its own causal sequence (test_sliding_window
    # probes which keys it sees): the layout's sequences are the documents, padding dropped.
    layout = DocumentLayout.of(batch["document_ids"])
    assert layout.params.bounds == (0, lengths[0], lengths[0] + lengths[1], sum(lengths))
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    for start, length in zip(starts, lengths, strict=True):  # positions restart at every document
        assert batch["position_ids"][0, start : start + length].tolist() == list(range(length))
    labels, loss_mask = batch["labels"][0], batch["loss_mask"][0].bool()
    assert not (labels[loss_mask] == IMAGE_TOKEN).any()
    for start, length in zip(starts, lengths, strict=True):  # each position predicts the next token
        tokens = first.tokens[start : start + length]
        predicts = [i for i in range(length - 1) if tokens[i + 1] != IMAGE_TOKEN]
        assert len(predicts) >= 3
        assert [int(labels[start + i]) for i in predicts] == [tokens[i + 1] for i in predicts]
        assert all(loss_mask[start + i] for i in predicts)
        assert not any(loss_mask[start + i] for i in range(length - 1) if i not in predicts)
    for start, length in zip(starts, lengths, strict=True):  # the last token of a document predicts nothing
        assert not loss_mask[start + length - 1] and loss_mask[start]
    assert not loss_mask[len(first.tokens) :].any()


def test_truncation_keeps_images_whole_and_caps_images():
    document = fake_document(0, 2, 3)  # 3 text + 3 x (fake, 4 x image, fake, word) + EOS = 25 tokens
    by_length = Packer(PackingConfig(seq_len=16, image_token_id=IMAGE_TOKEN, image_seq_len=4))
    by_length.add(document)
    cut = by_length.pop()
    assert cut.tokens == document.tokens[:16] and len(cut.images) == 2  # ends on the 2nd image's fake token

    by_count = Packer(PackingConfig(seq_len=64, image_token_id=IMAGE_TOKEN, image_seq_len=4, max_images_per_sequence=2))
    by_count.add(document)
    by_count.add(fake_document(1, 60, 0))  # does not fit: closes the first sequence
    capped = by_count.pop()
    assert len(capped.images) == 2 and capped.tokens == document.tokens[:17]  # no dangling opener
    assert capped.tokens.count(IMAGE_TOKEN) == 8


# --- loader ------------------------------------------------------------------------------------


def test_resume_mid_epoch_continues_identically(shards, tokenizer):
    config = loader_config(shards)
    loader = MultimodalLoader(config, tokenizer, image_seq_len=8, image_token_id=IMAGE_TOKEN)
    for _ in range(5):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # it must survive a JSON checkpoint
    expected = [next(loader) for _ in range(6)]
    resumed = MultimodalLoader(config, tokenizer, image_seq_len=8, image_token_id=IMAGE_TOKEN)
    resumed.load_state_dict(state)
    for ours, reference in zip((next(resumed) for _ in range(6)), expected, strict=True):
        assert ours["source"] == reference["source"]
        for key, value in reference.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(ours[key], value), key
    assert len({b["source"] for b in expected}) > 1  # sources mix
    # What the run trained on, the x-axes of the paper's comparisons: the images and the text tokens
    # (real tokens but <image> placeholders) of every micro-batch handed out, resumed with the stream.
    seen = consumed(resumed.state_dict())
    first, batches = consumed(state), expected
    assert seen["images"] - first["images"] == sum(b["pixel_values"].shape[0] for b in batches) > 0
    text = sum(int(((b["input_ids"] != IMAGE_TOKEN) & (b["document_ids"] >= 0)).sum()) for b in batches)
    assert seen["text_tokens"] - first["text_tokens"] == text > 0
    assert first["images"] > 0 and consumed(loader.state_dict()) == seen


def test_data_parallel_ranks_read_disjoint_samples(shards, tokenizer):
    config = loader_config(shards, sources=(SourceConfig("pairs", str(shards / "pairs"), 1.0, 256),), pack=False)
    seen = []
    for rank in range(2):  # 6 lanes, 3 per rank: the 13 samples of an epoch dealt out over all six
        loader = MultimodalLoader(
            config, tokenizer, image_seq_len=8, image_token_id=IMAGE_TOKEN, dp_rank=rank, dp_size=2, lanes=6
        )
        lanes = loader.lanes  # lane l reads indexes l, l + 6, l + 12, ... of the epoch's order
        seen.append(
            [
                loader.streams["pairs"].position(loader.next_index(lane, "pairs"))
                for lane in lanes
                for _ in range(3 if lane.index == 0 else 2)
            ]
        )
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(13))


def test_the_global_stream_does_not_depend_on_the_data_parallel_size(shards, tokenizer):
    """Each step's global batch (its micro-batches, lane by lane) is the same at DP 1, 2 and 4, also
    across a resume at another DP size: what elastic resume rests on."""
    config = loader_config(shards)

    def steps(dp_size, count, states=None):
        loaders = [
            MultimodalLoader(
                config, tokenizer, image_seq_len=8, image_token_id=IMAGE_TOKEN, dp_rank=r, dp_size=dp_size, lanes=4
            )
            for r in range(dp_size)
        ]
        for loader in loaders:
            if states is not None:
                loader.load_state_dict(json.loads(json.dumps(merge_states(states))))
        per_step = 4 // dp_size
        batches = [
            {b["lane"]: b for b in (next(each) for each in loaders for _ in range(per_step))} for _ in range(count)
        ]
        return batches, [loader.state_dict() for loader in loaders]

    reference, _ = steps(1, 5)
    _, states = steps(4, 2)
    resumed, _ = steps(2, 3, states)
    for ours, theirs in zip(resumed, reference[2:], strict=True):
        assert sorted(ours) == sorted(theirs) == [0, 1, 2, 3]
        for lane, batch in ours.items():
            assert batch["source"] == theirs[lane]["source"] and batch["positions"] == theirs[lane]["positions"]
            assert torch.equal(batch["input_ids"], theirs[lane]["input_ids"])
            assert torch.equal(batch["pixel_values"], theirs[lane]["pixel_values"])
    assert len({b["source"] for s in reference for b in s.values()}) > 1


def rename_member(data, header, new_name):
    """Rename the tar member whose 512-byte header starts at ``header``, fixing its checksum."""
    data[header : header + 100] = new_name.encode().ljust(100, b"\0")
    data[header + 148 : header + 156] = b" " * 8
    checksum = sum(data[header : header + 512])
    data[header + 148 : header + 156] = f"{checksum:06o}\0 ".encode()


def corrupt_shard(path):
    """A shard with: 2 good pairs, a corrupt image, a member of another sample, a missing .json,
    an image of an absurd size."""
    good = (DATA / "images" / "chelsea.jpg").read_bytes()
    writer = ShardWriter(path)
    writer.write(Sample("good0", "pair", [good, "A cat."], ["jpg"]))
    writer.write(Sample("badimage", "pair", [b"\xff\xd8 not really a jpeg", "Broken."], ["jpg"]))
    writer.write(Sample("good1", "pair", [good, "The cat again."], ["jpg"]))
    writer.write(Sample("nojson", "pair", [good, "Will lose its json."], ["jpg"]))
    writer.write(Sample("foreign", "pair", [good, "Will hold a foreign member."], ["jpg"]))
    sliver = io.BytesIO()
    Image.new("RGB", (3000, 20)).save(sliver, format="PNG")
    writer.write(Sample("sliver", "pair", [sliver.getvalue(), "An absurd 3000 x 20 image."], ["png"]))
    writer.close()
    data = bytearray(path.read_bytes())
    index = json.loads(Path(str(path) + ".idx.json").read_text())
    for entry in index["samples"]:
        if entry["key"] == "nojson":  # its first member, the .json, becomes a .meta
            rename_member(data, entry["offset"], "nojson.meta")
        if entry["key"] == "foreign":  # its first member now belongs to another sample
            rename_member(data, entry["offset"], "zzz.json")
    path.write_bytes(bytes(data))


def test_corrupt_samples_are_skipped_and_counted(tmp_path, tokenizer, caplog):
    corrupt_shard(tmp_path / "bad.tar")
    config = DataConfig(
        sources=(SourceConfig("pairs", str(tmp_path / "bad.tar"), 1.0, 256),),
        image=SMALL_IMAGES,
        micro_batch_size=1,
        pack=False,
    )
    loader = MultimodalLoader(config, tokenizer, image_seq_len=8, image_token_id=IMAGE_TOKEN)
    batches = [next(loader) for _ in range(4)]  # 2 good samples per epoch: into the second epoch
    assert all(b["num_images"] == 1 for b in batches)
    # Exactly the bad samples among the positions read so far were skipped, each for its reason.
    stream = loader.streams["pairs"]
    (lane,) = loader.lanes
    read = [stream.position(index) for index in range(lane.read["pairs"])]
    assert read[: len(stream.locations)] == list(
        np.random.default_rng([*stream.seed, 0]).permutation(len(stream.locations))
    )
    assert loader.epochs_completed("pairs") == 1
    reasons = {
        "badimage": "corrupt_image",
        "nojson": "missing_field",
        "foreign": "broken_member",
        "sliver": "absurd_size",
    }
    keys = [stream.shards[0].entries[stream.locations[p][1]]["key"] for p in read]
    expected = Counter(reasons[k] for k in keys if k in reasons)
    assert dict(loader.skipped) == dict(expected) and set(expected) == set(reasons.values())
    assert "bad.tar" in caplog.text


def test_truncated_shard_is_skipped(tmp_path, tokenizer):
    writer = ShardWriter(tmp_path / "cut.tar")
    good = (DATA / "images" / "coffee.jpg").read_bytes()
    for index in range(3):
        writer.write(Sample(f"s{index}", "pair", [good, f"Coffee {index}."], ["jpg"]))
    writer.close()
    data = (tmp_path / "cut.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) * 2 // 3])
    config = DataConfig(
        sources=(SourceConfig("p", str(tmp_path / "cut.tar"), 1.0, 256),),
        image=SMALL_IMAGES,
        micro_batch_size=1,
        pack=False,
    )
    loader = MultimodalLoader(config, tokenizer, image_seq_len=8, image_token_id=IMAGE_TOKEN)
    for _ in range(3):
        next(loader)
    assert loader.skipped["truncated_shard"] >= 1 and sum(loader.skipped.values()) == loader.skipped["truncated_shard"]


def test_loader_batches_train_the_model(shards, tokenizer, megatron_single_process):
    """A real micro-batch (real photos, real tokenizer, packed) runs through the tiny model."""
    import dataclasses

    from megatron_vlm.config import ParallelConfig, PrecisionConfig, load_model_preset
    from megatron_vlm.models.idefics2 import build_model_chunks

    model_config = load_model_preset("tiny")
    (model,) = build_model_chunks(model_config, ParallelConfig(), PrecisionConfig())
    config = dataclasses.replace(loader_config(shards), image=ImageConfig(longest_edge=224, shortest_edge=112))
    loader = MultimodalLoader(config, tokenizer, model_config.connector.num_latents, model_config.image_token_id)
    batch = next(loader)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k != "loss_mask"}
    loss = model(**inputs)
    value = (loss * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    value.backward()
    assert torch.isfinite(value) and 8 < value < 12  # about ln(32003) for an untrained model
    assert model.vision.patch_embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("preset", "weights"),
    [("stage1", {"obelics": 0.7, "pairs": 0.3}), ("stage2", {"obelics": 0.45, "pairs": 0.35, "pdfs": 0.2})],
)
def test_paper_mixtures_are_followed(shards, tokenizer, preset, weights):
    from megatron_vlm.data.loader import load_data_config

    config = load_data_config(preset, shards)
    assert {s.name: s.seq_len for s in config.sources} == (
        {"obelics": 2048, "pairs": 1536} if preset == "stage1" else {"obelics": 2048, "pairs": 1536, "pdfs": 1024}
    )
    # The file's own sources and weights, their shards pointed at the bundled data's (the stage
    # files name OBELICS-scale directories); the expected shares above are the paper's.
    local = {"obelics": "interleaved", "pairs": "pairs", "pdfs": "pages"}
    sources = tuple(dataclasses.replace(s, shards=str(shards / local[s.name])) for s in config.sources)
    loader = MultimodalLoader(
        dataclasses.replace(config, sources=sources), tokenizer, image_seq_len=8, image_token_id=IMAGE_TOKEN
    )
    draws = [loader.source_of(step, lane) for step in range(1000) for lane in range(4)]
    for name, weight in weights.items():
        assert abs(draws.count(name) / len(draws) - weight) < 0.03


def test_parallel_preprocessing_gives_identical_shards(tmp_path):
    one = preprocess([DATA / "pairs.jsonl"], tmp_path / "one", samples_per_shard=4, workers=1, progress=False)
    two = preprocess([DATA / "pairs.jsonl"], tmp_path / "two", samples_per_shard=4, workers=2, progress=False)
    assert one.shards == two.shards
    for name in one.shards:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_parquet_rows_give_the_same_shards_as_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as parquet

    rows = [json.loads(line) for line in (DATA / "interleaved.jsonl").read_text().splitlines()]
    parquet.write_table(pa.Table.from_pylist(rows), DATA / "interleaved.parquet")
    try:
        from_parquet = preprocess([DATA / "interleaved.parquet"], tmp_path / "pq", samples_per_shard=4, progress=False)
    finally:
        (DATA / "interleaved.parquet").unlink()
    from_jsonl = preprocess([DATA / "interleaved.jsonl"], tmp_path / "js", samples_per_shard=4, progress=False)
    assert from_parquet.written == from_jsonl.written == len(rows)
    for a, b in zip(from_parquet.shards, from_jsonl.shards, strict=True):
        assert (tmp_path / "pq" / a).read_bytes() == (tmp_path / "js" / b).read_bytes()
