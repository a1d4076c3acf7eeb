#!/usr/bin/env bash
# The whole job once on one GPU (issue 14), as one JSON: tools/gpu_check.py says what it runs.
#
#   bash tools/gpu_check.sh --fetch         # here, with the package registry: the cp312 wheels the
#                                           # GPU image lacks (megatron-core) into .whl/ (git-ignored)
#   bash tools/gpu_check.sh [--out DIR]     # there (Python 3.12, torch with CUDA, no network):
#                                           # installs .whl/*.whl into /tmp/site, then runs the check
#   bash tools/gpu_check.sh --cpu           # here: the same stages in fp32 on the CPU
#
# Through the device tool: run(command="bash tools/gpu_check.sh --copy-to $OUT", carry=[".whl"],
# timeout_s=540). Transformer Engine is not carried (its wheel is ~276 MB): the check uses the
# local backend on CUDA. Everything else it needs is in the GPU image (KINDS.md's package list).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(megatron-core==0.19.2)
PY=${PYTHON:-python3}

if [ "${1:-}" = --fetch ]; then
  mkdir -p .whl
  exec "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
fi

export TORCH_COMPILE_DISABLE=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export TRANSFORMERS_NO_ADVISORY_WARNINGS=1
if [ "${1:-}" = --cpu ]; then
  PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
elif ! "$PY" -c "import megatron.core" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "[gpu_check] megatron.core is not importable and .whl/ holds no wheels: run" \
      "'bash tools/gpu_check.sh --fetch' on a machine with the package registry, carry .whl" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHON="$PY"
exec "$PY" tools/gpu_check.py "$@"
