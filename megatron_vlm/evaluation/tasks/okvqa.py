"""OK-VQA (Marino et al. 2019): questions about COCO images that need outside knowledge, in VQA's
format (ten answers: five annotators, each answer given twice), scored with the official VQA
accuracy. Data: the Hub's ``lmms-lab/OK-VQA`` parquet (split ``val2014``) or the release's
``OpenEnded_mscoco_val2014_questions.json`` + ``mscoco_val2014_annotations.json`` + COCO images.

Prompt, shots and metric: ``VQATask`` (m4's in-context VQA template, official VQA accuracy on the
raw answers, as m4 scored OK-VQA).
"""

from __future__ import annotations

from megatron_vlm.evaluation.tasks.base import VQATask, register


class OKVQA(VQATask):
    name = "okvqa"
    benchmark = "okvqa"


TASK = register(OKVQA())
