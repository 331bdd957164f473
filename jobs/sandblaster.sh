#!/bin/bash
# Sandblaster L-BFGS: every task holds a shard of the parameters and of the L-BFGS history and computes gradients
# of mini-shards it claims dynamically (backup copies of the last ones absorb stragglers); rank 0 coordinates.
#
#   sbatch jobs/sandblaster.sh                               # logistic regression on the bundled FSDD features
#   sbatch --ntasks=12 jobs/sandblaster.sh --model speech_cnn --max-iter 200
#
# Trainer options follow the script name or go in ASYNCSGD_ARGS.  Environment: ASYNCSGD_PYTHON (python3),
# ASYNCSGD_DEVICE (cpu), ASYNCSGD_RUN_DIR, LAUNCHER (srun | mpirun; MPIEXEC, MPIRUN_ARGS), SRUN_MPI (pmi2).
#SBATCH --job-name=asyncsgd-sandblaster
#SBATCH --ntasks=6
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
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

# Time limits (jobs/README.md, "Time limits and requeue"): Sandblaster writes no checkpoints, so SLURM's warning
# before the limit (--signal=B:USR1@60) only says so here, instead of ending this shell (USR1's default action);
# the run ends at the limit.  Give the job a --time its --max-iter fits in.
trap 'echo "asyncsgd: SIGUSR1 received (time limit near): sandblaster writes no checkpoints; it runs on" >&2' USR1

echo "asyncsgd sandblaster: job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}:" \
     "${SLURM_NTASKS:-?} tasks x ${THREADS} cpus, outputs in ${RUN_DIR}"
launch "$PY" -m asyncsgd.train --mode sandblaster --model logreg --device "${ASYNCSGD_DEVICE:-cpu}" \
    --log "$RUN_DIR/metrics.jsonl" --summary-json "$RUN_DIR/summary.json" --model-out "$RUN_DIR/model.h5" \
    "${EXTRA[@]}" "$@"
