"""Benchmark: HF <-> Megatron conversion time and peak memory against model size.

For each synthetic Idefics2 size (random bf16 weights written straight to sharded safetensors),
runs in fresh processes, each measured alone (wall time, peak RSS from wait4):
  * baseline: transformers ``from_pretrained`` + ``save_pretrained`` of the same checkpoint,
  * ours: ``tools/convert_hf_to_megatron.py`` (TP1) and ``tools/convert_megatron_to_hf.py``.
Reports ratios against the baseline measured in the same run, and writes
``bench/results/conversion.{json,md}``.

    python bench/conversion.py [--sizes small,medium,1b] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_vlm.config import ModelConfig, load_model_preset  # noqa: E402
from megatron_vlm.conversion.hf_config import to_hf_config, to_hf_config_dict  # noqa: E402
from megatron_vlm.conversion.hf_io import ShardedSafetensorsWriter, write_json  # noqa: E402


def sized_config(name: str) -> ModelConfig:
    """Idefics2 shapes scaled down from the 8B preset (real vocabulary, GQA everywhere)."""
    base = load_model_preset("idefics2-8b")
    shapes = {  # vision (hidden, ffn, layers, heads), text (hidden, ffn, layers, heads, kv)
        "small": ((256, 1024, 4, 4), (512, 1536, 4, 8, 2)),
        "medium": ((512, 2048, 8, 8), (1024, 3584, 8, 16, 4)),
        "1b": ((768, 3072, 12, 12), (2048, 7168, 12, 16, 4)),
    }
    (vh, vf, vl, vn), (th, tf, tl, tn, tk) = shapes[name]
    return dataclasses.replace(
        base,
        vision=dataclasses.replace(
            base.vision, hidden_size=vh, intermediate_size=vf, num_layers=vl, num_heads=vn, image_size=490
        ),
        connector=dataclasses.replace(base.connector, num_heads=8, num_kv_heads=2, head_dim=64),
        text=dataclasses.replace(
            base.text, hidden_size=th, intermediate_size=tf, num_layers=tl, num_heads=tn, num_kv_heads=tk
        ),
    )


def write_random_checkpoint(config: ModelConfig, directory: Path) -> int:
    """Random bf16 weights under transformers' names and shapes, streamed tensor by tensor."""
    from transformers import Idefics2ForConditionalGeneration

    with torch.device("meta"):
        shapes = {
            name: p.shape for name, p in Idefics2ForConditionalGeneration(to_hf_config(config)).state_dict().items()
        }
    writer = ShardedSafetensorsWriter(directory, max_shard_bytes=1 << 30)
    generator = torch.Generator().manual_seed(0)
    parameters = 0
    for name, shape in shapes.items():
        writer.add(name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))
        parameters += shape.numel()
    config_dict = to_hf_config_dict(config)
    config_dict["dtype"] = "bfloat16"
    write_json(writer, "config.json", config_dict)
    writer.commit()
    return parameters


# Linux carries a process's peak RSS across fork + exec, so a command started from this (large)
# process would report at least this process's size. A lean interpreter starts it instead.
SPAWNER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(process.pid, 0)
seconds = time.perf_counter() - start
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "seconds": seconds, "maxrss_kib": usage.ru_maxrss,
                  "stderr": process.stderr.read().decode()[-4000:]}))
"""


def measure(command: list[str]) -> dict[str, float]:
    """Run a command alone; its wall time and peak resident memory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-S", "-c", SPAWNER, *command], capture_output=True, text=True, env=env)
    result = json.loads(done.stdout)
    if result["code"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result['stderr']}")
    return {"seconds": round(result["seconds"], 2), "peak_rss_mib": round(result["maxrss_kib"] / 1024, 1)}


BASELINE = (
    "import sys, torch; from transformers import Idefics2ForConditionalGeneration as M; "
    "M.from_pretrained(sys.argv[1], dtype=torch.bfloat16).save_pretrained(sys.argv[2], max_shard_size='1GB')"
)


def run(sizes: list[str], workdir: Path) -> list[dict]:
    rows = []
    for size in sizes:
        folder = workdir / size
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        parameters = write_random_checkpoint(sized_config(size), folder / "hf")
        baseline = measure([sys.executable, "-c", BASELINE, str(folder / "hf"), str(folder / "baseline")])
        to_megatron = measure(
            [
                sys.executable,
                str(ROOT / "tools/convert_hf_to_megatron.py"),
                "--hf",
                str(folder / "hf"),
                "--out",
                str(folder / "megatron"),
                "--dtype",
                "bf16",
            ]
        )
        to_hf = measure(
            [
                sys.executable,
                str(ROOT / "tools/convert_megatron_to_hf.py"),
                "--megatron",
                str(folder / "megatron"),
                "--out",
                str(folder / "exported"),
                "--max-shard-size",
                "1GB",
            ]
        )
        row = {
            "size": size,
            "parameters": parameters,
            "bf16_mib": round(parameters * 2 / 2**20, 1),
            "baseline_hf_load_save": baseline,
            "hf_to_megatron": to_megatron,
            "megatron_to_hf": to_hf,
            "time_ratio_hf_to_megatron": round(to_megatron["seconds"] / baseline["seconds"], 2),
            "time_ratio_megatron_to_hf": round(to_hf["seconds"] / baseline["seconds"], 2),
            "rss_ratio_hf_to_megatron": round(to_megatron["peak_rss_mib"] / baseline["peak_rss_mib"], 2),
            "rss_ratio_megatron_to_hf": round(to_hf["peak_rss_mib"] / baseline["peak_rss_mib"], 2),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def write_results(rows: list[dict], out: Path) -> None:
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU"
    (out / "conversion.json").write_text(
        json.dumps({"date": str(date.today()), "machine": machine, "rows": rows}, indent=2)
    )
    lines = [
        f"# Conversion benchmark ({date.today()}, {machine})",
        "",
        "Random bf16 Idefics2 checkpoints; each step a fresh process. Baseline: transformers",
        "`from_pretrained` + `save_pretrained` of the same checkpoint in the same run. Ratios are ours / baseline.",
        "",
        "| size | parameters | bf16 MiB | baseline s | baseline RSS MiB | HF->Megatron s (ratio) | RSS MiB (ratio) | Megatron->HF s (ratio) | RSS MiB (ratio) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, a, e = r["baseline_hf_load_save"], r["hf_to_megatron"], r["megatron_to_hf"]
        lines.append(
            f"| {r['size']} | {r['parameters']:,} | {r['bf16_mib']} | {b['seconds']} | {b['peak_rss_mib']} | "
            f"{a['seconds']} ({r['time_ratio_hf_to_megatron']}) | {a['peak_rss_mib']} ({r['rss_ratio_hf_to_megatron']}) | "
            f"{e['seconds']} ({r['time_ratio_megatron_to_hf']}) | {e['peak_rss_mib']} ({r['rss_ratio_megatron_to_hf']}) |"
        )
    (out / "conversion.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,medium,1b")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="conversion-bench-"))
    rows = run(args.sizes.split(","), workdir)
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(rows, args.out)
    print((args.out / "conversion.md").read_text())


if __name__ == "__main__":
    main()
