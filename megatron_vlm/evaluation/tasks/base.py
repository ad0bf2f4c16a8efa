"""What a benchmark task is to the harness (``evaluation/harness.py``), and the task registry.

A task names its benchmark (read by ``evaluation/benchmarks.py`` in every layout users download),
how one example is written in a prompt (an in-context example with its answer, or the query without),
how the answer is cut out of the generated text, and how predictions are scored. Scores are
reported as the paper reports them (percent: VQA accuracy in %, CIDEr x 100); ``primary`` is the
one that enters the paper's average over tasks.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from megatron_vlm.evaluation.benchmarks import Example
from megatron_vlm.evaluation.metrics import caption_scores, vqa_score, vqa_score_by_type


class Task:
    name: str = ""
    benchmark: str = ""  # evaluation.benchmarks.read_benchmark's name
    primary: str = ""  # the metric averaged over tasks (the paper's score)
    max_new_tokens: int = 15
    instruction: str = ""  # before the in-context examples (the processor adds the BOS token)
    # Where a generated answer ends: the first of these (the harness also stops generating there;
    # EOS and <end_of_utterance> stop it too).
    stop_strings: tuple[str, ...] = ("\n",)
    separator: str = "\n"  # after each in-context example

    def example_prompt(self, example: Example, answer: str | None) -> str:
        """One example as the prompt writes it, with ``<image>`` where its images go: an in-context
        example with its ``answer``, or the query (``answer`` None), ending where the model answers."""
        raise NotImplementedError

    def shot_answer(self, example: Example) -> str:
        """The answer an in-context example shows."""
        raise NotImplementedError

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Metrics of predictions-file records (``id``, ``prediction``, ``references``, ...)."""
        raise NotImplementedError

    # -- shared by every task ------------------------------------------------------------------

    def prompt(self, query: Example, shots: Sequence[Example]) -> str:
        """The whole prompt: the instruction, the in-context examples with their answers, the query."""
        parts = [self.example_prompt(shot, self.shot_answer(shot)) for shot in shots]
        return self.instruction + self.separator.join([*parts, self.example_prompt(query, None)])

    def extract(self, generated: str) -> str:
        """The answer in the generated text: up to the first stop string, stripped."""
        for stop in self.stop_strings:
            generated = generated.split(stop, 1)[0]
        return generated.strip()

    def record(self, example: Example, prediction: str, generated: str) -> dict[str, Any]:
        """The predictions-file line of one example: what ``score`` and a reader need."""
        return {
            "id": example.id,
            "question": example.question,
            "prediction": prediction,
            "generated": generated,
            "references": list(example.references),
        }


class VQATask(Task):
    """Open-ended VQA scored with the official VQA accuracy (VQAv2, OK-VQA, TextVQA).

    The prompt is the one Hugging Face's own in-context evaluation of Idefics / Idefics2 used (the
    "m4" code, a copy in github.com/huggingface/smollm at a0417598, ``vision/m4/models/vgpt2/
    evaluation_open_ended_vqa_in_context_vgpt2.py`` prompt template 9, lines 102-105, selected by the
    tasks of ``vision/m4/models/vmistral/evaluation_open_ended_vqa_in_context_vmistral.py``): an
    instruction, then each in-context example as "Image:<image>Question: ... Answer: ...\n", the
    query ending in "Answer:"; an in-context example shows its most frequent human answer (line 230).
    The answer is the generated text up to the first newline, end of utterance or EOS (where m4 bans
    newlines and cuts at the next example's "Question"/"Image", which this extraction cuts at too),
    stripped; the paper's Section 3 scores the ablations 4-shot this way.
    """

    primary = "accuracy"
    instruction = "Instruction: provide an answer to the question. Use the image to answer.\n"
    stop_strings = ("\n", "Question:", "Image:")

    def example_prompt(self, example: Example, answer: str | None) -> str:
        query = f"Image:<image>Question: {example.question} Answer:"
        return query if answer is None else f"{query} {answer}"

    def shot_answer(self, example: Example) -> str:
        """The most common human answer (VQA's ``multiple_choice_answer`` where the release has it;
        ties: the first given)."""
        chosen = example.fields.get("multiple_choice_answer")
        if chosen:
            return str(chosen)
        return Counter(example.references).most_common(1)[0][0]

    def record(self, example: Example, prediction: str, generated: str) -> dict[str, Any]:
        line = super().record(example, prediction, generated)
        if example.fields.get("answer_type"):
            line["answer_type"] = example.fields["answer_type"]
        return line

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        scores = {"accuracy": vqa_score((r["prediction"], r["references"]) for r in records)}
        typed = [(r["prediction"], r["references"], r["answer_type"]) for r in records if r.get("answer_type")]
        if len(typed) == len(records):
            scores.update({f"accuracy/{kind}": value for kind, value in vqa_score_by_type(typed).items()})
        return scores


class CaptionTask(Task):
    """Captioning scored with pycocoevalcap (CIDEr-D, BLEU-4, METEOR, ROUGE-L), x 100 as papers print them.

    The prompt of m4's in-context captioning (smollm at a0417598, ``vision/m4/models/vgpt2/
    evaluation_captioning_in_context_vgpt2.py`` prompt template 7, lines 68-71): each in-context
    example "Image:<image>Caption: ...\n", the query ending in "Caption:"; an in-context example shows
    one of its reference captions drawn at random (line 183; here seeded by the example's id, so the
    same at every run). The caption ends at the first newline, end of utterance, EOS or the next
    example's "Caption:"/"Image:".
    """

    primary = "CIDEr"
    max_new_tokens = 30
    metrics = ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L")
    stop_strings = ("\n", "Caption:", "Image:")

    def example_prompt(self, example: Example, answer: str | None) -> str:
        query = "Image:<image>Caption:"
        return query if answer is None else f"{query} {answer}"

    def shot_answer(self, example: Example) -> str:
        return random.Random(f"caption:{example.id}").choice(example.references)

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        predictions = {r["id"]: r["prediction"] for r in records}
        references = {r["id"]: r["references"] for r in records}
        return {name: 100 * value for name, value in caption_scores(predictions, references, self.metrics).items()}


_TASKS: dict[str, Task] = {}


def register(instance: Task) -> Task:
    _TASKS[instance.name] = instance
    return instance


def task(name: str) -> Task:
    """The registered task of this name; an unknown one is refused, naming the known ones."""
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark task {name!r}; known: {sorted(_TASKS)}") from None


def tasks() -> list[str]:
    return sorted(_TASKS)
