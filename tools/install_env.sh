#!/usr/bin/env bash
# Create .venv/ at the repo root with the pinned CPU stack; idempotent (a stamp file records success).
# On a GPU cluster with Python >= 3.12 use `pip install -e .[gpu]` in your container instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.megatron_ec_installed
WANT=$(cat requirements.txt setup.py tools/install_env.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
echo "[install] creating $VENV (one time, about 2 minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip
# torch first: the CPU build on local disk; any other torch would pull GBs of CUDA packages.
$PIP install torch==2.13.0
$PIP install -r requirements.txt
# megatron-core 0.19.2 declares Python >= 3.12 but runs on 3.11; its cp311 wheel is on PyPI.
$PIP install --ignore-requires-python --no-deps megatron-core==0.19.2
$PIP install --no-deps -e .
# lm_eval --model megatron_ec: the harness's startup hook (setup.py ships it in wheels, but an
# editable install does not; megatron_ec/eval/lm_eval_plugin.py says why it is needed).
cp megatron_ec/eval/megatron_ec_lm_eval.pth "$($VENV/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
if $VENV/bin/python -c "import transformer_engine" 2>/dev/null; then
  echo "[install] transformer-engine is importable on this CPU box; it breaks megatron.core: uninstall it" >&2
  exit 1
fi
echo "$WANT" > "$STAMP"
echo "[install] done"
