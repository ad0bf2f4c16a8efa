#!/usr/bin/env python
"""Submit a sweep: a grid of layouts, or a comparison of variants, as Slurm job arrays of
slurm/pretrain_idefics2.sh.

The sweep file (examples/sweeps/*.yaml, examples/ablations/*/*.yaml) names a run config, settings
for every run, Slurm resources and a grid: ``nodes`` and ``tasks_per_node`` (ranks per node: GPUs,
or CPU slots) and any ``section.key`` of the run config. A comparison adds ``variants``: named sets
of settings that change together (a model preset and the image resizing it needs, say), each run at
every grid point; run names start with the variant's. Every point of the cartesian product is checked first
(layout, batch divisibility); impossible points are listed with the reason and skipped. Points
with the same node and task counts form one job array (one array task per run); each run writes
``OUT/runs/<name>/results.json``. ``sweep.json`` in OUT records points, skips and job ids.

    python tools/sweep.py examples/sweeps/small_cpu.yaml --out runs/sweeps/small --wait
    python tools/analyze_scaling.py runs/sweeps/small
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_vlm.config import load_run_config  # noqa: E402
from megatron_vlm.distributed import layout_problems  # noqa: E402
from megatron_vlm.training.preflight import check_batch_layout  # noqa: E402

RESOURCE_KEYS = ("nodes", "tasks_per_node")
SHORT_NAMES = {
    "parallel.tensor_parallel": "tp",
    "parallel.pipeline_parallel": "pp",
    "parallel.virtual_pipeline": "vpp",
    "parallel.recompute": "rc",
    "data.micro_batch_size": "mb",
    "training.global_batch_size": "gb",
    "training.distributed_optimizer": "do",
}


def load_sweep(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"sweep file {path} not found; examples: {sorted(p.name for p in (ROOT / 'examples/sweeps').glob('*.yaml'))}"
        )
    sweep = yaml.safe_load(path.read_text()) or {}
    unknown = set(sweep) - {"config", "set", "slurm", "grid", "variants"}
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)}; use config, set, slurm, grid, variants")
    variants = sweep.get("variants")
    if variants is not None and (
        not isinstance(variants, dict)
        or not variants
        or not all(isinstance(name, str) and isinstance(values, dict) for name, values in variants.items())
    ):
        raise ValueError(f"{path}: variants must map each variant's name to its settings ({{key: value}})")
    if "config" not in sweep or "grid" not in sweep:
        raise ValueError(f"{path}: needs 'config' (a run config) and 'grid'")
    for key, values in sweep["grid"].items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: grid.{key} must be a non-empty list")
    return sweep


def run_name(point: dict) -> str:
    parts = [f"n{point['nodes']}x{point['tasks_per_node']}"]
    for key, value in point.items():
        if key in RESOURCE_KEYS:
            continue
        short = SHORT_NAMES.get(key, key.split(".")[-1])
        parts.append(f"{short}{value}")
    return "-".join(str(p).replace("/", "_").replace(" ", "") for p in parts)


def _override(key: str, value: object) -> str:
    compact = json.dumps(value, separators=(",", ":"))  # the task file splits overrides at spaces
    return f"{key}={'null' if value is None else compact if not isinstance(value, str) else value}"


def expand(sweep: dict) -> tuple[list[dict], list[dict]]:
    """(runnable points, skipped points with reasons): every variant at every grid point."""
    grid = {"nodes": [1], "tasks_per_node": [1], **sweep["grid"]}
    keys = list(grid)
    fixed = [_override(key, value) for key, value in (sweep.get("set") or {}).items()]
    variants = sweep.get("variants") or {None: {}}
    points, skipped = [], []
    for variant, settings in variants.items():
        for values in itertools.product(*(grid[key] for key in keys)):
            point = dict(zip(keys, values, strict=True))
            overrides = (
                fixed
                + [_override(key, value) for key, value in settings.items()]
                + [_override(key, value) for key, value in point.items() if key not in RESOURCE_KEYS]
            )
            world = point["nodes"] * point["tasks_per_node"]
            name = run_name(point) if variant is None else f"{variant}-{run_name(point)}"
            entry = {"name": name, "point": point, "world_size": world, "overrides": overrides}
            if variant is not None:
                entry["variant"] = variant
            try:
                run = load_run_config(sweep["config"], overrides)
                problems = layout_problems(run.model, run.parallel, world)
                if not problems:
                    check_batch_layout(run, world)
            except (ValueError, FileNotFoundError) as error:  # a bad value, or a preset that is not there
                problems = [str(error)]
            if problems:
                skipped.append({**entry, "reasons": problems})
            else:
                points.append(entry)
    return points, skipped


def submit_array(
    sweep: dict, sweep_path: Path, out: Path, nodes: int, tasks: int, entries: list[dict], env: dict
) -> str:
    slurm = sweep.get("slurm") or {}
    tasks_file = out / f"tasks-{nodes}x{tasks}.tsv"
    tasks_file.write_text("".join(f"{e['name']}\t{' '.join(e['overrides'])}\n" for e in entries))
    command = [
        "sbatch",
        "--parsable",
        f"--job-name=sweep-{sweep_path.stem}",
        f"--array=0-{len(entries) - 1}",
        f"--nodes={nodes}",
        f"--ntasks-per-node={tasks}",
        f"--gpus-per-node={slurm.get('gpus_per_node', 0)}",
        f"--cpus-per-task={slurm.get('cpus_per_task', 1)}",
        f"--time={slurm.get('time', '01:00:00')}",
        f"--output={out}/logs/%A_%a.out",
        f"--export=ALL,CONFIG={sweep['config']},SWEEP_TASKS={tasks_file},SWEEP_DIR={out}",
    ]
    if slurm.get("exclusive", True):
        command.append("--exclusive")
    if slurm.get("partition"):
        command.append(f"--partition={slurm['partition']}")
    if slurm.get("account"):
        command.append(f"--account={slurm['account']}")
    command.append(str(ROOT / "slurm" / "sweep_task.sh"))
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode:
        raise RuntimeError(f"sbatch refused the {nodes}x{tasks} array: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]


def wait_for(jobs: list[str], poll: float, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        queue = subprocess.run(
            ["squeue", "--noheader", "--format=%i %T", "--jobs", ",".join(jobs)], capture_output=True, text=True
        )
        lines = [line for line in queue.stdout.splitlines() if line.strip()]
        if queue.returncode == 0 and not lines:
            return
        if queue.returncode and "Invalid job id" in queue.stderr:  # all finished and purged
            return
        print(f"{time.strftime('%H:%M:%S')} {len(lines)} array task(s) queued or running", flush=True)
        time.sleep(poll)
    raise TimeoutError(f"sweep jobs {jobs} still running after {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="sweep file (examples/sweeps/*.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="sweep directory: runs/, logs/, sweep.json")
    parser.add_argument("--dry-run", action="store_true", help="list points and skips, submit nothing")
    parser.add_argument("--wait", action="store_true", help="wait for every array task to finish")
    parser.add_argument("--timeout", type=float, default=24 * 3600, help="with --wait: give up after this many seconds")
    args = parser.parse_args(argv)

    sweep = load_sweep(args.sweep)
    points, skipped = expand(sweep)
    print(f"{args.sweep}: {len(points)} runs, {len(skipped)} impossible points skipped")
    for entry in skipped:
        print(f"  skip {entry['name']}: {' | '.join(reason.replace(chr(10), ' ') for reason in entry['reasons'])}")
    for entry in points:
        print(f"  run  {entry['name']} ({entry['world_size']} ranks)")
    if not points:
        print("nothing to run")
        return 1
    if args.dry_run:
        return 0

    out = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    env = {**os.environ}
    env.pop("MASTER_PORT", None)  # each array task derives its own from its job id
    jobs = []
    groups: dict[tuple[int, int], list[dict]] = {}
    for entry in points:
        groups.setdefault((entry["point"]["nodes"], entry["point"]["tasks_per_node"]), []).append(entry)
    for (nodes, tasks), entries in sorted(groups.items()):
        job = submit_array(sweep, args.sweep, out, nodes, tasks, entries, env)
        jobs.append(job)
        for index, entry in enumerate(entries):
            entry["slurm_job"] = f"{job}_{index}"
        print(f"submitted array job {job}: {len(entries)} runs on {nodes} node(s) x {tasks} task(s)")
    manifest = {"sweep": str(args.sweep), "config": sweep["config"], "runs": points, "skipped": skipped, "jobs": jobs}
    (out / "sweep.json").write_text(json.dumps(manifest, indent=2))
    if args.wait:
        wait_for(jobs, poll=10.0, timeout=args.timeout)
        missing = [e["name"] for e in points if not (out / "runs" / e["name"] / "results.json").is_file()]
        print(f"done: {len(points) - len(missing)} of {len(points)} runs wrote results.json")
        if missing:
            print(f"without results (see {out}/logs): {', '.join(missing)}")
            return 1
    print(f"results: python tools/analyze_scaling.py {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
