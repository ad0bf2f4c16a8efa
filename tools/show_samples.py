"""Show samples as the trainer feeds them: the micro-batches the loader makes from a shard set under a
run config (its model's family, tokenizer and image tokens, its mixture's image settings and
sequence length), each packed sample decoded with the tokens the loss trains on marked.

    python tools/show_samples.py data/shards/sft --config examples/tiny_cpu.yaml
    python tools/show_samples.py data/shards/cauldron --config examples/idefics2_8b_stage2.yaml --n 4 --json

Text output: one block per document, its tokens decoded with every trained run between ⟦ and ⟧
(a token is trained when the loss counts the prediction of it: for conversations, the answers and
their <end_of_utterance>; for pretraining documents, every token but the image placeholders and the
first), image placeholder runs shortened to <image×N>. ``--json``: one object per micro-batch row
with ``input_ids``, ``loss_mask`` (as the loss reads it: position i counts the prediction of token
i + 1), ``document_ids`` and the text as above.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPEN, CLOSE = "⟦", "⟧"


def marked_text(tokenizer: Any, tokens: list[int], trained: list[bool], image_token_id: int) -> str:
    """Tokens decoded run by run (trained or not), trained runs bracketed, image runs counted."""
    pieces, start = [], 0
    while start < len(tokens):
        end = start
        if tokens[start] == image_token_id:
            while end < len(tokens) and tokens[end] == image_token_id:
                end += 1
            pieces.append(f"<image×{end - start}>")
        else:
            while end < len(tokens) and tokens[end] != image_token_id and trained[end] == trained[start]:
                end += 1
            text = tokenizer.decode(tokens[start:end])
            pieces.append(f"{OPEN}{text}{CLOSE}" if trained[start] else text)
        start = end
    return "".join(pieces)


def rows(batch: dict[str, Any], tokenizer: Any, image_token_id: int) -> list[dict[str, Any]]:
    """Each row of a micro-batch: its ids, loss mask, documents, and each document marked."""
    out = []
    for row in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][row].tolist()
        documents = batch["document_ids"][row].tolist()
        mask = batch["loss_mask"][row].tolist()
        trained = [False] + [bool(m) for m in mask[:-1]]  # token j is trained when position j - 1 counts
        texts = []
        for document in sorted({d for d in documents if d >= 0}):
            span = [i for i, d in enumerate(documents) if d == document]
            texts.append(marked_text(tokenizer, [ids[i] for i in span], [trained[i] for i in span], image_token_id))
        out.append({"input_ids": ids, "loss_mask": mask, "document_ids": documents, "documents": texts})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="a shard directory, glob or tar (tools/preprocess_data.py output)")
    parser.add_argument("--config", required=True, help="the run config (model, mixture image settings)")
    parser.add_argument("--n", type=int, default=2, help="micro-batches to show")
    parser.add_argument("--json", action="store_true", help="one JSON object per micro-batch row")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    args = parser.parse_args(argv)

    from megatron_vlm.config import load_run_config
    from megatron_vlm.training.data_feed import run_data_config, run_loader

    run = load_run_config(args.config, args.overrides)
    mixture = run_data_config(run)
    source = dataclasses.replace(mixture.sources[0], name="shown", shards=str(args.shards), weight=1.0, validation=None)
    loader = run_loader(run, dataclasses.replace(mixture, sources=(source,)))
    tokenizer = loader.tokenizer
    for number in range(args.n):
        batch = next(loader)
        for row, shown in enumerate(rows(batch, tokenizer, run.model.image_token_id)):
            if args.json:
                print(json.dumps({"micro_batch": number, "row": row, **shown}, ensure_ascii=False))
                continue
            trained = int(sum(shown["loss_mask"]))
            print(
                f"=== micro-batch {number}, row {row}: {len(shown['documents'])} document(s), {trained} trained tokens"
            )
            for index, document in enumerate(shown["documents"]):
                print(f"--- document {index}\n{document}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
