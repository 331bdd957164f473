#!/bin/sh
# Train the network of my_cnn.py from the command line: --model finds the factory as MODULE:FUNCTION, importable
# from the working directory.  Outputs go to a new runs/<date-time>/ folder here (its path is printed at the end).
#
#   sh examples/train_cli.sh                       # 6 ranks: 1 parameter server + 5 replicas, bundled FSDD
#   NP=4 sh examples/train_cli.sh --run-dir out    # more options are passed on to python -m asyncsgd.train
#   python examples/predict.py examples/out/model.h5
# The batch is given because more than 3 Downpour workers would otherwise halve the default one (32) while the rate
# given here stays 0.004: these options are the ones measured in docs/BENCHMARKS.md.
cd "$(dirname "$0")" || exit 1
exec "${MPIEXEC:-mpirun}" -n "${NP:-6}" "${PYTHON:-python}" -m asyncsgd.train --mode downpour \
    --model my_cnn:small_cnn --batch-size 32 --lr 0.004 --n-push 2 --staleness-decay exp:0.9 --seed 1 \
    --epochs 20 --target-accuracy 0.98 "$@"
