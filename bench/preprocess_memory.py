"""Benchmark: preprocessing streams. A parquet file holding ~1 GiB of embedded image bytes (real
photos from scikit-image, enlarged and JPEG-encoded, in row groups of ~64 MiB) is preprocessed with
in-process and with ``--workers`` processes into shards of ~64 MiB; the peak memory of the whole process tree (the
preprocessing process and its workers) above its baseline (below) is compared with the issue's
bound: 2 x (one row group + one output shard).

Memory is sampled every 20 ms as the sum of the processes' PSS (proportional set size: a page
shared by n processes counts 1/n in each, so the sum is what the tree really holds; workers count
while they live). The baseline is the peak of the same tree preprocessing a 4 MiB parquet file just
before: the interpreters, their worker pool and the libraries' code paged in, with no data to speak
of. What the 1 GiB run adds on top of that is what the input's size costs.

    python bench/preprocess_memory.py [--gib 1.0] [--workers 1,2] [--tmp /tmp] [--write bench/results/data.md]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def build_parquet(path: Path, total_bytes: int, row_group_bytes: int) -> dict[str, float]:
    """Distinct JPEGs (photos at several sizes and crops) until ``total_bytes`` of image bytes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as parquet
    from PIL import Image
    from skimage import data

    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.hubble_deep_field()]
    encoded: list[bytes] = []
    for number, pixels in enumerate(sources * 4):
        image = Image.fromarray(np.ascontiguousarray(pixels)).resize((1600 + 37 * number, 1200 + 23 * number))
        output = io.BytesIO()
        image.save(output, format="JPEG", quality=95)
        encoded.append(output.getvalue())
    mean = sum(map(len, encoded)) / len(encoded)
    rows_per_group = max(1, int(row_group_bytes / mean))
    schema = pa.schema(
        [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("caption", pa.string())]
    )
    written, row = 0, 0
    # No dictionary encoding and no compression: the file holds the image bytes as they are.
    with parquet.ParquetWriter(path, schema, use_dictionary=False, compression="none") as writer:
        while written < total_bytes:
            group = [encoded[(row + i) % len(encoded)] for i in range(rows_per_group)]
            table = pa.table(
                {
                    "image": [{"bytes": b, "path": None} for b in group],
                    "caption": [f"Photo {row + i}, a real scene." for i in range(rows_per_group)],
                },
                schema=schema,
            )
            writer.write_table(table, row_group_size=rows_per_group)
            written += sum(map(len, group))
            row += rows_per_group
    meta = parquet.ParquetFile(path).metadata
    largest_group = max(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    return {"rows": row, "image_bytes": written, "row_groups": meta.num_row_groups, "row_group_bytes": largest_group}


def child(parquet_path: str, out: str, samples_per_shard: int, workers: int) -> None:
    """The measured process: imports, a run on a 4 MiB file (the baseline), then the real run."""
    sys.path.insert(0, str(ROOT))
    from megatron_vlm.data.preprocess import preprocess

    small = Path(out).with_name("small")
    small.mkdir()
    build_parquet(small / "small.parquet", 4 << 20, 1 << 20)
    print("READY", flush=True)
    sys.stdin.readline()
    preprocess([small / "small.parquet"], small / "shards", 8, workers, progress=False)
    print("SMALL", flush=True)
    sys.stdin.readline()
    report = preprocess([Path(parquet_path)], Path(out), samples_per_shard, workers, progress=False)
    print("DONE " + json.dumps({k: v for k, v in report.to_dict().items() if k != "rejects"}), flush=True)


def tree_pss(root: psutil.Process) -> int:
    """The summed PSS of a process and its descendants (those that exit meanwhile count 0)."""
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.ZombieProcess, ProcessLookupError):
            continue
    return total


def peak_until(process: subprocess.Popen, root: psutil.Process, marker: str) -> tuple[int, float, str]:
    """Sample the tree every 20 ms until the child prints ``marker``: (peak, seconds, its line)."""
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    peak, started = 0, time.perf_counter()
    while True:
        peak = max(peak, tree_pss(root))
        if selector.select(timeout=0.02):
            line = process.stdout.readline()
            if line.startswith(marker) or not line:
                selector.close()
                return peak, time.perf_counter() - started, line


def measure(parquet_path: Path, out: Path, samples_per_shard: int, workers: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(parquet_path), str(out), str(samples_per_shard), str(workers)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    root = psutil.Process(process.pid)
    assert process.stdout.readline().strip() == "READY"
    idle = max(tree_pss(root) for _ in range(5))
    process.stdin.write("go\n")
    process.stdin.flush()
    baseline, _, line = peak_until(process, root, "SMALL")
    assert line.startswith("SMALL"), line
    process.stdin.write("go\n")
    process.stdin.flush()
    peak, seconds, line = peak_until(process, root, "DONE")
    process.wait()
    assert process.returncode == 0 and line.startswith("DONE"), line
    summary = json.loads(line.split("DONE ", 1)[1])
    shard_bytes = max((out / name).stat().st_size for name in summary["shards"])
    return {
        "idle_pss": idle,
        "baseline_pss": baseline,
        "peak_pss": peak,
        "peak_pss_above": peak - baseline,
        "seconds": seconds,
        "written": summary["written"],
        "shard_bytes": shard_bytes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="image bytes in the parquet file")
    parser.add_argument("--row-group-mib", type=float, default=64.0)
    parser.add_argument("--workers", default="1,2", help="worker counts to measure (1: in-process)")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the parquet and shards go")
    parser.add_argument("--write", type=Path, help="append the result as a section of this markdown file")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, out, per_shard, workers = args.child
        child(path, out, int(per_shard), int(workers))
        return 0
    work = Path(tempfile.mkdtemp(prefix="preprocess-memory-", dir=args.tmp))
    try:
        started = time.perf_counter()
        source = build_parquet(work / "photos.parquet", int(args.gib * (1 << 30)), int(args.row_group_mib * MIB))
        build_seconds = time.perf_counter() - started
        per_row = source["image_bytes"] / source["rows"]
        samples_per_shard = max(1, int(source["row_group_bytes"] / per_row))  # shards about a row group each
        results = []
        for workers in [int(w) for w in args.workers.split(",")]:
            shutil.rmtree(work / "shards", ignore_errors=True)
            shutil.rmtree(work / "small", ignore_errors=True)
            results.append(
                {"workers": workers, **measure(work / "photos.parquet", work / "shards", samples_per_shard, workers)}
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shard_bytes = max(r["shard_bytes"] for r in results)
    bound = 2 * (source["row_group_bytes"] + shard_bytes)
    print(json.dumps({**source, "bound": bound, "build_seconds": build_seconds, "runs": results}, indent=2))
    verdicts = ["below" if r["peak_pss_above"] < bound else "ABOVE" for r in results]
    lines = [
        f"\n## Preprocessing memory: a 1 GiB parquet streams ({date.today()}, {platform.machine()}, "
        f"{os.cpu_count()} cores, no GPU)\n",
        "`python bench/preprocess_memory.py --write bench/results/data.md`: a parquet file of "
        f"{source['image_bytes'] / (1 << 30):.2f} GiB of embedded JPEG bytes ({source['rows']} real photos, enlarged, "
        f"written by pyarrow, uncompressed: {source['row_groups']} row groups of up to "
        f"{source['row_group_bytes'] / MIB:.0f} MiB) preprocessed into shards of up to {shard_bytes / MIB:.0f} MiB. "
        "Memory: the peak of the summed PSS of the process tree (the tool and its workers), sampled every 20 ms; "
        "the baseline is the same tree's peak while preprocessing a 4 MiB parquet file just before.\n",
        f"| workers | baseline MiB | peak MiB | added by the input, MiB | against the bound "
        f"2 x (row group + shard) = {bound / MIB:.0f} MiB | time |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['workers']}{' (in-process)' if r['workers'] == 1 else ''} | {r['baseline_pss'] / MIB:.0f} | "
            f"{r['peak_pss'] / MIB:.0f} | {r['peak_pss_above'] / MIB:.0f} | {r['peak_pss_above'] / bound:.2f} | "
            f"{r['seconds']:.0f} s |"
        )
    lines += [
        "",
        f"Every run is {'below' if all(v == 'below' for v in verdicts) else 'NOT below'} the bound. Tables are read "
        "in record batches of 8 MiB and at most 16 MiB of records are in flight to the workers; shards are "
        "written as samples arrive. pyarrow itself holds about two row groups while reading one: it writes a "
        "row group of large values as one data page, read and decoded whole.",
    ]
    if args.write:
        with args.write.open("a") as handle:
            handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(v == "below" for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
