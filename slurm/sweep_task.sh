#!/usr/bin/env bash
# One run of a scaling sweep: a task of a Slurm job array submitted by tools/sweep.py. Reads line
# SLURM_ARRAY_TASK_ID + 1 of $SWEEP_TASKS ("run name<TAB>overrides") and runs
# slurm/pretrain_idefics2.sh with those overrides in $SWEEP_DIR/runs/<run name>, whose trainer
# writes results.json there (tools/analyze_scaling.py collects them).
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
: "${SWEEP_TASKS:?set by tools/sweep.py}" "${SWEEP_DIR:?set by tools/sweep.py}" "${SLURM_ARRAY_TASK_ID:?run as a job array task}"
line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$SWEEP_TASKS")
if [[ -z "$line" ]]; then
    echo "no line $((SLURM_ARRAY_TASK_ID + 1)) in $SWEEP_TASKS" >&2
    exit 2
fi
IFS=$'\t' read -r name overrides <<< "$line"
export RUN_DIR="$SWEEP_DIR/runs/$name" OVERRIDES="$overrides"
echo "sweep run $name (array job ${SLURM_ARRAY_JOB_ID:-?} task $SLURM_ARRAY_TASK_ID): $overrides"
exec bash slurm/pretrain_idefics2.sh
