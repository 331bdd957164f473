#!/usr/bin/env bash
# asyncsgd's checks on a lent GPU machine, in one run of under 8 minutes (docs/DEVICE.md says how to call it):
#
#     bash benchmarks/device_check.sh OUT [--cpu-dry-run] [--steps a,b] [--timeout STEP=S] [--budget S]
#
# Installs the wheels carried in .whl/ (benchmarks/fetch_device_wheels.sh), then runs the GPU kernel tests, a GPU
# Downpour run, benchmarks/bench_gpu.py and the CPU scaling benchmarks, each with its own timeout, and writes
# OUT/summary.json, OUT/summary.md, OUT/logs/ and OUT/logs.tar.gz.  The steps are in benchmarks/device_check.py;
# this wrapper only picks the Python (PYTHON, else python3: on the lent machine the one that has CuPy) and puts a
# hard limit on the whole (DEVICE_CHECK_LIMIT seconds, default 470), in case a step's own timeout failed.
set -uo pipefail
HERE=$(dirname "$0")
PYTHON=${PYTHON:-python3}
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash benchmarks/device_check.sh OUT [--cpu-dry-run] [--steps a,b] [--timeout STEP=S]" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1
exec timeout --kill-after=5 "${DEVICE_CHECK_LIMIT:-470}" "$PYTHON" "$HERE/device_check.py" "$@"
