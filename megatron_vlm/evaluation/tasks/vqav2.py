"""VQAv2 (Goyal et al. 2017): open-ended questions on COCO images, ten human answers each, scored
with the official VQA accuracy. Data: the Hub's ``lmms-lab/VQAv2`` parquet (split ``validation``)
or the release's ``v2_OpenEnded_mscoco_<split>_questions.json`` + ``v2_mscoco_<split>_annotations.json``
+ a COCO image folder (``evaluation/benchmarks.py``); shots from ``train2014`` where present.

The paper reports test-dev (scored by the EvalAI server, answers not public); the validation split is
scored here. Prompt, shots and metric: ``VQATask`` (m4's in-context VQA template, official VQA accuracy).
"""

from __future__ import annotations

from megatron_vlm.evaluation.tasks.base import VQATask, register


class VQAv2(VQATask):
    name = "vqav2"
    benchmark = "vqav2"


TASK = register(VQAv2())
