"""The GPU benchmark's script runs end to end on CPU (--smoke: tiny widths), so it cannot rot
between the sessions that have a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_proxy_bench_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench/gpu_proxy.py"), "--smoke", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_proxy_smoke.json").read_text())
    assert [run["precision"] for run in result["runs"]] == ["bf16", "fp8 hybrid"]
    assert result["runs"][1]["fp8_backend"] == "torch"
    for run in result["runs"]:
        assert run["model_tflops_per_second"] > 0 and run["peak_memory_gib"] > 0
        assert run["mfu_vs_bf16_peak"] == run["model_tflops_per_second"] / result["matmul_peak_tflops"]["bf16"]
    assert "| bf16 |" in (tmp_path / "gpu_proxy_smoke.md").read_text()
