#!/bin/bash
# Downpour SGD with one GPU per task on one node: 1 parameter-server rank + (tasks - 1) GPU replicas
# (the paper's setup: 5 GPU workers).  Each rank binds the GPU SLURM gives it (CUDA_VISIBLE_DEVICES).
#
#   sbatch jobs/downpour_gpu.sh
#   sbatch --ntasks=5 jobs/downpour_gpu.sh --sparsity 0.01 --staleness-decay exp:0.9
#   ASYNCSGD_DEVICE=auto sbatch jobs/downpour_gpu.sh      # fall back to CPU where no GPU is visible (tests)
#
# Trainer options follow the script name or go in ASYNCSGD_ARGS.  Environment: ASYNCSGD_PYTHON (python3, with
# asyncsgd[gpu]), ASYNCSGD_DEVICE (gpu), ASYNCSGD_RUN_DIR, LAUNCHER (srun | mpirun; MPIEXEC, MPIRUN_ARGS),
# SRUN_MPI (pmi2).
#SBATCH --job-name=asyncsgd-downpour-gpu
#SBATCH --nodes=1
#SBATCH --ntasks=6
#SBATCH --cpus-per-task=2
#SBATCH --gpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
set -euo pipefail

PY="${ASYNCSGD_PYTHON:-python3}"
THREADS="${SLURM_CPUS_PER_TASK:-1}"
export OMP_NUM_THREADS="$THREADS" OPENBLAS_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
RUN_DIR="${ASYNCSGD_RUN_DIR:-runs/slurm-${SLURM_JOB_ID:-local}}"
mkdir -p "$RUN_DIR"
read -r -a EXTRA <<< "${ASYNCSGD_ARGS:-}"

# Each script is self-contained on purpose: sbatch runs a copy from its spool folder, where no sibling file
# could be sourced.
launch() {
    case "${LAUNCHER:-srun}" in
        srun) srun --mpi="${SRUN_MPI:-pmi2}" --kill-on-bad-exit=1 "$@" ;;
        mpirun) read -r -a MPIRUN_EXTRA <<< "${MPIRUN_ARGS:-}"
                "${MPIEXEC:-$("$PY" -c 'from asyncsgd.testing.launch import mpiexec_path; print(mpiexec_path())')}" \
                    -n "$SLURM_NTASKS" "${MPIRUN_EXTRA[@]}" "$@" ;;
        *) echo "LAUNCHER must be srun or mpirun, got '${LAUNCHER}'" >&2; exit 2 ;;
    esac
}

# Time limits (jobs/README.md, "Time limits and requeue").  SLURM's warning before the limit (--signal=B:USR1@60,
# sent to this shell only) or a SIGTERM to this shell (scancel, preemption) creates the stop file; rank 0 sees it,
# every worker ends its step, rank 0 writes the checkpoint and the trainer exits 0 with "stop_reason": "preempted"
# in the summary.  After the warning the job requeues itself (same job id, same run folder) and the next run
# continues from the checkpoint (--resume auto), its epoch budget counted across the jobs; after a SIGTERM it only
# stops (submit again with the same ASYNCSGD_RUN_DIR to continue).  The trainer runs in the background so that the
# traps run at once (bash defers them while a foreground command runs).
STOP_FILE="$RUN_DIR/stop-request"
rm -f "$STOP_FILE"
STARTED="$RUN_DIR/.launched"  # a summary older than this was not written by this job
: > "$STARTED"
STOP_SIGNAL=""
stop_training() {
    STOP_SIGNAL="$1"
    : > "$STOP_FILE"
    echo "asyncsgd: SIG$1 received: the trainer stops at its next step and writes the checkpoint" >&2
}
trap 'stop_training USR1' USR1
trap 'stop_training TERM' TERM
# Wait for the trainer: a trap interrupts `wait`, which is then called again; return the trainer's exit status.
wait_trainer() {
    local status=0
    while :; do
        wait "$1" && status=0 || status=$?
        kill -0 "$1" 2>/dev/null || return "$status"  # ended, not only interrupted by a trap
    done
}
# Requeue after a warned stop that made progress (so a job warned at its start cannot requeue forever).
requeue_if_preempted() {
    [ "$STOP_SIGNAL" = USR1 ] || return 0
    "$PY" -c 'import json, sys; s = json.load(open(sys.argv[1])); sys.exit(0 if s.get("stop_reason") == "preempted"
and s.get("samples", 0) > s.get("resumed_samples", 0) else 1)' "$RUN_DIR/summary.json" 2>/dev/null || return 0
    echo "asyncsgd: checkpoint $RUN_DIR/checkpoint.h5 written before the time limit; requeueing job" \
         "${SLURM_JOB_ID:-?} to continue from it (--resume auto)"
    scontrol requeue "${SLURM_JOB_ID}" || echo "asyncsgd: scontrol requeue failed: submit the job again with" \
         "ASYNCSGD_RUN_DIR=$RUN_DIR to continue" >&2
}

echo "asyncsgd downpour (gpu): job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}:" \
     "${SLURM_NTASKS:-?} tasks x ${SLURM_GPUS_PER_TASK:-?} gpu x ${THREADS} cpus," \
     "device ${ASYNCSGD_DEVICE:-gpu}, outputs in ${RUN_DIR}"
( trap : TERM  # a SIGTERM to the whole batch step (scancel) does not end the launcher: the ranks get their own
  launch "$PY" -m asyncsgd.train --mode downpour --device "${ASYNCSGD_DEVICE:-gpu}" \
      --log "$RUN_DIR/metrics.jsonl" --summary-json "$RUN_DIR/summary.json" --model-out "$RUN_DIR/model.h5" \
      --checkpoint "$RUN_DIR/checkpoint.h5" --resume auto --stop-file "$STOP_FILE" "${EXTRA[@]}" "$@" ) &
STATUS=0
wait_trainer $! || STATUS=$?
rm -f "$STOP_FILE"
# Open MPI's mpirun was seen to exit 0 after a node's daemon died or a rank aborted: without a summary from this job,
# the run did not finish, whatever the launcher said.
if [ "$STATUS" -eq 0 ] && [ ! "$RUN_DIR/summary.json" -nt "$STARTED" ]; then
    echo "asyncsgd: the launcher exited 0 but the trainer wrote no $RUN_DIR/summary.json: the run did not finish" >&2
    STATUS=1
fi
rm -f "$STARTED"
[ "$STATUS" -ne 0 ] || requeue_if_preempted
exit "$STATUS"
