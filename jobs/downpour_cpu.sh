#!/bin/bash
# Downpour SGD on CPU ranks of one node: 1 parameter-server rank + (tasks - 1) model replicas.
#
#   sbatch jobs/downpour_cpu.sh                                  # 6 tasks: 1 server + 5 workers, bundled FSDD data
#   sbatch --ntasks=11 jobs/downpour_cpu.sh --servers 2 --epochs 20
#   ASYNCSGD_PYTHON=$PWD/.venv/bin/python sbatch jobs/downpour_cpu.sh --sparsity 0.01
#   LAUNCHER=mpirun MPIRUN_ARGS="--with-ft ulfm" sbatch jobs/downpour_cpu.sh   # Open MPI: run through a dead worker
#
# Every size comes from SLURM (override with sbatch options); trainer options follow the script name or go in
# ASYNCSGD_ARGS.  Environment: ASYNCSGD_PYTHON (python3), ASYNCSGD_RUN_DIR (runs/slurm-<jobid>),
# LAUNCHER (srun | mpirun; MPIEXEC, MPIRUN_ARGS), SRUN_MPI (pmi2; pmix for Open MPI).  See jobs/README.md.
#SBATCH --job-name=asyncsgd-downpour
#SBATCH --nodes=1
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
        srun) srun --mpi="${SRUN_MPI:-pmi2}" "$@" ;;
        mpirun) read -r -a MPIRUN_EXTRA <<< "${MPIRUN_ARGS:-}"
                "${MPIEXEC:-$("$PY" -c 'from asyncsgd.testing.launch import mpiexec_path; print(mpiexec_path())')}" \
                    -n "$SLURM_NTASKS" "${MPIRUN_EXTRA[@]}" "$@" ;;
        *) echo "LAUNCHER must be srun or mpirun, got '${LAUNCHER}'" >&2; exit 2 ;;
    esac
}

echo "asyncsgd downpour (cpu): job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}:" \
     "${SLURM_NTASKS:-?} tasks x ${THREADS} cpus, launcher ${LAUNCHER:-srun}, outputs in ${RUN_DIR}"
launch "$PY" -m asyncsgd.train --mode downpour --device cpu \
    --log "$RUN_DIR/metrics.jsonl" --summary-json "$RUN_DIR/summary.json" --model-out "$RUN_DIR/model.h5" \
    --checkpoint "$RUN_DIR/checkpoint.h5" "${EXTRA[@]}" "$@"
