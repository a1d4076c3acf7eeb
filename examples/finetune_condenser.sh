#!/usr/bin/env bash
# ExpertCondenser fine-tuning end to end: import -> phase 1 (bias) -> phase 2 (condensers) -> export
# (-> held-out eval when the recipe names a held-out file).
#
#   bash examples/finetune_condenser.sh [dotted.key=value ...]       # the demo, on this CPU
#   RECIPE=examples/recipes/qwen1.5_moe_a2.7b.yaml NPROC_PER_NODE=8 bash examples/finetune_condenser.sh
#   # several nodes: run on every node with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set
#
# Environment: RECIPE (default examples/recipes/demo.yaml), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), NPROC_PER_NODE (GPUs on this node, else 2),
# PYTHON (.venv/bin/python if present, else python3). Arguments are config overrides for every
# phase (e.g. train.max_steps=20, phases.condenser.method.gamma=1e-4).
# Every step is skipped or resumed when its output exists, so re-running continues a stopped run.
# Paths come from the recipe (`python -m megatron_ec.recipe --print-paths`); all steps except
# the two torchrun launches run on node 0 only (a shared filesystem is assumed).
set -euo pipefail
cd "$(dirname "$0")/.."

RECIPE=${RECIPE:-examples/recipes/demo.yaml}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export TORCH_COMPILE_DISABLE=${TORCH_COMPILE_DISABLE:-1} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')}
if [ "$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')" = 0 ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

say() { echo "[finetune_condenser] $*" >&2; }
on_node0() { [ "$NODE_RANK" = 0 ]; }
torchrun_all() {
  "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --nproc_per_node "$NPROC_PER_NODE" "$@"
}

eval "$("$PYTHON" -m megatron_ec.recipe --config "$RECIPE" --print-paths "$@")"
say "recipe $RECIPE on $NNODES node(s) x $NPROC_PER_NODE rank(s)"
began=$SECONDS

# 0. The demo's own inputs: generated arithmetic problems and a tiny random Qwen2-MoE.
if [ -n "$DEMO" ] && on_node0; then
  [ -f "$TRAIN_DATA" ] ||
    "$PYTHON" tools/make_demo_data.py --out "$DEMO_DATA_DIR" --num-train "$DEMO_NUM_TRAIN" >/dev/null
  if [ ! -f "$HF_MODEL/config.json" ]; then
    say "making the tiny model $HF_MODEL"
    "$PYTHON" tools/make_tiny_model.py --out "$HF_MODEL" --corpus "$TRAIN_DATA" >/dev/null 2>&1
  fi
fi

# 1. Import the HF model once, at the recipe's TP/EP layout (each rank reads only its slices).
if [ ! -f "$IMPORT_CKPT/latest" ]; then
  [ -n "$HF_MODEL" ] || { say "no checkpoint at $IMPORT_CKPT and no pipeline.hf_model to import"; exit 2; }
  say "import $HF_MODEL -> $IMPORT_CKPT"
  torchrun_all -m checkpoint_convert import --hf "$HF_MODEL" --out "$IMPORT_CKPT" --tp "$TP" --ep "$EP"
fi

# 2. Check every phase on one process (config, data, layout: one-line errors), then train them
#    all in one torchrun launch; finished phases are skipped, interrupted ones resume.
if on_node0; then
  "$PYTHON" -m megatron_ec.recipe --config "$RECIPE" --check --world-size $((NNODES * NPROC_PER_NODE)) "$@"
fi
say "training phases: $PHASE_DIRS"
torchrun_all -m megatron_ec.recipe --config "$RECIPE" "$@"

# 3. Export the last phase (HF weights + routing side file) and evaluate.
if [ -n "$EXPORT_DIR" ] && on_node0; then
  say "export $FINAL_CKPT -> $EXPORT_DIR"
  "$PYTHON" -m checkpoint_convert export --ckpt "$FINAL_CKPT" --out "$EXPORT_DIR" --overwrite
  if [ -n "$EVAL_HELDOUT" ]; then
    metrics=()
    for dir in $PHASE_DIRS; do metrics+=("$dir/metrics.jsonl"); done
    "$PYTHON" -m megatron_ec.eval.demo_eval --hf "$EXPORT_DIR" ${HF_MODEL:+--base "$HF_MODEL"} \
      --heldout "$EVAL_HELDOUT" --max-samples "$EVAL_MAX_SAMPLES" \
      --max-new-tokens "$EVAL_MAX_NEW_TOKENS" --metrics "${metrics[@]}" \
      --json "$(dirname "$EXPORT_DIR")/eval.json"
  fi
fi
say "done in $((SECONDS - began)) s"
