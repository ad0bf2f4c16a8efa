"""What a benchmark task is to the harness (``evaluation/harness.py``), and the task registry.

A task names its benchmark (read by ``evaluation/benchmarks.py`` in every layout users download),
how one example is written in a prompt (an in-context example with its answer, or the query without),
how the answer is cut out of the generated text, and how predictions are scored. Scores are
reported as the paper reports them (percent: VQA accuracy in %, CIDEr x 100); ``primary`` is the
one that enters the paper's average over tasks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from megatron_vlm.evaluation.benchmarks import Example
from megatron_vlm.evaluation.metrics import caption_scores, vqa_score, vqa_score_by_type


class Task:
    name: str = ""
    benchmark: str = ""  # evaluation.benchmarks.read_benchmark's name
    primary: str = ""  # the metric averaged over tasks (the paper's score)
    max_new_tokens: int = 10
    # Where a generated answer ends: the first of these (the harness also stops generating there).
    stop_strings: tuple[str, ...] = ("\n",)
    separator: str = "\n"  # between in-context examples, and before the query

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
        """The whole prompt: the in-context examples with their answers, then the query."""
        parts = [self.example_prompt(shot, self.shot_answer(shot)) for shot in shots]
        return self.separator.join([*parts, self.example_prompt(query, None)])

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
    """Open-ended VQA scored with the official VQA accuracy (VQAv2, OK-VQA, TextVQA)."""

    primary = "accuracy"

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
    """Captioning scored with pycocoevalcap (CIDEr-D, BLEU-4, METEOR, ROUGE-L), x 100 as papers print them."""

    primary = "CIDEr"
    max_new_tokens = 30
    metrics = ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L")

    def shot_answer(self, example: Example) -> str:
        return example.references[0]

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
