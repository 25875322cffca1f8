#!/usr/bin/env bash
# Builds what bench/gpu_check.sh needs on a bare, offline GPU machine, so that a lent device
# takes one call: the pure-Python wheels it lacks (Hydra and its two dependencies; the
# versions this checkout's venv runs) in .whl/, and MNIST gzipped in .carry/MNIST/raw/.
# Both folders are git-ignored; name them in the device call's carry:
#
#   bash bench/gpu_prepare.sh [DATA_ROOT]     # DATA_ROOT holds MNIST/raw (../shared/data)
#   run: carry [".whl", ".carry"], command "bash bench/gpu_check.sh $OUT"
set -euo pipefail
DATA_ROOT=${1:-${AE_DATA_ROOT:-../shared/data}}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl
"$PY" -m pip wheel -q --no-deps -w .whl \
    "hydra-core==$(version hydra-core)" "omegaconf==$(version omegaconf)" \
    "antlr4-python3-runtime==$(version antlr4-python3-runtime)"

rm -rf .carry && mkdir -p .carry/MNIST/raw
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
    t10k-labels-idx1-ubyte; do
    gzip -c "$DATA_ROOT/MNIST/raw/$f" >".carry/MNIST/raw/$f.gz"
done
du -sh .whl .carry
