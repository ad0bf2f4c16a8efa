from setuptools import find_packages, setup

setup(
    name="megatron-vlm",
    version="0.1.0",
    description="Idefics2-style vision-language pretraining on Megatron-Core",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_vlm", "megatron_vlm.*"]),
    install_requires=[
        # Tested: 0.16.1 (Python 3.11) and 0.19.2 (Python 3.12); 0.17+ need Python >= 3.12.
        "megatron-core>=0.16.1,<0.20",
        "torch>=2.4",
        "packaging>=23",  # version ranges of the Megatron-Core CPU patches
        "pyyaml>=6",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "tensorboard>=2.15",
        "psutil>=5.9",  # megatron-core's dist_checkpointing needs it and does not declare it
        "numpy>=1.24",
        "pillow>=10",
        "transformers>=5.0,<6",  # tokenizer at run time; numerical oracle and HF side of the converters
        "sentencepiece>=0.2",
        "protobuf>=4",
        "mistral-common>=1.5",  # ships the real Mistral-7B tokenizer: nothing is downloaded at run time
        "matplotlib>=3.7",  # tools/analyze_scaling.py plots
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "ruff>=0.5",
            "scikit-image>=0.22",  # real photos for tests and the bundled dataset
            "nvidia-dali-cuda130>=2.0",  # its CPU pipelines are the tested twin of GPU decoding
            "megatron-energon>=7",  # our pair/page shards are read by it as they are
            "pyarrow>=14",  # parquet input of the preprocessing tool
            "peft>=0.13",  # the DoRA oracle (tests/test_dora.py; tested: 0.22.0)
            "datasets>=2.14",  # writes the save_to_disk directories the preprocessing tool reads (tested: 5.2.0)
            "mpich>=4",  # an MPI launcher (mpiexec) for the MPI launch test
            "mpi4py>=3.1",  # its ranks agree on a rendezvous through mpi4py
            "pypdfium2>=4",  # renders PDF pages in preprocessing (Apache-2.0 / BSD-3-Clause; not PyMuPDF: AGPL)
            "reportlab>=4",  # the PDF test files are made with it (BSD)
            "pycocoevalcap>=1.2",  # caption metrics (needs Java); tests/test_eval_metrics.py
            "pycocotools>=2.0",  # the COCO caption files of the official pycocoevalcap run in that test
            "wandb>=0.30",  # logging.wandb, read back with its own `wandb leet inspect` (tested: 0.30.0; 0.31.0 writes and reads back offline runs alike)
        ],
        # tools/preprocess_data.py on every input format: parquet / Arrow, PDFs, MPI jobs.
        "preprocess": ["pyarrow>=14", "pypdfium2>=4", "mpi4py>=3.1"],
        # GPU machines without a container that carries them (NGC PyTorch containers have TE and
        # DALI already: see the README's "GPU clusters" section).
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        "dali": ["nvidia-dali-cuda130>=2.0"],  # any nvidia-dali-cuda* flavour works: it imports as nvidia.dali
        "mpi": ["mpi4py>=3.1", "mpich>=4"],
        "eval": ["pycocoevalcap>=1.2"],  # caption metrics of megatron_vlm/evaluation (needs a `java` on PATH)
        "wandb": ["wandb>=0.30"],  # logging.wandb (Weights & Biases)
    },
)
