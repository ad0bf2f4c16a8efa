"""The evaluation harness and ``tools/evaluate.py`` on the bundled tiny VQAv2 / TextVQA / OK-VQA /
COCO sets (real photos, both download layouts): the same predictions and scores in both layouts and
at TP1, TP2 x PP2 and DP2; results.json and the predictions files as documented; scores recomputed
from the predictions alone; an interrupted run resumed; in-context examples chosen by seed, never
the query.

The whole module runs in CI's first environment only: COCO's metrics need Java (pycocoevalcap), and
what Megatron-Core's version can change (generation at TP x PP) is tested in both by test_generation.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vlm.config import ParallelConfig
from megatron_vlm.evaluation.benchmarks import read_benchmark
from megatron_vlm.evaluation.harness import (
    EvalSettings,
    Evaluator,
    choose_shots,
    load_task_data,
    read_predictions,
    rescore,
)
from megatron_vlm.evaluation.metrics import vqa_score
from megatron_vlm.inference.loading import load_for_inference
from megatron_vlm.inference.prompts import prompt_encoder

pytestmark = pytest.mark.first_env_only

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("vqav2", "textvqa", "okvqa", "coco")
PRIMARY = {"vqav2": "accuracy", "textvqa": "accuracy", "okvqa": "accuracy", "coco": "CIDEr"}


def evaluate(checkpoint, benchmarks: Path, layout: str, out: Path, settings=None, tasks=TASKS) -> dict:
    chunks, config, _ = load_for_inference(checkpoint.megatron, ParallelConfig())
    datas = [load_task_data(name, benchmarks / name / layout) for name in tasks]
    encoder = prompt_encoder(config, do_image_splitting=False)
    return Evaluator(chunks, encoder, config, settings or EvalSettings()).run(datas, out)


def predictions(out: Path, tasks=TASKS) -> dict[str, list[tuple[str, str]]]:
    return {
        name: [(r["id"], r["prediction"]) for r in read_predictions(out / f"{name}.predictions.jsonl")]
        for name in tasks
    }


def near_ties(out: Path) -> dict[str, list[str]]:
    return {
        name: [r["id"] for r in read_predictions(out / f"{name}.predictions.jsonl") if r["min_margin"] < 1e-4]
        for name in TASKS
    }


def scores(results: dict, tasks=TASKS) -> dict:
    return {name: results[name] for name in tasks}


@pytest.fixture(scope="module")
def reference(tiny_checkpoints, tiny_benchmarks, tmp_path_factory):
    """The in-process TP1 run on the releases' layout: (output directory, results)."""
    out = tmp_path_factory.mktemp("eval_release")
    return out, evaluate(tiny_checkpoints("tiny"), tiny_benchmarks, "release", out)


def test_results_and_predictions_files_are_as_documented(reference, tiny_benchmarks):
    out, results = reference
    written = json.loads((out / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    for name in TASKS:
        expected = read_benchmark(name, tiny_benchmarks / name / "release", "eval")
        assert written[name]["n"] == len(expected) > 0
        assert PRIMARY[name] in written[name]
        lines = [json.loads(line) for line in (out / f"{name}.predictions.jsonl").read_text().splitlines()]
        assert [line["id"] for line in lines] == [example.id for example in expected]  # the split's order
        assert [line["references"] for line in lines] == [example.references for example in expected]
        assert all(isinstance(line["prediction"], str) and len(line["shots"]) == 4 for line in lines)
    # The paper's average: each task's primary metric (VQA accuracy in %, CIDEr x 100), averaged.
    assert written["average"] == pytest.approx(sum(written[n][PRIMARY[n]] for n in TASKS) / len(TASKS))
    assert written["settings"]["shots"] == 4 and not written["settings"]["image_splitting"]
    assert written["settings"]["shots_from"]["vqav2"] == "train2014"
    cost = written["inference"]
    assert cost["questions"] == sum(written[n]["n"] for n in TASKS)
    assert cost["images"] == 5 * cost["questions"]  # four shots and the query, one image each
    assert cost["prompt_tokens_per_image"] == 8 + 2  # the tiny resampler's latents and two fake tokens
    assert cost["flops_per_generated_token"] > 0 and cost["decode_tokens_per_second"] > 0


def test_scores_are_recomputed_from_the_predictions_alone(reference, tmp_path):
    """--rescore: a metric fix or predictions merged from partial runs is scored from the files; the
    scores follow the predictions (the most common human answer scores as the official accuracy says;
    a reference caption scores a positive CIDEr)."""
    out, results = reference
    for name in TASKS:
        records = read_predictions(out / f"{name}.predictions.jsonl")
        for record in records:
            record["prediction"] = max(record["references"], key=record["references"].count)
        half = len(records) // 2
        lines = [json.dumps(r) for r in records[: half + 1] + records[half:]]  # two partial runs, overlapping
        (tmp_path / f"{name}.predictions.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(out / "results.json", tmp_path / "results.json")
    rescored = rescore(tmp_path)
    for name in ("vqav2", "textvqa", "okvqa"):
        records = read_predictions(tmp_path / f"{name}.predictions.jsonl")
        assert rescored[name]["n"] == results[name]["n"] == len(records)
        assert rescored[name]["accuracy"] == pytest.approx(
            vqa_score((r["prediction"], r["references"]) for r in records)
        )
        assert rescored[name]["accuracy"] > results[name]["accuracy"]
    assert rescored["coco"]["CIDEr"] > 100  # a human caption against the other four
    assert rescored["inference"] == results["inference"] and rescored["settings"] == results["settings"]
    path = tmp_path / "coco.predictions.jsonl"  # read first: no Java runs before the error
    first = json.loads(path.read_text().splitlines()[0])
    path.write_text(path.read_text() + json.dumps({**first, "prediction": "something else"}) + "\n")
    with pytest.raises(ValueError, match=f"question {first['id']} has two different predictions"):
        rescore(tmp_path)


def test_an_interrupted_run_resumes_where_it_stopped(reference, tiny_checkpoints, tiny_benchmarks, tmp_path):
    """Predictions are appended as they are made: a run cut off mid-line answers only what is missing
    and ends with the same files (a VQA task and captioning)."""
    out, results = reference
    tasks = ("vqav2", "coco")
    for name in tasks:
        lines = (out / f"{name}.predictions.jsonl").read_text().splitlines(keepends=True)
        (tmp_path / f"{name}.predictions.jsonl").write_text("".join(lines[:3]) + lines[3][:20])  # cut mid-line
    resumed = evaluate(tiny_checkpoints("tiny"), tiny_benchmarks, "release", tmp_path, tasks=tasks)
    assert resumed["inference"]["questions"] == sum(results[n]["n"] - 3 for n in tasks)
    assert predictions(tmp_path, tasks) == predictions(out, tasks)
    assert scores(resumed, tasks) == scores(results, tasks)


def test_in_context_examples_are_seeded_and_never_the_query(tiny_benchmarks):
    data = load_task_data("vqav2", tiny_benchmarks / "vqav2" / "release")
    query = data.examples[0]
    first = choose_shots(data, query, 4, seed=0)
    assert [s.id for s in first] == [s.id for s in choose_shots(data, query, 4, seed=0)]
    assert {s.id for s in first} <= {s.id for s in data.support} and len({s.id for s in first}) == 4
    assert any([s.id for s in choose_shots(data, query, 4, seed=s)] != [s.id for s in first] for s in range(1, 4))
    # Drawn from the evaluated split itself (as for a layout without a train split): never the query.
    data.support = data.examples
    for example in data.examples:
        assert example.id not in {s.id for s in choose_shots(data, example, 4, seed=0)}
    prompt = data.task.prompt(query, first)
    assert prompt.count("<image>") == 5 and prompt.endswith(f"Image:<image>Question: {query.question} Answer:")
    assert prompt.startswith("Instruction: provide an answer to the question.")
    shown = [line.rsplit("Answer: ", 1)[1] for line in prompt.splitlines()[1:-1]]
    assert shown == [max(s.references, key=s.references.count) for s in first]  # the most common answer


# --- tools/evaluate.py on real process groups ---------------------------------------------------


def run_tool(checkpoint: Path, benchmarks: Path, layout: str, out: Path, *parallel: str) -> None:
    command = [sys.executable, str(ROOT / "tools/evaluate.py"), "--checkpoint", str(checkpoint), "--out", str(out)]
    command += [arg for name in TASKS for arg in ("--task", f"{name}={benchmarks / name / layout}")]
    result = subprocess.run(
        [*command, *parallel], capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "layout, parallel",
    [("release", ("--tp", "2", "--pp", "2", "--vpp", "2")), ("hub", ("--dp", "2"))],
    ids=["tp2_pp2_vpp2", "dp2"],
)
def test_evaluate_tool_gives_the_same_predictions_at_any_layout(
    reference, tiny_checkpoints, tiny_benchmarks, tmp_path, layout, parallel
):
    """Questions shared out over two data-parallel replicas, or every question through a TP2 x PP2
    model with two virtual stages per rank: the predictions and scores of the single-process run
    (near-ties named if any differ). The DP2 run reads the Hub's parquet, the reference the original
    releases: both layouts give the same prompts, predictions and scores."""
    out, results = reference
    run_tool(tiny_checkpoints("tiny").megatron, tiny_benchmarks, layout, tmp_path, *parallel)
    assert predictions(tmp_path) == predictions(out), (near_ties(out), near_ties(tmp_path))
    assert scores(json.loads((tmp_path / "results.json").read_text())) == json.loads(json.dumps(scores(results)))
