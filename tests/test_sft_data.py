"""Conversation data for instruction fine-tuning (issue #23): The Cauldron's parquet layout, LLaVA's
JSON and text-only instruction sets, preprocessed into shards that keep turns and roles; the loader
renders them with the Idefics2 chat template exactly as transformers' Idefics2Processor tokenizes
``apply_chat_template(...)`` of the same conversation, token for token, and trains on the answers
and their ``<end_of_utterance>`` only; packing cuts a conversation only between exchanges."""

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as parquet
import pytest
import torch
from PIL import Image
from skimage import data as photos

from megatron_vlm.data.augment import Augmentation
from megatron_vlm.data.chat import IDEFICS2_TEMPLATE, Turn, messages
from megatron_vlm.data.images import ImageConfig
from megatron_vlm.data.loader import DataConfig, MultimodalLoader, SourceConfig
from megatron_vlm.data.packing import Packer, PackingConfig, collate
from megatron_vlm.data.preprocess import preprocess
from megatron_vlm.data.shards import Shard, shard_paths
from megatron_vlm.data.tokens import load_tokenizer

IMAGES = ImageConfig(longest_edge=112, shortest_edge=56)
IMAGE_SEQ_LEN, IMAGE_TOKEN_ID, END_OF_UTTERANCE_ID = 8, 32001, 32002

# HuggingFaceM4/idefics2-8b's processor chat template, as the Hub's processor_config.json holds it.
HUB_IDEFICS2_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type'] == 'image' %}"
    "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Questions and answers written for these photos (scikit-image's).
CAULDRON = [
    {  # single turn
        "images": ["astronaut"],
        "texts": [{"user": "Who is in the photo?", "assistant": "An astronaut in a white suit.", "source": "ours"}],
    },
    {  # multi-turn about one image
        "images": ["chelsea"],
        "texts": [
            {"user": "What animal is this?", "assistant": "A cat.", "source": "ours"},
            {"user": "What colour are its eyes?", "assistant": "Yellow-green.", "source": "ours"},
        ],
    },
    {  # two images
        "images": ["coffee", "rocket"],
        "texts": [{"user": "Which one flies?", "assistant": "The rocket, not the coffee.", "source": "ours"}],
    },
    {  # text only
        "images": [],
        "texts": [{"user": "What is 12 times 3?", "assistant": "36.", "source": "ours"}],
    },
]
LLAVA = [
    {
        "id": "a",
        "image": "astronaut.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is the person holding?"},
            {"from": "gpt", "value": "A helmet under the arm? No: nothing, the hands are empty."},
            {"from": "human", "value": "Where might this be?"},
            {"from": "gpt", "value": "In front of a flag, in a studio."},
        ],
    },
    {
        "id": "b",
        "image": ["coffee.jpg", "chelsea.jpg"],
        "conversations": [
            {"from": "human", "value": "Compare <image> with <image>."},
            {"from": "gpt", "value": "A drink and a cat."},
        ],
    },
    {"id": "c", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]},
]


def jpeg(name: str) -> bytes:
    image = Image.fromarray(getattr(photos, name)())
    image.thumbnail((96, 96))
    output = io.BytesIO()
    image.convert("RGB").save(output, format="JPEG", quality=90)
    return output.getvalue()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    rows = [
        {
            "images": [{"bytes": jpeg(name), "path": None} for name in row["images"]],
            "texts": row["texts"],
        }
        for row in CAULDRON
    ]
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    turn = pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())])
    table = pa.Table.from_pylist(rows, schema=pa.schema([("images", pa.list_(image)), ("texts", pa.list_(turn))]))
    parquet.write_table(table, root / "cauldron.parquet")
    for name in ("astronaut", "coffee", "chelsea"):
        (root / f"{name}.jpg").write_bytes(jpeg(name))
    (root / "llava.json").write_text(json.dumps(LLAVA))
    reports = {
        name: preprocess([root / file], root / name, samples_per_shard=10, progress=False)
        for name, file in (("cauldron", "cauldron.parquet"), ("llava", "llava.json"))
    }
    for report in reports.values():
        assert report.written == report.rows and not report.rejected, report.rejected
    return root


def samples(directory: Path) -> list:
    return [sample for path in shard_paths(directory) for sample in Shard(path)]


def loader(directory: Path, tokenizer, seq_len: int = 512) -> MultimodalLoader:
    config = DataConfig(sources=(SourceConfig("sft", str(directory), 1.0, seq_len),), image=IMAGES, micro_batch_size=1)
    return MultimodalLoader(config, tokenizer, IMAGE_SEQ_LEN, IMAGE_TOKEN_ID)


def transformers_ids(tokenizer, turns: list[Turn]) -> list[int]:
    """transformers' Idefics2Processor on apply_chat_template of the conversation (the Hub template)."""
    from transformers import Idefics2ImageProcessor, Idefics2Processor

    processor = Idefics2Processor(
        image_processor=Idefics2ImageProcessor(do_image_splitting=IMAGES.split),
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=HUB_IDEFICS2_TEMPLATE,
    )
    text = processor.apply_chat_template(messages(turns))
    images = [Image.open(io.BytesIO(part)) for turn in turns for part in turn.images]
    out = processor(text=[text], images=[images] if images else None)
    return [int(token) for token in out["input_ids"][0]]


def answer_runs(tokens: list[int], trained: list[bool], tokenizer) -> list[str]:
    """The trained tokens as text, one string per contiguous run."""
    runs, current = [], []
    for token, flag in zip(tokens, trained, strict=True):
        if flag:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def test_the_template_is_the_hubs():
    assert IDEFICS2_TEMPLATE == HUB_IDEFICS2_TEMPLATE


@pytest.mark.parametrize("layout", ["cauldron", "llava"])
def test_conversations_tokenize_as_transformers_and_train_on_answers_only(shards, tokenizer, layout):
    rows = CAULDRON if layout == "cauldron" else LLAVA
    stored = samples(shards / layout)
    assert [s.kind for s in stored] == ["conversation"] * len(rows)
    data = loader(shards / layout, tokenizer)
    for row, sample in zip(rows, stored, strict=True):
        turns = sample.conversation()
        if layout == "cauldron":  # the images lead the first user turn; then user/assistant pairs
            assert [t.role for t in turns] == ["user", "assistant"] * len(row["texts"])
            assert turns[0].content[: len(row["images"])] == [jpeg(name) for name in row["images"]]
            answers = [pair["assistant"] for pair in row["texts"]]
        else:
            assert [t.role for t in turns] == [
                {"human": "user", "gpt": "assistant"}[m["from"]] for m in row["conversations"]
            ]
            answers = [m["value"] for m in row["conversations"] if m["from"] == "gpt"]
        document = data.encode(sample, "sft", 0)
        assert document.tokens == transformers_ids(tokenizer, turns), sample.key
        assert len(document.images) == len(sample.images)
        # Trained: each answer and its <end_of_utterance>, nothing else (the runs are decoded
        # independently of how they were marked).
        assert answer_runs(document.tokens, document.trained, tokenizer) == [
            f"{answer}<end_of_utterance>" for answer in answers
        ]
        eou = [i for i, t in enumerate(document.tokens) if t == END_OF_UTTERANCE_ID]
        assert [document.trained[i] for i in eou] == [t.role == "assistant" for t in turns]


def test_the_loss_mask_of_a_packed_batch_is_on_the_answers(shards, tokenizer):
    """Several conversations packed in one sequence: a position counts in the loss exactly when the
    token it predicts is an answer token of its own conversation."""
    data = loader(shards / "cauldron", tokenizer)
    documents = [data.encode(sample, "sft", position) for position, sample in enumerate(samples(shards / "cauldron"))]
    total = sum(len(d.tokens) for d in documents)  # one sequence holds them all exactly
    config = PackingConfig(seq_len=total, image_token_id=IMAGE_TOKEN_ID, image_seq_len=IMAGE_SEQ_LEN)
    packer = Packer(config)
    for document in documents:
        packer.add(document)
    sequence = packer.pop()
    assert sequence.positions == [0, 1, 2, 3]
    batch = collate([sequence], config)
    tokens = [token for d in documents for token in d.tokens]
    expected = [flag for d in documents for flag in [*d.trained[1:], False]]  # predicts the next token
    assert batch["loss_mask"][0, : len(tokens)].bool().tolist() == expected
    assert not batch["loss_mask"][0, len(tokens) :].any()
    counted = batch["labels"][0][batch["loss_mask"][0].bool()]
    assert counted.tolist() == [t for d in documents for t, flag in zip(d.tokens, d.trained, strict=True) if flag]


def test_a_long_conversation_is_cut_between_exchanges_and_one_too_long_skipped(shards, tokenizer):
    data = loader(shards / "llava", tokenizer)
    long = data.encode(samples(shards / "llava")[0], "sft", 0)  # two exchanges
    assert len(long.cuts) == 2 and long.cuts[-1] == len(long.tokens)
    room = long.cuts[0] + 3  # the first exchange fits, the second does not
    config = PackingConfig(seq_len=room, image_token_id=IMAGE_TOKEN_ID, image_seq_len=IMAGE_SEQ_LEN, pack=False)
    packer = Packer(config)
    packer.add(long)
    cut = packer.pop()
    assert cut.tokens == long.tokens[: long.cuts[0]] and cut.trained == long.trained[: long.cuts[0]]
    assert tokenizer.decode(cut.tokens[-2:]) == "<end_of_utterance>\n" and len(cut.images) == 1
    tight = Packer(PackingConfig(seq_len=long.cuts[0] - 1, image_token_id=IMAGE_TOKEN_ID, image_seq_len=IMAGE_SEQ_LEN))
    tight.add(long)
    assert tight.pop() is None and tight.dropped == 1


def test_text_only_instruction_sets_and_malformed_rows(tmp_path, tokenizer):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."},
            ]
        },
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hello to you."}]},
        # The text-only sets of the paper's Table 14 in their Hub layouts: LIMA, Dolly, MetaMathQA,
        # Orca-Math, CAMEL math, Goat (which also has an 'answer' column: 'output' is its reply).
        {"conversations": ["Name a prime.", "7.", "Another?", "11."], "source": "lima"},
        {"instruction": "Who wrote it?", "context": "Hamlet is a play by Shakespeare.", "response": "Shakespeare."},
        {"query": "What is 9 - 4?", "response": "9 - 4 = 5.", "type": "GSM_Rephrased"},
        {"question": "Half of 10?", "answer": "5"},
        {"role_1": "Mathematician", "message_1": "Solve x + 1 = 3.", "message_2": "x = 2."},
        {"instruction": "12 * 3", "input": "", "output": "12 * 3 = 36", "answer": "36"},
        {"messages": [{"role": "user", "content": "Only a question"}]},  # nothing to train on
        {"conversations": [{"from": "narrator", "value": "?"}]},  # unknown role
        {"conversations": [{"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "x"}]},  # no image
    ]
    (tmp_path / "text.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    report = preprocess([tmp_path / "text.jsonl"], tmp_path / "out", progress=False)
    assert report.written == 9 and report.rejected == {"missing_field": 3}
    reasons = [r["detail"] for r in report.rejects]
    assert any("assistant turn" in r for r in reasons) and any("'from'" in r for r in reasons)
    assert any("1 <image> placeholders for 0 images" in r for r in reasons)
    data = loader(tmp_path / "out", tokenizer)
    expected = [
        [Turn("system", ["Be brief."]), Turn("user", ["Capital of France?"]), Turn("assistant", ["Paris."])],
        [Turn("user", ["Add the numbers.\n\n2 and 3"]), Turn("assistant", ["5"])],
        [Turn("user", ["Hello"]), Turn("assistant", ["Hello to you."])],
        [
            Turn("user", ["Name a prime."]),
            Turn("assistant", ["7."]),
            Turn("user", ["Another?"]),
            Turn("assistant", ["11."]),
        ],
        [Turn("user", ["Who wrote it?\n\nHamlet is a play by Shakespeare."]), Turn("assistant", ["Shakespeare."])],
        [Turn("user", ["What is 9 - 4?"]), Turn("assistant", ["9 - 4 = 5."])],
        [Turn("user", ["Half of 10?"]), Turn("assistant", ["5"])],
        [Turn("user", ["Solve x + 1 = 3."]), Turn("assistant", ["x = 2."])],
        [Turn("user", ["12 * 3"]), Turn("assistant", ["12 * 3 = 36"])],
    ]
    for sample, turns in zip(samples(tmp_path / "out"), expected, strict=True):
        assert [(t.role, t.content) for t in sample.conversation()] == [(t.role, t.content) for t in turns]
        document = data.encode(sample, "sft", 0)
        assert document.tokens == transformers_ids(tokenizer, turns)
        assert answer_runs(document.tokens, document.trained, tokenizer) == [
            f"{t.content[0]}<end_of_utterance>" for t in turns if t.role == "assistant"
        ]
    batch = next(data)  # text only: no images; in the loss exactly the answers of its conversations
    assert batch["pixel_values"].shape[0] == 0
    held = [data.encode(data.streams["sft"].read(p), "sft", p) for p in batch["positions"]]
    assert held and batch["labels"][0][batch["loss_mask"][0].bool()].tolist() == [
        t for d in held for t, flag in zip(d.tokens, d.trained, strict=True) if flag
    ]


def test_an_export_renders_conversations_as_fine_tuning_did(tiny_checkpoints, tokenizer, tmp_path):
    """The exported processor carries the family's chat template: apply_chat_template on the
    exported model renders and tokenizes a conversation exactly as the fine-tuning data was."""
    from transformers import AutoProcessor

    from megatron_vlm.conversion.convert import megatron_to_hf
    from megatron_vlm.data.chat import chat_template, encode_conversation

    megatron_to_hf(tiny_checkpoints("tiny").megatron, tmp_path / "hf", include_tokenizer=True)
    processor = AutoProcessor.from_pretrained(str(tmp_path / "hf"))
    turns = [
        Turn("user", [jpeg("astronaut"), "Who is this?"]),
        Turn("assistant", ["An astronaut."]),
        Turn("user", ["Sure?"]),
        Turn("assistant", ["Yes."]),
    ]
    template = chat_template("idefics2")
    text = processor.apply_chat_template(messages(turns))
    assert text == template.render(turns)[0]
    image = Image.open(io.BytesIO(jpeg("astronaut")))
    exported = [int(t) for t in processor(text=[text], images=[[image]])["input_ids"][0]]
    split = processor.image_processor.do_image_splitting
    assert exported == encode_conversation(tokenizer, template, turns, processor.image_seq_len, split).tokens
    assert processor.apply_chat_template(messages(turns[:1]), add_generation_prompt=True).endswith(
        "<end_of_utterance>\nAssistant:"
    )


def test_families_without_a_chat_template_are_refused_by_name(tokenizer):
    from megatron_vlm.data.chat import chat_template, encode_conversation

    with pytest.raises(ValueError, match=r"no chat template for the 'idefics1' family"):
        chat_template("idefics1")
    turns = [Turn("user", ["Hi"]), Turn("assistant", ["Hello."])]
    with pytest.raises(ValueError, match=r"starts with <\|begin_of_text\|>, which this tokenizer does not have"):
        encode_conversation(tokenizer, chat_template("idefics3"), turns, IMAGE_SEQ_LEN)
    with pytest.raises(ValueError, match="at least one assistant turn with text"):
        encode_conversation(tokenizer, chat_template("idefics2"), turns[:1], IMAGE_SEQ_LEN)


def test_the_answer_only_loss_equals_transformers(megatron_single_process, tokenizer):
    """The fine-tuning loss of a batch of conversations (the tiny preset, random transformers
    weights with randomised norms, fp32) equals transformers' own loss with labels -100 outside the
    answers: the answers are ours (encode_conversation), the model inputs the exported processor's."""
    from parity import hf_model
    from test_model_parity import megatron_model

    from megatron_vlm.config import load_model_preset
    from megatron_vlm.data.batch import micro_batch, one_document_per_row
    from megatron_vlm.data.chat import chat_template, encode_conversation
    from megatron_vlm.inference.prompts import prompt_encoder

    config = load_model_preset("tiny")
    hf = hf_model(config)
    with torch.no_grad():
        hf.lm_head.weight.mul_(20.0)  # logits with signal: answer tokens and others far apart
    model = megatron_model(config, hf)
    encoder = prompt_encoder(config, tokenizer, do_image_splitting=False)
    conversations = [
        [Turn("user", [Image.open(io.BytesIO(jpeg(row["images"][0]))), row["texts"][0]["user"]])]
        + [Turn("assistant", [row["texts"][0]["assistant"]])]
        + [
            Turn(role, [pair[key]])
            for pair in row["texts"][1:]
            for role, key in (("user", "user"), ("assistant", "assistant"))
        ]
        for row in CAULDRON[:2]
    ]
    texts = [encoder.processor.apply_chat_template(messages(turns)) for turns in conversations]
    hf_batch, inputs = encoder.encode(texts, [[p for t in turns for p in t.images] for turns in conversations])
    trained = torch.zeros_like(hf_batch["input_ids"], dtype=torch.bool)
    for row, turns in enumerate(conversations):
        encoded = encode_conversation(tokenizer, chat_template("idefics2"), turns, encoder.image_seq_len, False)
        assert hf_batch["input_ids"][row, : len(encoded.tokens)].tolist() == encoded.tokens
        trained[row, : len(encoded.tokens)] = torch.tensor(encoded.trained)
    labels = hf_batch["input_ids"].masked_fill(~trained, -100)
    reference = hf(**hf_batch, labels=labels).loss
    micro = micro_batch(
        inputs["input_ids"],
        one_document_per_row(hf_batch["attention_mask"]),
        inputs["pixel_values"],
        inputs["pixel_attention_mask"],
        config.image_token_id,
        trained,
    )
    per_token = model(
        **{
            k: micro[k]
            for k in ("input_ids", "position_ids", "document_ids", "pixel_values", "pixel_attention_mask", "labels")
        }
    )
    ours = (per_token * micro["loss_mask"]).sum() / micro["loss_mask"].sum()
    assert float(micro["loss_mask"].sum()) == float((labels[:, 1:] != -100).sum()) > 0
    assert float(ours) == pytest.approx(float(reference), rel=1e-5)
    full = micro_batch(  # pretraining's mask on the same tokens: every next token counts
        inputs["input_ids"],
        one_document_per_row(hf_batch["attention_mask"]),
        inputs["pixel_values"],
        inputs["pixel_attention_mask"],
        config.image_token_id,
    )["loss_mask"]
    assert bool((micro["loss_mask"] <= full).all()) and float(micro["loss_mask"].sum()) < 0.5 * float(full.sum())


def test_show_samples_marks_the_trained_spans(shards, capsys):
    """tools/show_samples.py: the micro-batches the trainer would get from the shards under a run
    config, every answer (and only answers) between the trained-span marks; --json's loss mask is
    the loader's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "show_samples", Path(__file__).resolve().parents[1] / "tools" / "show_samples.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    config = str(Path(__file__).resolve().parents[1] / "examples" / "tiny_cpu.yaml")
    assert tool.main([str(shards / "cauldron"), "--config", config, "--n", "3"]) == 0
    text = capsys.readouterr().out
    documents = [d for d in text.split("--- document ")[1:]]
    assert documents
    for document in documents:
        (row,) = [r for r in CAULDRON if r["texts"][0]["user"] in document]  # which conversation it is
        marked = [piece.split("⟧")[0] for piece in document.split("⟦")[1:]]
        assert marked == [f"{pair['assistant']}<end_of_utterance>" for pair in row["texts"]]
    assert tool.main([str(shards / "cauldron"), "--config", config, "--n", "1", "--json"]) == 0
    for line in capsys.readouterr().out.splitlines():
        shown = json.loads(line)
        ids, mask = shown["input_ids"], shown["loss_mask"]
        assert len(ids) == len(mask) and sum(mask) > 0
        counted = [ids[i + 1] for i, m in enumerate(mask) if m]
        assert counted.count(END_OF_UTTERANCE_ID) == sum(d.count("<end_of_utterance>⟧") for d in shown["documents"])


def test_the_loader_skips_and_counts_a_conversation_that_cannot_fit(shards, tokenizer):
    """A sequence shorter than some conversations' first exchange: those are skipped and counted
    (``no_room``), the others trained on."""
    data = loader(shards / "llava", tokenizer)
    first_exchanges = [data.encode(s, "sft", 0).cuts[0] for s in samples(shards / "llava")]
    seq_len = sorted(first_exchanges)[1]  # the shortest two fit, the longest does not
    data = loader(shards / "llava", tokenizer, seq_len=seq_len)
    for _ in range(3):
        batch = next(data)
        assert int(batch["loss_mask"].sum()) > 0
    assert data.skipped["no_room"] >= 1 and set(data.skipped) == {"no_room"}


# -- augmentation (the paper's guards against over-fitting: up-scaled images, shuffled turns) --------


def augmenting_loader(directory: Path, tokenizer, image: ImageConfig = IMAGES, **augment) -> MultimodalLoader:
    config = DataConfig(
        sources=(SourceConfig("sft", str(directory), 1.0, 512),),
        image=image,
        micro_batch_size=1,
        augment=Augmentation(**augment),
    )
    return MultimodalLoader(config, tokenizer, IMAGE_SEQ_LEN, IMAGE_TOKEN_ID)


def orders(system: list[Turn], exchanges: list[tuple[list, str, str]], lead: list[bytes]) -> dict:
    """Every order of the exchanges ((images, question, answer) each), written out by hand: the system
    turns first, ``lead`` (the images that open the conversation) before the first question asked."""
    import itertools

    rendered = {}
    for order in itertools.permutations(range(len(exchanges))):
        turns = list(system)
        for place, number in enumerate(order):
            images, question, answer = exchanges[number]
            turns += [Turn("user", (lead if place == 0 else []) + [*images, question]), Turn("assistant", [answer])]
        rendered[order] = turns
    return rendered


def test_shuffled_turns_tokenize_as_transformers_with_the_conversations_images_first(shards, tokenizer):
    """Each draw is one order of the exchanges, token for token what transformers' processor makes of
    that conversation (images that open it still first, an image asked about later travels with its
    question, system turns first), answers trained on in their new order; every order is drawn; a
    document read outside the training stream (no index) keeps its stored order."""
    from megatron_vlm.data.shards import Sample

    chelsea = [s for s in samples(shards / "cauldron") if len(s.conversation()) == 4][0]
    astronaut, coffee = jpeg("astronaut"), jpeg("coffee")
    built = Sample(
        "three",
        "conversation",
        ["Answer briefly.", astronaut, "Who is this?", "An astronaut.", "And this?", coffee, "A cup of coffee."]
        + ["Count to three.", "1, 2, 3."],
        ["jpg", "jpg"],
        [("system", 1), ("user", 2), ("assistant", 1), ("user", 2), ("assistant", 1), ("user", 1), ("assistant", 1)],
    )
    cases = [
        (chelsea, orders([], [([], t["user"], t["assistant"]) for t in CAULDRON[1]["texts"]], [jpeg("chelsea")])),
        (
            built,
            orders(
                [Turn("system", ["Answer briefly."])],
                [
                    ([], "Who is this?", "An astronaut."),
                    ([], "And this?", "A cup of coffee."),
                    ([], "Count to three.", "1, 2, 3."),
                ],
                [astronaut],
            ),
        ),
    ]
    # "And this?" holds its image after the text: written out that way.
    for turns in cases[1][1].values():
        for turn in turns:
            if turn.content[-1] == "And this?":
                turn.content = [*turn.content, coffee]
    data = augmenting_loader(shards / "cauldron", tokenizer, shuffle_turns=True)
    for sample, candidates in cases:
        expected = {order: transformers_ids(tokenizer, turns) for order, turns in candidates.items()}
        drawn = set()
        for index in range(40):
            document = data.encode(sample, "sft", 0, index)
            order = next((o for o, ids in expected.items() if ids == document.tokens), None)
            assert order is not None, (sample.key, index)
            drawn.add(order)
            turns = candidates[order]
            assert answer_runs(document.tokens, document.trained, tokenizer) == [
                f"{t.content[0]}<end_of_utterance>" for t in turns if t.role == "assistant"
            ]
            shapes = [tuple(Image.open(io.BytesIO(p)).size[::-1]) for t in turns for p in t.images]
            assert [tuple(image.shape[1:]) for image in document.images] == [
                tuple(x if x >= IMAGES.shortest_edge else IMAGES.shortest_edge for x in shape) for shape in shapes
            ]
        assert drawn == set(candidates), sample.key
        assert data.encode(sample, "sft", 0).tokens == expected[tuple(range(len(next(iter(expected)))))]


def test_images_are_scaled_up_as_m4_draws_and_resized_once(shards, tokenizer):
    """With probability p an image is taken at f times its size, f triangular on [1.5, max] with its
    mode at max (HuggingFaceM4's m4 ConditionalResize), then resized by the processor's rule: the
    factors read back from the image sizes follow that law (Kolmogorov-Smirnov), about p of the images
    are scaled, and each one's pixels are transformers' Pillow processor resizing the stored photo
    once to that size, bit for bit."""
    from scipy import stats
    from transformers import Idefics2ImageProcessorPil

    wide = ImageConfig(longest_edge=980, shortest_edge=14)
    data = augmenting_loader(shards / "cauldron", tokenizer, image=wide, upscale_probability=0.5, upscale_max=3.0)
    chelsea = [s for s in samples(shards / "cauldron") if len(s.conversation()) == 4][0]
    photo = Image.open(io.BytesIO(chelsea.images[0]))
    width, height = photo.size
    factors, unscaled = [], 0
    for index in range(300):
        (image,) = data.encode(chelsea, "sft", 0, index).images
        out_height, out_width = image.shape[1:]
        if (out_height, out_width) == (height, width):
            unscaled += 1
            continue
        assert int(1.5 * width) <= out_width <= int(3.0 * width), out_width
        factors.append((out_width + 0.5) / width)
        if len(factors) <= 3:
            size = {"height": out_height, "width": out_width}
            reference = Idefics2ImageProcessorPil(size=size, do_image_splitting=False)([[photo]], return_tensors="pt")
            assert torch.equal(image, reference["pixel_values"][0, 0])
    assert abs(unscaled - 150) < 4 * (300 * 0.25) ** 0.5, unscaled
    law = stats.triang(c=1.0, loc=1.5, scale=1.5)
    assert stats.kstest(factors, law.cdf).pvalue > 1e-3
    assert data.encode(chelsea, "sft", 0).images[0].shape[1:] == (height, width)  # not in the training stream


def test_an_augmented_stream_resumes_exactly_and_draws_anew_each_epoch(shards, tokenizer):
    data = augmenting_loader(shards / "cauldron", tokenizer, shuffle_turns=True, upscale_probability=0.7)
    next(data)
    state = json.loads(json.dumps(data.state_dict()))
    pending = state["lane_states"]["0"]["sources"]["sft"]["pending_indices"]
    stream = data.streams["sft"]
    assert pending and max(pending) >= len(stream.locations)  # a later epoch's, still to come
    # ... one that augmentation changes (images and two exchanges), re-read on resume as it was drawn.
    assert any(len(stream.read(stream.position(i)).conversation()) == 4 for i in pending)
    later = [next(data) for _ in range(3)]
    resumed = augmenting_loader(shards / "cauldron", tokenizer, shuffle_turns=True, upscale_probability=0.7)
    resumed.load_state_dict(state)
    for expected in later:
        batch = next(resumed)
        for key in ("input_ids", "loss_mask", "pixel_values", "pixel_attention_mask"):
            assert torch.equal(batch[key], expected[key]), key
    # Some photos at their stored size, others scaled up (p = 0.7).
    masks = [mask for batch in later for mask in batch["pixel_attention_mask"]]
    sizes = {(int(mask.any(1).sum()), int(mask.any(0).sum())) for mask in masks}
    stored = {Image.open(io.BytesIO(jpeg(row["images"][0]))).size[::-1] for row in CAULDRON if row["images"]}
    assert sizes & stored and sizes - stored, sizes


def test_augmentation_options_in_a_mixture(shards, tmp_path):
    from megatron_vlm.data.loader import load_data_config

    mixture = tmp_path / "sft.yaml"
    mixture.write_text(
        "augment: {upscale_probability: 0.5, shuffle_turns: true}\n"
        "sources:\n"
        "  - {name: cauldron, shards: cauldron, weight: 3}\n"
        "  - {name: ranking, shards: llava, weight: 1, augment: {shuffle_turns: false}}\n"
    )
    config = load_data_config(mixture, shards)
    assert config.augment_of("cauldron") == Augmentation(upscale_probability=0.5, shuffle_turns=True)
    assert config.augment_of("ranking") == Augmentation(upscale_probability=0.5, shuffle_turns=False)
    mixture.write_text("augment: {upscale_probability: 0.5, shufle_turns: true}\nsources: []\n")
    with pytest.raises(ValueError, match=r"augment has no option \['shufle_turns'\]"):
        load_data_config(mixture, shards)
    mixture.write_text("augment: {upscale_probability: 0.5}\nimage: {resize: square}\nsources: []\n")
    with pytest.raises(ValueError, match="no resolution to scale up"):
        load_data_config(mixture, shards)
    with pytest.raises(ValueError, match="must exceed 1.5"):
        Augmentation(upscale_probability=0.5, upscale_max=1.2)


def test_mixture_weights_as_shares_of_the_answer_tokens(shards, tokenizer):
    """``weights_of: loss_tokens`` (the paper's Table 14 states its fine-tuning mixture so): the answer
    tokens each source contributes, counted from the micro-batches themselves, follow the weights to
    within one micro-batch, though the two sources' sequences hold different numbers of answers; by
    default the weights are shares of micro-batches and the answer tokens do not follow them. The
    choice resumes exactly."""

    def answer_shares(weights_of: str, weights: tuple[float, float], steps: int = 24) -> tuple[dict, int, list]:
        config = DataConfig(
            sources=(
                SourceConfig("cauldron", str(shards / "cauldron"), weights[0], 96),
                SourceConfig("llava", str(shards / "llava"), weights[1], 512),
            ),
            image=IMAGES,
            micro_batch_size=1,
            weights_of=weights_of,
        )
        data = MultimodalLoader(config, tokenizer, IMAGE_SEQ_LEN, IMAGE_TOKEN_ID)
        counted, largest, sources = {"cauldron": 0, "llava": 0}, 0, []
        for _ in range(steps):
            batch = next(data)
            answers = int(batch["loss_mask"].sum())
            counted[batch["source"]] += answers
            largest = max(largest, answers)
            sources.append(batch["source"])
        total = sum(counted.values())
        return {name: n / total for name, n in counted.items()}, largest / total, sources

    for weights in ((1.0, 1.0), (3.0, 1.0)):
        target = weights[0] / sum(weights)
        shares, one_batch, _ = answer_shares("loss_tokens", weights)
        assert abs(shares["cauldron"] - target) <= one_batch, (weights, shares)
    shares, one_batch, sources = answer_shares("micro_batches", (1.0, 1.0))
    assert abs(shares["cauldron"] - 0.5) > 2 * one_batch, shares  # a 96-token sequence holds fewer answers

    config = DataConfig(
        sources=(
            SourceConfig("cauldron", str(shards / "cauldron"), 1.0, 96),
            SourceConfig("llava", str(shards / "llava"), 1.0, 512),
        ),
        image=IMAGES,
        micro_batch_size=1,
        weights_of="loss_tokens",
    )
    data = MultimodalLoader(config, tokenizer, IMAGE_SEQ_LEN, IMAGE_TOKEN_ID)
    for _ in range(5):
        next(data)
    state = json.loads(json.dumps(data.state_dict()))
    expected = [next(data)["source"] for _ in range(12)]
    resumed = MultimodalLoader(config, tokenizer, IMAGE_SEQ_LEN, IMAGE_TOKEN_ID)
    resumed.load_state_dict(state)
    assert [next(resumed)["source"] for _ in range(12)] == expected and len(set(expected)) == 2, expected
    with pytest.raises(ValueError, match="weights_of='answers' is not one of"):
        DataConfig(sources=config.sources, weights_of="answers")
