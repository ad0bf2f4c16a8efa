"""TextVQA (Singh et al. 2019): questions that need reading the text in the image, ten human
answers each, scored with the official VQA accuracy. Data: the Hub's ``lmms-lab/textvqa`` parquet
(split ``validation``) or the release's ``TextVQA_0.5.1_<split>.json`` + its image folder."""

from __future__ import annotations

from megatron_vlm.evaluation.benchmarks import Example
from megatron_vlm.evaluation.tasks.base import VQATask, register


class TextVQA(VQATask):
    name = "textvqa"
    benchmark = "textvqa"

    def example_prompt(self, example: Example, answer: str | None) -> str:
        query = f"<image>Question: {example.question} Short answer:"
        return query if answer is None else f"{query} {answer}"


TASK = register(TextVQA())
