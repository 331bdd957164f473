#!/usr/bin/env bash
# Download the wheels that benchmarks/device_check.sh installs on a lent accelerator machine, which has no network.
#
#     bash benchmarks/fetch_device_wheels.sh [DEST] [PYTHON_VERSION]      # defaults: .whl 3.12
#
# That machine has Python 3.12, numpy and CuPy (docs/DEVICE.md); everything else asyncsgd's GPU check needs
# travels as cp312 manylinux x86_64 wheels in DEST (.whl, git-ignored: never commit wheels), each pinned to the
# version this repository is tested with, with every dependency except numpy (the machine's own numpy, which CuPy
# is built against, must not be replaced).  An existing DEST is emptied of other wheels first, because two versions
# of one package stop the install there.  PYTHON_VERSION=3.11 fetches the same set for a rehearsal of the install on
# this machine.  Needs pip and the network; about 25 MiB.
set -euo pipefail

DEST=${1:-.whl}
PYVER=${2:-3.12}
PYTHON=${PYTHON:-python3}

# The packages and their dependencies (pytest's and h5py's, numpy excepted), one version each.
WHEELS=(
    mpi4py==4.1.2 mpich==5.0.2 h5py==3.16.0
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0
    pytest-mpi==0.6 pytest-timeout==2.4.0
)

# pip matches a manylinux tag exactly, so name every glibc level a wheel of these may carry (the machine has 2.39).
PLATFORMS=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
for n in $(seq 5 39); do
    PLATFORMS+=(--platform "manylinux_2_${n}_x86_64")
done

mkdir -p "$DEST"
find "$DEST" -maxdepth 1 -name '*.whl' -delete
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"
du -sh "$DEST"
