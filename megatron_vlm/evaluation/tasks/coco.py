"""COCO captions (Chen et al. 2015) on the Karpathy test split, scored with pycocoevalcap's CIDEr-D
(the paper's number, x 100), BLEU-4, METEOR and ROUGE-L. Data: the Hub's ``lmms-lab/COCO-Caption2017``
parquet (split ``val``) or Karpathy's ``dataset_coco.json`` + the COCO image folders.

Prompt, shots and metric: ``CaptionTask`` (m4's in-context captioning template, pycocoevalcap).
"""

from __future__ import annotations

from megatron_vlm.evaluation.tasks.base import CaptionTask, register


class COCO(CaptionTask):
    name = "coco"
    benchmark = "coco"


TASK = register(COCO())
