#!/usr/bin/env bash
# The GPU check: one command that, on a machine with one GPU (an H100/H200: 9 minutes), installs what
# the machine lacks from wheels beside the checkout, records the machine, runs `pytest -m gpu` and
# bench/gpu_proxy.py (with its per-part time breakdown and torch.compile variants) first, then builds
# the bundled data and runs the full trainer as one process (tiny preset in bf16 and in torch FP8,
# scored on the tiny VQAv2 at the end: generation on the GPU; small preset; a resume).
#
#   bash bench/gpu_check.sh OUTDIR [--dry-run] [--pack DIR] [--only STEP,...] [--limit SECONDS] [--cpu]
#
#   --dry-run    print every step (its exact command and time limit) and exit 0; runs nothing
#   --pack DIR   keep DIR/gpu_check.tar.gz (all of OUTDIR) and DIR/summary.txt up to date while
#                running: the device tool brings back at most 8 files from $OUT, so give it this
#   --only LIST  run only these steps (comma-separated names, e.g. to rerun a failed one)
#   --limit N    cap every step's time limit at N seconds
#   --cpu        allow a machine without CUDA (the trainer runs on CPU, gpu_proxy.py --smoke):
#                checks this script's mechanics where there is no GPU
#
# Every step runs under its own time limit, its output going line by line into OUTDIR/<step>.log,
# and appends "step rc seconds" to OUTDIR/summary.txt when it ends, so a call cut short still
# leaves what ran. At a step's limit its processes get SIGUSR2 first: the trainer and pytest dump
# every thread's Python stack on it (megatron_vlm/train.py, tests/conftest.py), so a hang shows
# where it hangs; SIGKILL follows 10 s later. The steps' limits add up to the whole script's budget
# (GPU_CHECK_BUDGET, default 540 s: a device call's 600 s less start-up); should a step end early,
# nothing is lost, and a smaller budget cuts the later steps. A failing step does not stop the ones
# after it; the exit status is non-zero if any step failed, timed out or was not reached.
#
# DALI (its cu130 wheel is ~190 MB, a device call carries 64 MiB) can travel in parts over successive
# calls on a warm machine: .whl/<wheel>.part-aa, -ab, ... (each carried by its own call: carried paths
# replace only themselves, parts already there stay) and .whl/<wheel>.sha256; the install step joins
# them, checks the sha256 and installs the wheel (docs/gpu.md).
#
# Environment: PYTHON (default python3: the device machine has no `python`), WHEELS (default
# .whl/ in the checkout), GPU_CHECK_SITE (where wheels are installed, default /tmp/gpu_check_site),
# GPU_CHECK_BUDGET. How to prepare the wheels and the device call: docs/gpu.md.
set -uo pipefail

usage() { sed -n '7,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

OUTDIR="" DRY_RUN=0 CPU=0 PACK="" ONLY="" LIMIT_CAP=""
while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --cpu) CPU=1 ;;
        --pack | --only | --limit)
            [[ $# -ge 2 ]] || { echo "gpu_check: $1 needs a value" >&2; exit 2; }
            case $1 in --pack) PACK=$2 ;; --only) ONLY=$2 ;; --limit) LIMIT_CAP=$2 ;; esac
            shift ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 2 ;;
        *)
            [[ -z $OUTDIR ]] || { echo "gpu_check: one OUTDIR only (got $OUTDIR and $1)" >&2; exit 2; }
            OUTDIR=$1 ;;
    esac
    shift
done
[[ -n $OUTDIR ]] || { usage >&2; exit 2; }
[[ -z $LIMIT_CAP || $LIMIT_CAP =~ ^[0-9]+$ ]] || { echo "gpu_check: --limit takes whole seconds" >&2; exit 2; }
case $OUTDIR in /*) ;; *) OUTDIR=$PWD/$OUTDIR ;; esac
case $PACK in "" | /*) ;; *) PACK=$PWD/$PACK ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-$ROOT/.whl}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
BUDGET=${GPU_CHECK_BUDGET:-540}
KILL_AFTER=10
# Data and run directories: fresh each time, so no run resumes from an older checkpoint.
if ((DRY_RUN)); then WORK=$(mktemp -u /tmp/gpu_check_work.XXXXXX); else WORK=$(mktemp -d /tmp/gpu_check_work.XXXXXX); fi

export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MPLBACKEND=Agg TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore
export NCCL_DEBUG=WARN TORCH_NCCL_ASYNC_ERROR_HANDLING=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export GPU_CHECK_CPU=$CPU

# ---------------------------------------------------------------------------------------------
# The steps: name, time limit (s), command (run with bash -c; its output goes to OUTDIR/name.log)
# ---------------------------------------------------------------------------------------------
NAMES=() LIMITS=() COMMANDS=()
add_step() { NAMES+=("$1"); LIMITS+=("$2"); COMMANDS+=("$3"); }

# Which modules the project needs (and which pip package brings each), and the optional GPU ones.
IMPORTS_PY='import importlib, sys
required = {"torch": "torch", "megatron.core": "megatron-core", "mistral_common": "mistral-common",
            "yaml": "pyyaml", "safetensors": "safetensors", "tqdm": "tqdm", "tensorboard": "tensorboard",
            "psutil": "psutil", "numpy": "numpy", "PIL": "pillow", "transformers": "transformers",
            "sentencepiece": "sentencepiece", "google.protobuf": "protobuf", "matplotlib": "matplotlib",
            "pytest": "pytest",
            # transformers imports this whenever mistral_common is importable (its processors check
            # MistralCommonBackend), so mistral-common needs its own dependencies after all: pydantic,
            # jsonschema, pydantic-extra-types, pycountry and theirs (docs/gpu.md).
            "mistral_common.protocol.instruct.request": "mistral-common dependencies"}
optional = {"transformer_engine.pytorch": "transformer-engine[pytorch]", "nvidia.dali": "nvidia-dali-cuda130",
            "apex": "apex", "scaled_masked_softmax_cuda": "Megatron fused softmax (apex build)",
            "skimage": "scikit-image (some tests)"}
missing = []
for table, needed in ((required, True), (optional, False)):
    for module, package in table.items():
        try:
            found = importlib.import_module(module)
            top = sys.modules[module.split(".")[0]]
            version = str(getattr(found, "__version__", None) or getattr(top, "__version__", ""))
            where = getattr(found, "__file__", None)
            print(f"ok       {module:28} {version:14} {where}", flush=True)
        except Exception as error:  # absent, or present but broken (missing CUDA libraries, ...)
            label = "MISSING" if needed else "absent "
            print(f"{label}  {module:28} (pip: {package}) {type(error).__name__}: {error}", flush=True)
            missing += [package] if needed else []
if missing:
    sys.exit("required packages missing: " + ", ".join(missing) + ": put their cp312 wheels in .whl/ (docs/gpu.md)")
print("all required packages import")'

# The machine: GPU, versions, what our capability checks decide on it.
MACHINE_PY='import os, platform, socket, sys, time
print("python", platform.python_version(), sys.executable, flush=True)
print("host", socket.gethostname(), "cpus", os.cpu_count(), flush=True)
try:
    print("host name resolves to", socket.gethostbyname(socket.gethostname()), flush=True)
except OSError as error:
    print("host name does not resolve:", error, "(torchrun --standalone would need it; the trainer here uses 127.0.0.1)")
print("importing torch", flush=True)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), flush=True)
if torch.cuda.is_available():
    print("nccl", ".".join(map(str, torch.cuda.nccl.version())), "devices", torch.cuda.device_count(), flush=True)
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        print(f"cuda:{index} {props.name} {props.total_memory / 2**30:.1f} GiB, compute {props.major}.{props.minor}, {props.multi_processor_count} SMs", flush=True)
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    x @ x
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        x @ x
    torch.cuda.synchronize()
    print(f"bf16 8192^3 matmul: {20 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12:.0f} TFLOP/s", flush=True)
print("importing megatron_vlm.backend", flush=True)
from megatron_vlm import backend
for name in ("has_cuda", "has_transformer_engine", "has_fp8", "has_apex", "has_fused_softmax", "has_dali"):
    print(f"backend.{name}() = {getattr(backend, name)()}", flush=True)
print("fp8 backend (auto):", backend.fp8_backend("auto"), "| distributed backend:", backend.default_distributed_backend())
if not torch.cuda.is_available() and os.environ.get("GPU_CHECK_CPU") != "1":
    sys.exit("torch sees no CUDA device: this check needs a GPU (--cpu runs its mechanics without one)")'

add_step install 25 "set -e; shopt -s nullglob
for sums in $WHEELS/*.whl.sha256; do  # a wheel carried in parts over several calls: joined and checked
    wheel=\${sums%.sha256}; parts=(\$wheel.part-*)
    [[ -f \$wheel || \${#parts[@]} -eq 0 ]] && continue
    cat \"\${parts[@]}\" > \$wheel.joining
    if [[ \$(sha256sum < \$wheel.joining | cut -d' ' -f1) == \$(cut -d' ' -f1 < \$sums) ]]; then
        mv \$wheel.joining \$wheel; echo \"joined \${#parts[@]} parts into \${wheel##*/} (sha256 ok)\"
    else
        rm \$wheel.joining; echo \"\${wheel##*/}: its \${#parts[@]} parts do not match its sha256 (a part missing?): not installed\"
    fi
done
wheels=($WHEELS/*.whl)
if ((\${#wheels[@]})); then
    echo \"installing \${#wheels[@]} wheel(s) into $SITE: \${wheels[*]##*/}\"
    $PYTHON -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE \"\${wheels[@]}\"
else
    echo 'no wheels in $WHEELS: nothing to install'
fi
$PYTHON - <<'PY'
$IMPORTS_PY
PY"

add_step machine 15 "date -u; uname -a; nproc; free -g | head -n 2; df -h /tmp | tail -n 1; command -v $PYTHON python || true
nvidia-smi || echo \"nvidia-smi failed (rc \$?)\"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv || true
env | grep -E '^(CUDA|NCCL|TORCH|PYTHON|HF_)' | sort
$PYTHON - <<'PY'
$MACHINE_PY
PY"

# Every gpu-marked test (skipped with the reason where TE etc. is absent); a test running past
# 100 s dumps its stacks (pytest's faulthandler_timeout). -s: output reaches the log as it comes,
# and the SIGUSR2 stack dump (tests/conftest.py) is not held in pytest's capture when killed. A test
# module that cannot be imported on that image must not keep the gpu tests of the others from running.
add_step pytest_gpu 180 "stdbuf -oL -eL $PYTHON -m pytest -m gpu -v -s -rs -p no:cacheprovider -o faulthandler_timeout=100 \\
    --continue-on-collection-errors --durations=10 --junitxml=$OUTDIR/pytest_gpu.xml tests"

# bf16 and FP8, then both again with torch.compile (norms, SwiGLU, the FP8 casts), each with its
# profiler breakdown. Fewer steps than the script's defaults (5 timed after 2 warm-up, 1 profiled:
# about 20 s a configuration at 8B widths, plus the first compile's), and a time budget of the
# step's limit less 15 s: a configuration that would not finish is skipped and reported, and
# the results are written after each one. --cpu: tiny widths (--smoke), no compile (minutes on CPU).
if ((CPU)); then PROXY_ARGS=--smoke; else PROXY_ARGS="--compile --steps 5 --warmup 2 --profile-steps 1"; fi
add_step gpu_proxy 110 "stdbuf -oL -eL $PYTHON bench/gpu_proxy.py --out-dir $OUTDIR $PROXY_ARGS \\
    --time-budget \$((GPU_CHECK_STEP_LIMIT - 15))"

# As slurm/pretrain_idefics2.sh builds the bundled dataset for the tiny run config.
add_step data 15 "set -e; $PYTHON - <<'PY'
from pathlib import Path
from megatron_vlm.data.preprocess import preprocess  # one process for the three sources
for name in ('interleaved', 'pairs', 'pages'):
    report = preprocess([Path('examples/data/' + name + '.jsonl')], Path('$WORK/data/' + name), samples_per_shard=4,
                        validation_fraction=0.25, validation_seed=7, progress=False)
    print(name, report.written, 'samples written')
PY
# The tiny runs are scored on VQAv2 at their end (needs pyarrow for the Hub layout; without it they skip it).
$PYTHON examples/benchmarks/build.py $WORK/data/benchmarks --benchmarks vqav2 || echo 'benchmarks not built: the runs skip them'"

# The full trainer as one process (no torchrun: NCCL does not put two ranks on one GPU). 20 steps,
# checkpoints at 10 and 20; results.json comes back beside the log.
trainer_step() {  # NAME LIMIT OVERRIDES...
    local name=$1 limit=$2 run=$WORK/runs/$1
    shift 2
    add_step "$name" "$limit" "stdbuf -oL -eL $PYTHON -m megatron_vlm.train --config examples/tiny_cpu.yaml \\
    data.root=$WORK/data training.output_dir=$run training.train_steps=20 training.log_interval=5 \\
    training.save_interval=10 \$([[ -d $WORK/data/benchmarks ]] || echo training.benchmarks.interval=0) $*
rc=\$?; cp $run/results.json $OUTDIR/$name.results.json 2>/dev/null
echo \"latest checkpoint: \$(cat $run/checkpoints/latest 2>/dev/null || echo none)\"; exit \$rc"
}
trainer_step train_tiny_bf16 50 precision.params_dtype=bfloat16
trainer_step train_tiny_fp8 45 precision.params_dtype=bfloat16 precision.fp8=hybrid precision.fp8_backend=torch
trainer_step train_small 45 model=small precision.params_dtype=bfloat16 training.benchmarks.interval=0
# Last: the bf16 run resumed to step 30 with the distributed optimizer: the model-space optimizer
# state (CUDA tensors, NCCL sums) and the data stream load on a GPU, the background saves publish.
add_step train_tiny_bf16_resume 55 "stdbuf -oL -eL $PYTHON -m megatron_vlm.train --config examples/tiny_cpu.yaml \\
    data.root=$WORK/data training.output_dir=$WORK/runs/train_tiny_bf16 training.train_steps=30 \\
    training.log_interval=5 training.save_interval=10 precision.params_dtype=bfloat16 training.distributed_optimizer=true \\
    \$([[ -d $WORK/data/benchmarks ]] || echo training.benchmarks.interval=0) \\
    2>&1 | tee $OUTDIR/train_tiny_bf16_resume.out; rc=\${PIPESTATUS[0]}
grep -q 'resumed from .*iter_0000020 at step 20' $OUTDIR/train_tiny_bf16_resume.out || { echo 'did not resume from step 20'; rc=1; }
echo \"latest checkpoint: \$(cat $WORK/runs/train_tiny_bf16/checkpoints/latest 2>/dev/null || echo none)\"; exit \$rc"

# ---------------------------------------------------------------------------------------------
selected() { [[ -z $ONLY || ",$ONLY," == *",$1,"* ]]; }
if [[ -n $ONLY ]]; then
    for name in ${ONLY//,/ }; do
        [[ " ${NAMES[*]} " == *" $name "* ]] || { echo "gpu_check: no step '$name' (steps: ${NAMES[*]})" >&2; exit 2; }
    done
fi

if ((DRY_RUN)); then
    echo "gpu_check dry run: ${#NAMES[@]} steps, whole-run budget $BUDGET s (a step gets its own limit or what is left of the budget); output $OUTDIR"
    echo "environment: PYTHONPATH=$PYTHONPATH PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 HF_HUB_OFFLINE=1 NCCL_DEBUG=WARN TORCH_NCCL_ASYNC_ERROR_HANDLING=1"
    echo "each step's own: GPU_CHECK_STEP_LIMIT=its time limit in seconds (what it has after the budget)"
    echo "each step: timeout -s USR2 -k $KILL_AFTER LIMIT bash -c 'trap : USR2; COMMAND' > $OUTDIR/STEP.log 2>&1"
    for i in "${!NAMES[@]}"; do
        selected "${NAMES[i]}" || continue
        echo
        echo "[$((i + 1))/${#NAMES[@]}] ${NAMES[i]} (limit ${LIMITS[i]} s)"
        printf '%s\n' "${COMMANDS[i]}" | sed 's/^/    /'
    done
    total=0
    for limit in "${LIMITS[@]}"; do total=$((total + limit)); done
    echo
    echo "the steps' limits add up to $total s; the budget is $BUDGET s"
    dali="no (no DALI wheel in $WHEELS)"
    compgen -G "$WHEELS/nvidia_dali*.whl" >/dev/null && dali="yes ('mixed' decoding: the DALI test of pytest -m gpu)"
    compgen -G "$WHEELS/nvidia_dali*.whl.part-*" >/dev/null && dali="if its parts in $WHEELS are complete (checked by sha256 when joined)"
    echo "exercises: pytest -m gpu (trainer on one GPU in bf16 and torch FP8, generation, the varlen kernel, SigLIP"
    echo "  position ids, LoRA on local linears, conversion), the 8B-width proxy (bf16, FP8, torch.compile), the full"
    echo "  trainer (tiny bf16 scored on VQAv2 by generation, tiny torch FP8, small, a resume with the distributed optimizer)"
    echo "DALI: $dali"
    echo "does not exercise: Transformer Engine (transformer-engine-torch has no binary wheel: its tests skip, naming"
    echo "  the reason), NCCL across GPUs and pipeline stages on GPUs (one GPU), apex"
    echo "dry run: nothing was run"
    exit 0
fi

mkdir -p "$OUTDIR" "$WORK" || exit 2
[[ -z $PACK ]] || mkdir -p "$PACK" || exit 2
SUMMARY=$OUTDIR/summary.txt
pack() {  # everything in OUTDIR as one file (and the summary beside it), replaced atomically
    [[ -n $PACK ]] || return 0
    tar -czf "$PACK/gpu_check.tar.gz.partial" -C "$OUTDIR" . 2>/dev/null && mv -f "$PACK/gpu_check.tar.gz.partial" "$PACK/gpu_check.tar.gz"
    cp -f "$SUMMARY" "$PACK/summary.txt" 2>/dev/null
    return 0
}
note() { echo "$*" | tee -a "$SUMMARY"; }

note "# gpu_check $(date -u +%FT%TZ) on $(hostname 2>/dev/null || cat /proc/sys/kernel/hostname): budget ${BUDGET}s, work dir $WORK, $(git -C "$ROOT" log -1 --format='commit %h' 2>/dev/null || echo 'no git')"
ticker=""
if [[ -n $PACK ]]; then
    (while sleep 15; do pack; done) &
    ticker=$!
fi
running=""
on_signal() {  # the whole call is being stopped: dump the running step's stacks, keep what ran
    if [[ -n $running ]]; then
        kill -USR2 -- "-$running" 2>/dev/null
        sleep 2
        kill -KILL -- "-$running" 2>/dev/null
    fi
    note "# gpu_check interrupted by a signal during ${current:-?}"
    pack
    [[ -z $ticker ]] || kill "$ticker" 2>/dev/null
    rm -rf "$WORK"
    exit 143
}
trap on_signal TERM INT HUP

start=$(date +%s)
failed=()
current=""
for i in "${!NAMES[@]}"; do
    name=${NAMES[i]} limit=${LIMITS[i]} command=${COMMANDS[i]}
    selected "$name" || continue
    current=$name
    [[ -n $LIMIT_CAP ]] && ((limit > LIMIT_CAP)) && limit=$LIMIT_CAP
    left=$((BUDGET - ($(date +%s) - start)))
    if ((left < 15)); then
        note "$(printf '%-16s rc=%-4s %7.1fs limit=%ss NOT RUN (budget of %ss spent)' "$name" - 0 "$limit" "$BUDGET")"
        failed+=("$name")
        continue
    fi
    ((limit > left)) && limit=$left
    log=$OUTDIR/$name.log
    {
        echo "# gpu_check step $name, limit ${limit}s (then SIGUSR2: Python stacks; SIGKILL ${KILL_AFTER}s later), started $(date -u +%FT%TZ)"
        printf '%s\n' "$command" | sed 's/^/#   /'
    } >"$log"
    t0=$(date +%s.%N)
    # timeout puts itself and the step in a process group of their own; bash ignores the USR2
    # (trap :) so the step's Python processes, not the shell, answer it.
    GPU_CHECK_STEP_LIMIT=$limit timeout -s USR2 -k "$KILL_AFTER" "$limit" bash -c "trap : USR2; $command" >>"$log" 2>&1 </dev/null &
    running=$!
    { wait "$running"; } 2>/dev/null  # (quiet: timeout's SIGKILL reaches timeout itself too)
    rc=$?
    kill -KILL -- "-$running" 2>/dev/null  # anything the step left behind in its group
    running=""
    seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT (stacks dumped at the limit: see $name.log)" ;;
        *) status=FAILED ;;
    esac
    echo "# gpu_check: step $name ended with rc $rc after ${seconds}s: $status" >>"$log"
    note "$(printf '%-16s rc=%-4s %7.1fs limit=%ss %s' "$name" "$rc" "$seconds" "$limit" "$status")"
    ((rc == 0)) || failed+=("$name")
    pack
done
current=""

note "# gpu_check done in $(($(date +%s) - start))s: ${#failed[@]} step(s) not ok${failed[*]:+: ${failed[*]}}"
for name in "${failed[@]}"; do  # the end of each failed step's log, for whoever reads only stdout
    [[ -f $OUTDIR/$name.log ]] || continue
    echo
    echo "==== last lines of $name.log"
    tail -n 30 "$OUTDIR/$name.log" | cut -c 1-240
done
pack
[[ -z $ticker ]] || kill "$ticker" 2>/dev/null
rm -rf "$WORK"
((${#failed[@]} == 0))
