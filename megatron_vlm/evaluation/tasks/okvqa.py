"""OK-VQA (Marino et al. 2019): questions about COCO images that need outside knowledge, in VQA's
format (ten answers: five annotators, each answer given twice), scored with the official VQA
accuracy. Data: the Hub's ``lmms-lab/OK-VQA`` parquet (split ``val2014``) or the release's
``OpenEnded_mscoco_val2014_questions.json`` + ``mscoco_val2014_annotations.json`` + COCO images."""

from __future__ import annotations

from megatron_vlm.evaluation.benchmarks import Example
from megatron_vlm.evaluation.tasks.base import VQATask, register


class OKVQA(VQATask):
    name = "okvqa"
    benchmark = "okvqa"

    def example_prompt(self, example: Example, answer: str | None) -> str:
        query = f"<image>Question: {example.question} Short answer:"
        return query if answer is None else f"{query} {answer}"


TASK = register(OKVQA())
