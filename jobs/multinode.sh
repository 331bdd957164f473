#!/bin/bash
# Downpour SGD over several nodes: one parameter-server rank per node, so the parameter shards (and their network
# traffic) spread over the nodes; every other task is a model replica.  Tasks are placed round-robin over the nodes
# (--distribution=cyclic), which puts ranks 0..nodes-1 -- the servers -- on different nodes.
#
#   sbatch jobs/multinode.sh                                 # 2 nodes x 6 tasks: 2 servers + 10 workers
#   sbatch --nodes=4 --ntasks-per-node=4 jobs/multinode.sh --sparsity 0.01
#   ASYNCSGD_DEVICE=gpu sbatch --gpus-per-task=1 jobs/multinode.sh
#
# ASYNCSGD_RUN_DIR must be on a file system every node sees (rank 0 writes; all ranks read the data).
# Trainer options follow the script name or go in ASYNCSGD_ARGS.  Environment: ASYNCSGD_PYTHON (python3),
# ASYNCSGD_DEVICE (cpu), ASYNCSGD_SERVERS (one per node), ASYNCSGD_RUN_DIR,
# LAUNCHER (srun | mpirun; MPIEXEC, MPIRUN_ARGS), SRUN_MPI (pmi2).
#SBATCH --job-name=asyncsgd-multinode
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=6
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
set -euo pipefail

PY="${ASYNCSGD_PYTHON:-python3}"
THREADS="${SLURM_CPUS_PER_TASK:-1}"
export OMP_NUM_THREADS="$THREADS" OPENBLAS_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
NODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
SERVERS="${ASYNCSGD_SERVERS:-$NODES}"
RUN_DIR="${ASYNCSGD_RUN_DIR:-runs/slurm-${SLURM_JOB_ID:-local}}"
mkdir -p "$RUN_DIR"
read -r -a EXTRA <<< "${ASYNCSGD_ARGS:-}"

# Each script is self-contained on purpose: sbatch runs a copy from its spool folder, where no sibling file
# could be sourced.
launch() {
    case "${LAUNCHER:-srun}" in
        srun) srun --mpi="${SRUN_MPI:-pmi2}" --distribution=cyclic "$@" ;;
        mpirun) read -r -a MPIRUN_EXTRA <<< "${MPIRUN_ARGS:-}"
                "${MPIEXEC:-$("$PY" -c 'from asyncsgd.testing.launch import mpiexec_path; print(mpiexec_path())')}" \
                    -n "$SLURM_NTASKS" "${MPIRUN_EXTRA[@]}" "$@" ;;
        *) echo "LAUNCHER must be srun or mpirun, got '${LAUNCHER}'" >&2; exit 2 ;;
    esac
}

echo "asyncsgd downpour (multi-node):" \
     "job ${SLURM_JOB_ID:-?} on ${NODES} node(s) ${SLURM_JOB_NODELIST:-?}:" \
     "${SLURM_NTASKS:-?} tasks x ${THREADS} cpus, ${SERVERS} server rank(s), outputs in ${RUN_DIR}"
launch "$PY" -m asyncsgd.train --mode downpour --servers "$SERVERS" --device "${ASYNCSGD_DEVICE:-cpu}" \
    --log "$RUN_DIR/metrics.jsonl" --summary-json "$RUN_DIR/summary.json" --model-out "$RUN_DIR/model.h5" \
    --checkpoint "$RUN_DIR/checkpoint.h5" "${EXTRA[@]}" "$@"
