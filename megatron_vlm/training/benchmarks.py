"""Benchmark scores during pretraining (``training.benchmarks``), as the paper judges its ablations:
every ``interval`` steps and at the end, the first ``questions`` of each task's evaluation split,
in-context (``evaluation/harness.py``), prompted as the training data formats images (the mixture's
image settings). Each evaluation is logged against the step, the images and the text tokens the run
has trained on (the x-axes of the paper's Figure 4), which the data stream counts per lane and keeps
across resumes (``data.loader.consumed``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state

from megatron_vlm import distributed
from megatron_vlm.config import RunConfig
from megatron_vlm.data.images import ImageConfig
from megatron_vlm.data.loader import consumed
from megatron_vlm.evaluation.harness import EvalSettings, Evaluator, TaskData, load_task_data
from megatron_vlm.evaluation.tasks import task
from megatron_vlm.inference.prompts import prompt_encoder

logger = logging.getLogger("megatron_vlm.train")


def consumed_so_far(loader_state: dict[str, Any]) -> dict[str, int]:
    """Collective over the data-parallel group: images and text tokens of every step trained so far
    (this rank's lanes of ``loader_state``, summed over the data-parallel ranks)."""
    mine = consumed(loader_state)
    totals = torch.tensor(
        [mine["images"], mine["text_tokens"]], dtype=torch.float64, device=distributed.collective_device()
    )
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return {"images": int(totals[0]), "text_tokens": int(totals[1])}


class TrainingBenchmarks:
    """The run's benchmark tasks, their data read once at start-up (metadata; images on use)."""

    def __init__(self, run: RunConfig, image: ImageConfig, output: Path) -> None:
        config = run.training.benchmarks
        self.interval, self.output = config.interval, output / "benchmarks"
        self.settings = EvalSettings(
            shots=config.shots,
            seed=config.seed,
            batch_size=config.batch_size,
            limit=config.questions or None,
            max_new_tokens=config.max_new_tokens,
        )
        root = Path(run.data.root)
        self.datas: list[TaskData] = [
            load_task_data(name, root / path, limit=self.settings.limit) for name, path in config.tasks.items()
        ]
        self.model_config = run.model
        # Its own tokenizer: the training stream's is busy in the prefetch thread (not thread-safe).
        self.encoder = prompt_encoder(run.model, image=image)
        self.history: list[dict[str, Any]] = []  # one entry per evaluation (results.json)
        self.seconds = 0.0  # of the last evaluation

    @property
    def history_file(self) -> Path:
        return self.output / "history.jsonl"

    def resume(self, iteration: int) -> None:
        """Continue the run's history (``OUTPUT/benchmarks/history.jsonl``) from a checkpoint at
        ``iteration``: evaluations after it (made before the run stopped) are dropped, they are
        redone. Collective in effect: every rank reads the same file; rank 0 rewrites it."""
        entries: dict[int, dict[str, Any]] = {}
        if self.history_file.is_file():
            for line in self.history_file.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut off by the stop
                if entry.get("step", iteration + 1) <= iteration:
                    entries[entry["step"]] = entry
        self.history = [entries[step] for step in sorted(entries)]
        if distributed.global_rank() == 0 and self.history_file.is_file():
            temporary = self.history_file.with_suffix(".tmp")
            temporary.write_text("".join(json.dumps(entry) + "\n" for entry in self.history))
            os.replace(temporary, self.history_file)

    def describe(self) -> str:
        tasks = ", ".join(f"{d.name} ({len(d.examples)} questions, shots from {d.shots_from})" for d in self.datas)
        return f"{self.settings.shots}-shot {tasks}"

    def due(self, iteration: int, last: int) -> bool:
        return self.interval > 0 and (iteration % self.interval == 0 or iteration == last)

    def run(self, chunks: list[torch.nn.Module], iteration: int, seen: dict[str, int]) -> dict[str, Any]:
        """Collective: evaluate the model as it is now; predictions and results under
        ``OUTPUT/benchmarks/step_NNNNNNN/``. Returns the history entry (on every rank)."""
        started = time.perf_counter()
        evaluator = Evaluator(chunks, self.encoder, self.model_config, self.settings)
        results = evaluator.run(self.datas, self.output / f"step_{iteration:07d}", progress=False)
        self.seconds = time.perf_counter() - started
        entry = {
            "step": iteration,
            "images_seen": seen["images"],
            "text_tokens_seen": seen["text_tokens"],
            "average": results["average"],
            **{name: results[name] for name in results if name not in ("average", "settings", "inference")},
            "inference": results["inference"],  # what generating the answers cost (the comparison's columns)
        }
        self.history.append(entry)
        if distributed.global_rank() == 0:
            with open(self.history_file, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
        return entry


def scalars(entry: dict[str, Any]) -> dict[str, float]:
    """A history entry as TensorBoard scalars: ``<task>/<metric>`` and ``average``."""
    values = {"average": entry["average"]}
    for name, metrics in entry.items():
        if isinstance(metrics, dict) and name != "inference":
            values.update({f"{name}/{metric}": value for metric, value in metrics.items() if metric != "n"})
    return values


def benchmark_line(entry: dict[str, Any], total: int, seconds: float) -> str:
    parts = ", ".join(
        f"{name} {metrics[task(name).primary]:.2f}"
        for name, metrics in entry.items()
        if isinstance(metrics, dict) and name != "inference"
    )
    return (
        f"step {entry['step']:>6}/{total} | benchmarks {parts} | average {entry['average']:.2f} | "
        f"{entry['images_seen']} images, {entry['text_tokens_seen']} text tokens seen | {seconds:.1f} s"
    )
