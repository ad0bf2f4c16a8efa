"""Build indexed webdataset shards from any supported input, on one machine or as an MPI job.

    python tools/preprocess_data.py examples/data/pairs.jsonl --out data/shards/pairs
    python tools/preprocess_data.py obelics/*.parquet --out data/shards/obelics --workers 8 --samples-per-shard 2000
    srun -N 16 --ntasks-per-node 1 python tools/preprocess_data.py obelics/ --out /lustre/shards/obelics --workers 32
    mpiexec -n 4 python tools/preprocess_data.py laion-img2dataset/ --out data/shards/laion --validation-fraction 0.001

INPUT is a file or a directory; the format is detected from the file type and, for tables, the columns:
  *.jsonl          rows (layouts below); image paths relative to the file
  *.json           a JSON array of rows (LLaVA's instruction files), read whole
  *.parquet        read in record batches (never a whole file or row group in memory); images as
                   bytes, {"bytes", "path"} structs (the `datasets` Image feature), paths or URLs
  *.arrow, a `datasets` save_to_disk directory (data-*.arrow + state.json / dataset_info.json)
                   read by record batch with pyarrow.ipc (the `datasets` package is not needed)
  *.tar, an img2dataset output directory (NNNNN.tar with KEY.jpg + KEY.txt + KEY.json)
                   image-caption pairs; a tar whose samples are all usable as they are is not
                   rewritten, only indexed (the output shard is a hard link to it): see --tar-mode
  *.tar or a directory of PDFs (KEY.pdf + KEY.json {"pages": [TEXT, ...]} or KEY.txt with pages
                   split by form feeds; without either the PDF's own text layer): every page is
                   rendered at --pdf-dpi with pypdfium2 and paired with its text ("page" samples)
Table layouts (from the columns; --kind / --image-column / --text-column override):
  interleaved      texts + images: lists of equal length with None holes (OBELICS); other columns ignored
  pair             an image column (image, jpg, png, webp, img, image_url, url) + caption / txt / alt_text
  page             an image column + text
  conversation     instruction data, turns and roles kept (fine-tuning; the loss is on the answers):
                   The Cauldron (images + texts of {user, assistant}), LLaVA (conversations of
                   {from, value} with <image> placeholders + image), chat messages (messages of
                   {role, content} + images), Alpaca (instruction, input, output); text-only rows too
Images given as http(s) URLs are read from a local mirror (--url-mirror), never downloaded.

Every image is decoded and checked (corrupt, missing, absurd sizes); rejected rows are counted by
reason and listed in NAME.report.json; images DALI decodes differently are stored as PNG and the shard
index records it. The last line printed is a JSON summary (written, validation, rejected by reason;
"ranks": per rank the input files it read, by number, their rows and the samples it wrote).

Under mpiexec / mpirun / srun (detected from the launcher's environment; needs mpi4py) each rank takes
a fixed slice of the input files and writes their shards; rank 0 names them and writes the report. The
output is the same, byte for byte, whatever the number of ranks or --workers. --out must be on a file
system every rank sees (rank 0 renames the shards the others wrote). Files are the unit of work: give
at least as many input files as ranks.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

# Variables an MPI launcher sets in every rank (mpich/hydra, Open MPI, PMIx, Slurm's srun). Not
# SLURM_NTASKS: a batch script's single process has it too, and it is no MPI job.
MPI_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS")


def mpi_communicator(force: bool) -> Any:
    """mpi4py's COMM_WORLD when launched as a job of more than one rank, else None."""
    sizes = [int(os.environ[v]) for v in MPI_SIZE_VARIABLES if os.environ.get(v, "").isdigit()]
    if not force and not any(size > 1 for size in sizes):
        return None
    try:
        from mpi4py import MPI
    except ModuleNotFoundError as error:
        raise SystemExit(f"launched as an MPI job of {max(sizes, default=1)} ranks but mpi4py is missing") from error
    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 or force else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", type=Path, nargs="+", help="files or directories (formats above)")
    parser.add_argument("--out", type=Path, required=True, help="output directory for the shards")
    parser.add_argument("--name", help="shard name prefix (default: first input's stem)")
    parser.add_argument(
        "--kind", choices=["interleaved", "pair", "page", "conversation"], help="force the row layout of tables"
    )
    parser.add_argument("--image-column", help="the column holding images (a list of them for interleaved)")
    parser.add_argument("--text-column", help="the column holding texts (a list of them for interleaved)")
    parser.add_argument(
        "--url-mirror", type=Path, help="URL -> file: a .json / .jsonl / .tsv mapping or an img2dataset dir"
    )
    parser.add_argument("--pdf-dpi", type=float, default=150.0, help="resolution PDF pages are rendered at (150)")
    parser.add_argument(
        "--tar-mode",
        choices=["auto", "reindex", "rewrite"],
        default="auto",
        help="img2dataset tars: index them as they are when every sample is usable (auto), insist on it "
        "(reindex: an error otherwise), or always copy the samples into new shards (rewrite)",
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.0,
        help="hold out this fraction of samples (chosen by a hash of their key) in OUT/validation/, "
        "the loader's default validation split; never in the training shards",
    )
    parser.add_argument(
        "--validation-seed", type=int, default=0, help="another seed holds out another set of samples (0)"
    )
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1, help="processes per rank that read and check images")
    parser.add_argument("--mpi", action="store_true", help="use mpi4py even when no launcher variable is set")
    args = parser.parse_args()
    missing = [str(p) for p in args.inputs if not p.exists()]
    if missing:
        parser.error(f"inputs not found: {missing}")

    from megatron_vlm.data.preprocess import preprocess

    comm = mpi_communicator(args.mpi)
    rank = comm.Get_rank() if comm is not None else 0
    report = preprocess(
        args.inputs,
        args.out,
        args.samples_per_shard,
        args.workers,
        args.kind,
        name=args.name,
        progress=rank == 0,
        image_column=args.image_column,
        text_column=args.text_column,
        pdf_dpi=args.pdf_dpi,
        validation_fraction=args.validation_fraction,
        validation_seed=args.validation_seed,
        tar_mode=args.tar_mode,
        url_mirror=args.url_mirror,
        comm=comm,
    )
    if rank == 0:
        summary = {k: v for k, v in report.to_dict().items() if k != "rejects"}
        summary["ranks"] = report.ranks
        print(json.dumps(summary))
    return 0 if report.written + report.validation else 1


if __name__ == "__main__":
    sys.exit(main())
