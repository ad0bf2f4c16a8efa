#!/usr/bin/env bash
# Idefics2 pretraining on Megatron-Core: `sbatch slurm/pretrain_idefics2.sh` on a Slurm cluster,
# `bash slurm/pretrain_idefics2.sh` anywhere else (same job, launched locally with torchrun).
#
#SBATCH --job-name=idefics2-pretrain
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=runs/slurm/%x-%j.out
#
# Settings (environment variables, all optional):
#   CONFIG      run config (default: examples/tiny_cpu.yaml; the 8B presets are
#               examples/idefics2_8b_stage1.yaml, examples/idefics2_8b_stage2.yaml and, for instruction
#               fine-tuning, examples/idefics2_8b_sft.yaml; examples/tiny_cpu_sft.yaml fine-tunes the
#               tiny default's checkpoint on the bundled conversations)
#   OVERRIDES   config overrides, e.g. "training.lr=1e-4 parallel.tensor_parallel=8"
#   RUN_DIR     checkpoints/, tensorboard/ and logs (default: runs/<job name>, or locally the config's
#               training.output_dir, runs/tiny for the default);
#               a requeued or resubmitted job with the same RUN_DIR resumes from its latest checkpoint
#   DATA_ROOT   directory of the mixture's shard directories (default: the config's data.root;
#               locally with the default config, the bundled dataset is built into runs/data)
#   NPROC       local runs only: processes to start (default 1)
#   MASTER_PORT rendezvous port (default: derived from the job id)
# TP/PP come from the config (parallel.*); DP = tasks / (TP x PP). The trainer refuses impossible
# layouts and batch sizes before allocating anything, naming the fix.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

CONFIG=${CONFIG:-examples/tiny_cpu.yaml}
if ! command -v nvidia-smi >/dev/null 2>&1; then
    # CPU runs: glibc hands freed tensors back to the OS at once instead of keeping them in its
    # heap, so resident memory follows the live tensors (what the memory model predicts).
    export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-65536}
fi
read -r -a overrides <<< "${OVERRIDES:-}"

build_bundled_data() {  # the tiny default trains on the dataset that ships in examples/data
    local root=$1
    for name in interleaved pairs pages conversations; do
        # Built once; again when it predates held-out validation shards (an older runs/data).
        if [[ ! -f "$root/$name/$name.report.json" ]] || ! compgen -G "$root/$name/validation/*.tar" >/dev/null; then
            # seed 7 holds out one sample of each bundled source (a quarter of 4-5 samples)
            python tools/preprocess_data.py "examples/data/$name.jsonl" --out "$root/$name" --samples-per-shard 4 \
                --validation-fraction 0.25 --validation-seed 7
        fi
    done
    # The tiny benchmark sets (real photos, both download layouts) the run is scored on.
    [[ -f "$root/benchmarks/vqav2/release/v2_mscoco_val2014_annotations.json" ]] || python examples/benchmarks/build.py "$root/benchmarks"
}

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    # ---- local: torchrun on this machine (CPU + gloo without a GPU)
    RUN_DIR=${RUN_DIR:-$(python -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["training"]["output_dir"])' "$CONFIG" 2>/dev/null || echo runs/tiny)}
    if [[ "$CONFIG" == examples/tiny_cpu*.yaml && -z "${DATA_ROOT:-}" ]]; then
        DATA_ROOT=runs/data
        build_bundled_data "$DATA_ROOT"
    fi
    exec python -m torch.distributed.run --standalone --nproc_per_node="${NPROC:-1}" \
        -m megatron_vlm.train --config "$CONFIG" training.output_dir="$RUN_DIR" \
        ${DATA_ROOT:+data.root="$DATA_ROOT"} "${overrides[@]}"
fi

# ---- Slurm: one srun launch, one task per GPU (or per CPU slot on CPU nodes)
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}}
mkdir -p "$RUN_DIR/logs" runs/slurm
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export CUDA_DEVICE_MAX_CONNECTIONS=1           # Megatron: keep TP communication ordered with compute
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
if [[ "$CONFIG" == examples/tiny_cpu*.yaml && -z "${DATA_ROOT:-}" ]]; then
    DATA_ROOT=runs/data
    build_bundled_data "$DATA_ROOT"
fi
echo "job $SLURM_JOB_ID: $SLURM_NTASKS tasks on $SLURM_JOB_NUM_NODES node(s), master $MASTER_ADDR:$MASTER_PORT, config $CONFIG, run dir $RUN_DIR"

# Time limit: Slurm sends USR1 to this script 5 minutes before (--signal=B:USR1@300); srun passes
# it to the trainers, which write a checkpoint and exit; the job is requeued and resumes from it.
# Preemption or `scancel --signal=TERM`: the trainers get SIGTERM themselves and do the same.
requeue() {
    echo "$(date) signal received: checkpointing and requeueing"
    kill -USR1 "$srun_pid" 2>/dev/null || true
    wait "$srun_pid" || true
    scontrol requeue "$SLURM_JOB_ID" || true
    exit 0
}
trap requeue USR1
# A preemption or a plain scancel sends SIGTERM to this script as well as to the trainers: wait, so
# that srun (which dies with this script, below) lives until the trainers' checkpoint is written.
# Not SIGTERM to srun: srun answers that by SIGKILLing its tasks ("forcing job termination"), which
# cut every preemption checkpoint short (tests/test_slurm.py). USR1, which srun passes on, asks the
# trainers to checkpoint and exit too, for a SIGTERM that reached this script alone.
terminate() {
    echo "$(date) SIGTERM received: the trainers checkpoint and exit"
    kill -USR1 "$srun_pid" 2>/dev/null || true
    wait "$srun_pid" || true
    exit 143
}
trap terminate TERM

# The trainers die with this script: a SIGKILLed batch script (the OOM killer, a lost node) otherwise
# leaves srun and its trainers running until Slurm's job teardown, which SIGTERMs them and SIGKILLs
# them KillWait later. srun gets SIGTERM when this script dies, and answers it by SIGKILLing its
# tasks on every node at once; their helpers die with them (training/lifecycle.py). If that is too
# late (Slurm's teardown already began) or srun itself was killed, the trainers see the teardown's
# SIGTERM, learn from Slurm that this script has ended and exit instead of checkpointing.
die_with_script=()
if command -v setpriv >/dev/null 2>&1 && setpriv --help 2>&1 | grep -q -- --pdeathsig; then
    die_with_script=(setpriv --pdeathsig TERM --)
fi
rm -f "$RUN_DIR/peer_lost.json"  # left by an earlier job: this one's is what counts
"${die_with_script[@]}" srun --kill-on-bad-exit=1 --output="$RUN_DIR/logs/%j-%t.log" \
    python -m megatron_vlm.train --config "$CONFIG" training.output_dir="$RUN_DIR" \
    ${DATA_ROOT:+data.root="$DATA_ROOT"} "${overrides[@]}" &
srun_pid=$!
rc=0
wait "$srun_pid" || rc=$?  # (set -e would end the script here)
# A trainer whose peer stopped answering for longer than training.collective_timeout_s exits with 75
# (EX_TEMPFAIL: megatron_vlm/distributed.py names the rank and host) and leaves peer_lost.json (srun
# reports the silent peer's SIGKILL, not the 75): back to the queue, to resume from the latest
# checkpoint, on other nodes if need be (a checkpoint resumes at any layout).
if ((rc == 75)) || [[ -f $RUN_DIR/peer_lost.json ]]; then
    echo "$(date) a rank stopped answering (exit 75, see the task logs): requeueing"
    mv -f "$RUN_DIR/peer_lost.json" "$RUN_DIR/logs/peer_lost.${SLURM_JOB_ID}.json" 2>/dev/null || true
    scontrol requeue "$SLURM_JOB_ID" || true
fi
exit "$rc"
