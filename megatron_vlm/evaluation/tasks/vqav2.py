"""VQAv2 (Goyal et al. 2017): open-ended questions on COCO images, ten human answers each, scored
with the official VQA accuracy. Data: the Hub's ``lmms-lab/VQAv2`` parquet (split ``validation``)
or the release's ``v2_OpenEnded_mscoco_<split>_questions.json`` + ``v2_mscoco_<split>_annotations.json``
+ a COCO image folder (``evaluation/benchmarks.py``); shots from ``train2014`` where present."""

from __future__ import annotations

from megatron_vlm.evaluation.benchmarks import Example
from megatron_vlm.evaluation.tasks.base import VQATask, register


class VQAv2(VQATask):
    name = "vqav2"
    benchmark = "vqav2"

    def example_prompt(self, example: Example, answer: str | None) -> str:
        query = f"<image>Question: {example.question} Short answer:"
        return query if answer is None else f"{query} {answer}"


TASK = register(VQAv2())
