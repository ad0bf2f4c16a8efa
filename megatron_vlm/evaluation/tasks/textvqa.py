"""TextVQA (Singh et al. 2019): questions that need reading the text in the image, ten human
answers each, scored with the official VQA accuracy. Data: the Hub's ``lmms-lab/textvqa`` parquet
(split ``validation``) or the release's ``TextVQA_0.5.1_<split>.json`` + its image folder.

Prompt, shots and metric: ``VQATask`` (m4's in-context VQA template, official VQA accuracy); the OCR
tokens the release carries are not shown to the model (the paper's setting: the model reads the image).
"""

from __future__ import annotations

from megatron_vlm.evaluation.tasks.base import VQATask, register


class TextVQA(VQATask):
    name = "textvqa"
    benchmark = "textvqa"


TASK = register(TextVQA())
