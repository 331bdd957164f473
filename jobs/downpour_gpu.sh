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
        srun) srun --mpi="${SRUN_MPI:-pmi2}" "$@" ;;
        mpirun) read -r -a MPIRUN_EXTRA <<< "${MPIRUN_ARGS:-}"
                "${MPIEXEC:-$("$PY" -c 'from asyncsgd.testing.launch import mpiexec_path; print(mpiexec_path())')}" \
                    -n "$SLURM_NTASKS" "${MPIRUN_EXTRA[@]}" "$@" ;;
        *) echo "LAUNCHER must be srun or mpirun, got '${LAUNCHER}'" >&2; exit 2 ;;
    esac
}

echo "asyncsgd downpour (gpu): job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}:" \
     "${SLURM_NTASKS:-?} tasks x ${SLURM_GPUS_PER_TASK:-?} gpu x ${THREADS} cpus," \
     "device ${ASYNCSGD_DEVICE:-gpu}, outputs in ${RUN_DIR}"
launch "$PY" -m asyncsgd.train --mode downpour --device "${ASYNCSGD_DEVICE:-gpu}" \
    --log "$RUN_DIR/metrics.jsonl" --summary-json "$RUN_DIR/summary.json" --model-out "$RUN_DIR/model.h5" \
    --checkpoint "$RUN_DIR/checkpoint.h5" "${EXTRA[@]}" "$@"
