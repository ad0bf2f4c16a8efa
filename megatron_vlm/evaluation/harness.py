"""The evaluation harness: benchmark tasks (``evaluation/tasks``) run as the paper runs them,
in-context (4 shots by default), on our model at any TP/PP/DP layout.

For every query the in-context examples are drawn from the task's support split (its train split;
where a layout ships none, the evaluated split itself, never the query) by a generator seeded with
(seed, task, query id): the same shots at any layout, batch size or resume. The query's prompt is
the shots with their answers, then the query (``Task.prompt``), processed by the model's prompt
encoder (``data.prompts``: the family's processor); generation is greedy, stopped at the task's stop
strings, EOS, ``<end_of_utterance>`` or the task's ``max_new_tokens``, and the answer is cut out
of the text (``Task.extract``).

Distributed: the questions not yet answered are dealt round-robin over the data-parallel replicas;
each replica (its TP x PP model-parallel group) generates its share in batches, and after every
round the replicas' predictions are gathered to global rank 0, which appends them to
``OUT/<task>.predictions.jsonl`` (so an interrupted run resumes where it stopped: answered questions
are skipped) and, once the task is complete, rewrites the file in the split's order and scores it.
``OUT/results.json``: ``{"<task>": {"<metric>": value, "n": count}, ..., "average": value}`` (the
average of each task's primary metric, as the paper reports it), plus ``settings`` and the
inference cost (``inference``). ``rescore(OUT)`` recomputes the scores from the predictions files
alone. Results are returned on every rank.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state

from megatron_vlm.config import ModelConfig
from megatron_vlm.data.prompts import PromptEncoder
from megatron_vlm.distributed import all_gather_object, broadcast_object, global_rank
from megatron_vlm.evaluation.benchmarks import BenchmarkError, Example, detect_layout, read_benchmark, resolve_split
from megatron_vlm.evaluation.tasks import Task, task
from megatron_vlm.inference.generate import GenerationConfig, GenerationStats, generate
from megatron_vlm.perf.flops import generated_token_flops
from megatron_vlm.perf.memory import peak_rss_bytes

RESULTS_FILE = "results.json"
PREDICTIONS_SUFFIX = ".predictions.jsonl"


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    shots: int = 4  # the paper's; 0 / 8 / 32 as it also reports
    seed: int = 0  # which in-context examples each query gets
    batch_size: int = 8  # queries per generation batch (per data-parallel replica)
    limit: int | None = None  # the first N questions of each split (None: all)
    max_new_tokens: int | None = None  # None: each task's own

    def __post_init__(self) -> None:
        if self.shots < 0 or self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError(f"evaluation settings out of range: {self}")


@dataclasses.dataclass
class TaskData:
    """A task with its evaluated examples and its in-context support pool."""

    task: Task
    examples: list[Example]
    support: list[Example]
    shots_from: str  # which split the shots come from

    @property
    def name(self) -> str:
        return self.task.name


def load_task_data(
    name: str,
    path: str | Path,
    split: str = "eval",
    support_split: str = "incontext",
    image_dir: str | Path | None = None,
    limit: int | None = None,
) -> TaskData:
    """A task's data in whichever layout ``path`` holds: the evaluated split (its first ``limit``
    questions) and the support split for in-context examples. Where the layout has no support split
    (the Hub's VQAv2 and OK-VQA ship only their evaluation splits), the shots come from the
    evaluated split itself, never the query (``shots_from`` says so)."""
    chosen = task(name)
    examples = read_benchmark(chosen.benchmark, path, split, image_dir)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise BenchmarkError(f"{path}: the {split!r} split of {name} holds no examples")
    try:
        support = read_benchmark(chosen.benchmark, path, support_split, image_dir)
        shots_from = resolve_split(chosen.benchmark, detect_layout(path), support_split)
    except (BenchmarkError, FileNotFoundError):
        support = read_benchmark(chosen.benchmark, path, split, image_dir)
        shots_from = f"{split} (the query excluded: no {support_split} split in {path})"
    return TaskData(chosen, examples, support, shots_from)


def choose_shots(data: TaskData, query: Example, shots: int, seed: int) -> list[Example]:
    """``shots`` in-context examples for ``query``: drawn from the support pool by a generator seeded
    with (seed, task, query id), never the query itself (by id)."""
    if shots == 0:
        return []
    generator = random.Random(f"{seed}:{data.name}:{query.id}")
    pool = data.support
    picked = generator.sample(range(len(pool)), min(shots + 1, len(pool)))
    chosen = [pool[index] for index in picked if pool[index].id != query.id][:shots]
    if len(chosen) < shots:
        raise BenchmarkError(
            f"{data.name}: {shots} in-context examples asked for but the support pool ({data.shots_from}) "
            f"has only {len(chosen)} besides the query"
        )
    return chosen


# --------------------------------------------------------------------------------------------


def _dp() -> tuple[int, int, Any]:
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1, None
    return (
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
        parallel_state.get_data_parallel_group(),
    )


def _gather(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every data-parallel replica's records (replica order), on every rank."""
    group = _dp()[2]
    return [record for share in all_gather_object(records, group) for record in share]


def _is_writer() -> bool:
    return global_rank() == 0


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """A predictions file's records; the same id twice with different predictions is an error naming
    it (two partial runs that disagree), the same record twice is kept once."""
    records: dict[str, dict[str, Any]] = {}
    text = path.read_text()
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                break  # the line a crash cut off while writing it: that question is answered again
            raise ValueError(f"{path}:{number}: not a JSON line ({error})") from None
        if not isinstance(record, dict) or "id" not in record or "prediction" not in record:
            raise ValueError(f"{path}:{number}: a prediction needs at least 'id' and 'prediction'")
        previous = records.get(str(record["id"]))
        if previous is not None and previous["prediction"] != record["prediction"]:
            raise ValueError(
                f"{path}: question {record['id']} has two different predictions "
                f"({previous['prediction']!r}, {record['prediction']!r})"
            )
        records[str(record["id"])] = record
    return list(records.values())


def _write_lines(path: Path, records: Sequence[dict[str, Any]], append: bool) -> None:
    with open(path, "a" if append else "w") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _replace(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def average(results: dict[str, Any]) -> float | None:
    """The paper's score: the mean of each task's primary metric."""
    values = [results[name][task(name).primary] for name in results if _is_task_entry(name, results)]
    return sum(values) / len(values) if values else None


def _is_task_entry(name: str, results: dict[str, Any]) -> bool:
    return isinstance(results.get(name), dict) and name not in ("settings", "inference")


def score_task(name: str, records: Sequence[dict[str, Any]]) -> dict[str, float]:
    return {**task(name).score(records), "n": len(records)}


# --------------------------------------------------------------------------------------------


class Evaluator:
    """Runs tasks on this rank's model chunks (collective over the whole world: every rank takes
    part, each model-parallel group generating its data-parallel share)."""

    def __init__(
        self,
        chunks: Sequence[torch.nn.Module],
        encoder: PromptEncoder,
        config: ModelConfig,
        settings: EvalSettings = EvalSettings(),
    ) -> None:
        self.chunks, self.encoder, self.config, self.settings = list(chunks), encoder, config, settings
        self.seconds = 0.0  # of the last run

    def run(self, datas: Sequence[TaskData], out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
        """Evaluate every task; with ``out``, write (and resume from) its predictions files and
        ``results.json``. Returns the results on every rank."""
        started = time.perf_counter()
        out = Path(out) if out is not None else None
        if out is not None and _is_writer():
            out.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {}
        cost = _Cost(self.config)
        for data in datas:
            records = self._run_task(data, out, progress, cost)
            if _is_writer():
                results[data.name] = score_task(data.name, records)
        results = broadcast_object(results)
        results["average"] = average(results)
        results["settings"] = {
            **dataclasses.asdict(self.settings),
            "shots_from": {data.name: data.shots_from for data in datas},
            "image_splitting": self.encoder.image.split,
        }
        results["inference"] = cost.summary()
        if out is not None and _is_writer():
            _replace(out / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
        self.seconds = time.perf_counter() - started
        return results

    def _run_task(self, data: TaskData, out: Path | None, progress: bool, cost: _Cost) -> list[dict[str, Any]]:
        """Generate the task's missing predictions; the whole task's records on global rank 0."""
        settings, rank_dp, world_dp = self.settings, *_dp()[:2]
        path = out / f"{data.name}{PREDICTIONS_SUFFIX}" if out is not None else None
        done: dict[str, dict[str, Any]] = {}
        if path is not None and path.is_file():
            wanted = {example.id for example in data.examples}
            done = {
                r["id"]: r
                for r in broadcast_object(read_predictions(path) if _is_writer() else None)
                if r["id"] in wanted
            }
        todo = [example for example in data.examples if example.id not in done]
        per_round = settings.batch_size * world_dp
        rounds = math.ceil(len(todo) / per_round)
        bar = None
        if progress and _is_writer() and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=f"{data.name} ({settings.shots}-shot)", unit="q")
        generation = GenerationConfig(
            max_new_tokens=settings.max_new_tokens or data.task.max_new_tokens,
            stop_token_ids=self.encoder.stop_token_ids,
            stop_strings=data.task.stop_strings,
        )
        new: list[dict[str, Any]] = []
        for round_index in range(rounds):
            share = todo[round_index * per_round : (round_index + 1) * per_round][rank_dp::world_dp]
            records = self._answer(data, share, generation, cost) if share else []
            gathered = _gather(records)
            new += gathered
            if path is not None and _is_writer():
                _write_lines(path, gathered, append=True)
            if bar is not None:
                bar.update(len(gathered))
        if bar is not None:
            bar.close()
        if not _is_writer():
            return []
        by_id = {**done, **{r["id"]: r for r in new}}
        records = [by_id[example.id] for example in data.examples]
        if path is not None:  # the finished file in the split's order
            _replace(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        return records

    def _answer(
        self, data: TaskData, queries: list[Example], generation: GenerationConfig, cost: _Cost
    ) -> list[dict[str, Any]]:
        texts, images, shot_ids = [], [], []
        for query in queries:
            shots = choose_shots(data, query, self.settings.shots, self.settings.seed)
            texts.append(data.task.prompt(query, shots))
            images.append([image for example in (*shots, query) for image in example.load_images()])
            shot_ids.append([shot.id for shot in shots])
        _, inputs = self.encoder.encode(texts, images)
        stats = GenerationStats()
        outputs = generate(self.chunks, inputs, generation, self.encoder.decode, stats=stats)
        cost.add(inputs, outputs, stats, sum(len(row) for row in images))
        records = []
        for query, out, ids in zip(queries, outputs, shot_ids, strict=True):
            record = data.task.record(query, data.task.extract(out.text or ""), out.text or "")
            # The shots' ids, and how close the nearest greedy decision came to a tie (float noise
            # can flip a step within ~1e-4: predictions compared across layouts may differ there).
            record.update(shots=ids, min_margin=min(out.margins))
            records.append(record)
        return records


class _Cost:
    """The inference cost of an evaluation run on this rank (the writer's reported): prompt tokens per
    image (what an image costs the decoder's sequence), FLOPs per generated token (analytic, at each
    token's context length), prefill and decode throughput, peak memory."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.stats = GenerationStats()
        self.images = 0
        self.image_prompt_tokens = 0
        self.generated_flops = 0.0

    def add(self, inputs: dict[str, torch.Tensor], outputs: Sequence[Any], stats: GenerationStats, images: int) -> None:
        config = self.config
        input_ids = inputs["input_ids"]
        is_image = (input_ids == config.image_token_id) | (input_ids == config.fake_image_token_id)
        real = inputs["document_ids"] >= 0
        self.image_prompt_tokens += int((is_image & real).sum())
        self.images += images
        self.stats.add(stats)
        lengths = real.sum(dim=1).tolist()
        attends_image = (input_ids == config.image_token_id).any(dim=1).tolist()
        for length, sees_image, out in zip(lengths, attends_image, outputs, strict=True):
            # The first token comes out of the prefill; each later one is a forward at its position.
            for position in range(length, length + len(out.token_ids) - 1):
                self.generated_flops += generated_token_flops(config, position, sees_image)

    def summary(self) -> dict[str, Any]:
        stats = self.stats
        decoded = stats.generated_tokens - stats.prompts  # tokens from decode steps (not the prefill's)
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        return {
            "questions": stats.prompts,
            "images": self.images,
            "prompt_tokens_per_image": self.image_prompt_tokens / self.images if self.images else None,
            "flops_per_generated_token": self.generated_flops / decoded if decoded > 0 else None,
            "prompt_tokens": stats.prompt_tokens,
            "generated_tokens": stats.generated_tokens,
            "prefill_tokens_per_second": stats.prompt_tokens / stats.prefill_seconds if stats.prefill_seconds else None,
            "decode_tokens_per_second": decoded / stats.decode_seconds if stats.decode_seconds else None,
            "peak_memory_gib": (peak if peak is not None else peak_rss_bytes()) / 2**30,
            "memory_kind": "cuda allocated" if peak is not None else "process RSS",
        }


def rescore(out: str | Path) -> dict[str, Any]:
    """``results.json`` recomputed from the predictions files in ``out`` alone (after a metric fix, or
    to merge partial runs written into one file); the other entries of an existing results file
    (settings, inference cost) are kept. Returns the new results."""
    out = Path(out)
    files = sorted(out.glob(f"*{PREDICTIONS_SUFFIX}"))
    if not files:
        raise FileNotFoundError(f"{out}: no *{PREDICTIONS_SUFFIX} files to score")
    previous = json.loads((out / RESULTS_FILE).read_text()) if (out / RESULTS_FILE).is_file() else {}
    results: dict[str, Any] = {}
    for path in files:
        name = path.name[: -len(PREDICTIONS_SUFFIX)]
        results[name] = score_task(name, read_predictions(path))
    results["average"] = average(results)
    for key in ("settings", "inference"):
        if key in previous:
            results[key] = previous[key]
    _replace(out / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    return results
