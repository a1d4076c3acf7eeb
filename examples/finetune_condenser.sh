#!/usr/bin/env bash
# ExpertCondenser fine-tuning end to end: [demo inputs] -> check -> import -> phase 1 (bias) ->
# phase 2 (condensers) -> export (-> held-out eval when the recipe names a held-out file).
#
#   bash examples/finetune_condenser.sh [dotted.key=value ...]       # the demo, on this CPU
#   bash examples/finetune_condenser.sh --list-keys                  # every key an override may set
#   RECIPE=examples/recipes/qwen1.5_moe_a2.7b.yaml NPROC_PER_NODE=8 bash examples/finetune_condenser.sh
#   # several nodes: run it on every node with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set
#   # (README.md, "Several nodes": Slurm)
#
# Environment: RECIPE (default examples/recipes/demo.yaml), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), NPROC_PER_NODE (GPUs on this node, else 2),
# PYTHON (.venv/bin/python if present, else python3), RDZV_TIMEOUT (900: seconds a node waits for
# the others at each torchrun launch), COLLECTIVE_TIMEOUT (600: seconds a collective waits for a
# peer). Arguments are overrides of any recipe key: every phase's sections (train.max_steps=20),
# one phase's (phases.condenser.method.gamma=1e-4) and the pipeline's (pipeline.export_dir=DIR).
#
# Steps; the first that fails stops the launcher with its one-line error and its exit status
# (2 for a user error), and nothing after it runs:
#   1. (all nodes) resolve the recipe's paths (`python -m megatron_ec.recipe --print-paths`);
#   2. (node 0) the demo's inputs when pipeline.demo is set;
#   3. (node 0) check every input on one process before any torchrun launch: the recipe, the HF
#      directory when the import is still to do (config.json, family, TP/EP split, weight names),
#      the data (tokenised with the model's tokenizer), the layout against NNODES x NPROC_PER_NODE;
#   4. (all nodes) import the HF model at the recipe's TP/EP (skipped when imported);
#   5. (all nodes) every phase in one torchrun launch (finished phases skipped, interrupted resumed);
#   6. (node 0) export the last phase of the main chain and each baseline phase
#      (pipeline.baselines); 7. (node 0) held-out evaluation of all of them, side by side;
#   8. (node 0) the analyses (pipeline.analysis_dir): `python -m megatron_ec.analyze demo`.
# torchrun runs through `megatron_ec.torchrun`: a worker's user error ends the launch with status 2
# and no torchrun traceback. Nodes other than 0 go straight to the rendezvous of step 4 or 5; if
# node 0 stops at a failed check they exit after RDZV_TIMEOUT seconds with one line (status 3).
# A shared filesystem is assumed: every node sees the same paths (recipe, data, checkpoints).
# Every step is skipped or resumed when its output exists, so re-running continues a stopped run.
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
RDZV_TIMEOUT=${RDZV_TIMEOUT:-900}
export MEGATRON_EC_RDZV_TIMEOUT=$RDZV_TIMEOUT MEGATRON_EC_COLLECTIVE_TIMEOUT=${COLLECTIVE_TIMEOUT:-600}

say() { echo "[finetune_condenser] $*" >&2; }
on_node0() { [ "$NODE_RANK" = 0 ]; }
# run one step; on failure stop here with its exit status (the step printed its own error)
step() {
  local name=$1 rc=0
  shift
  "$@" || rc=$?
  if [ "$rc" != 0 ]; then say "stopped: $name failed (exit status $rc)"; exit "$rc"; fi
}
torchrun_all() {
  "$PYTHON" -m megatron_ec.torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_conf "timeout=$RDZV_TIMEOUT" "$@"
}

if [ "${1:-}" = --list-keys ]; then
  exec "$PYTHON" -m megatron_ec.recipe --config "$RECIPE" --list-keys
fi

# this node: GPUs (NPROC_PER_NODE defaults to them, else 2 CPU ranks); CUDA_VISIBLE_DEVICES=""
# means none (and saves a Python start)
if [ "${CUDA_VISIBLE_DEVICES-unset}" = "" ]; then
  gpus=0
else
  gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
fi
NPROC_PER_NODE=${NPROC_PER_NODE:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 2)}
if [ "$gpus" = 0 ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
WORLD=$((NNODES * NPROC_PER_NODE))

# 1. The recipe's paths (an unknown or mistyped override stops here, on every node).
paths=$("$PYTHON" -m megatron_ec.recipe --config "$RECIPE" --print-paths "$@") || exit $?
eval "$paths"
say "recipe $RECIPE on $NNODES node(s) x $NPROC_PER_NODE rank(s), node $NODE_RANK"
began=$SECONDS
need_import=$([ -f "$IMPORT_CKPT/latest" ] || echo 1)

if on_node0; then
  # 2. The demo's own inputs: generated arithmetic problems and a tiny random Qwen2-MoE.
  if [ -n "$DEMO" ]; then
    [ -f "$TRAIN_DATA" ] || step "demo data" \
      "$PYTHON" tools/make_demo_data.py --out "$DEMO_DATA_DIR" --num-train "$DEMO_NUM_TRAIN" >/dev/null
    if [ -n "$need_import" ] && [ ! -f "$HF_MODEL/config.json" ]; then
      say "making the tiny model $HF_MODEL"
      step "tiny model" "$PYTHON" tools/make_tiny_model.py --out "$HF_MODEL" --corpus "$TRAIN_DATA" >/dev/null
    fi
  fi
  # 3. Every input, on one process, before any torchrun launch.
  if [ -n "$need_import" ] && [ -z "$HF_MODEL" ]; then
    say "no checkpoint at $IMPORT_CKPT and no pipeline.hf_model to import"; exit 2
  fi
  step "check" "$PYTHON" -m megatron_ec.recipe --config "$RECIPE" --check --world-size "$WORLD" \
    ${need_import:+--hf "$HF_MODEL"} "$@"
fi

# 4. Import the HF model once, at the recipe's TP/EP/ETP layout (each rank reads only its slices).
if [ -n "$need_import" ]; then
  say "import $HF_MODEL -> $IMPORT_CKPT"
  step "import" torchrun_all -m checkpoint_convert import --hf "$HF_MODEL" --out "$IMPORT_CKPT" \
    --tp "$TP" --ep "$EP" --etp "$ETP"
fi

# 5. Every phase in one torchrun launch; finished phases are skipped, interrupted ones resume.
say "training phases: $PHASE_DIRS"
step "training" torchrun_all -m megatron_ec.recipe --config "$RECIPE" "$@"

# 6. Export the last phase of the main chain (HF weights + routing side file) and every baseline
# phase (pipeline.baselines, to <its output dir>/hf), 7. evaluate them side by side, 8. analyse.
if [ -n "$EXPORT_DIR" ] && on_node0; then
  say "export $FINAL_CKPT -> $EXPORT_DIR"
  step "export" "$PYTHON" -m checkpoint_convert export --ckpt "$FINAL_CKPT" --out "$EXPORT_DIR" --overwrite
  compare=()
  for item in $BASELINE_DIRS; do
    name=${item%%=*} dir=${item#*=}
    say "export baseline $name: $dir -> $dir/hf"
    step "export $name" "$PYTHON" -m checkpoint_convert export --ckpt "$dir" --out "$dir/hf" --overwrite
    compare+=("$name=$dir/hf")
  done
  compare_args=()
  [ ${#compare[@]} = 0 ] || compare_args=(--compare "${compare[@]}")
  metrics=()
  for dir in $PHASE_DIRS; do metrics+=("$dir/metrics.jsonl"); done
  if [ -n "$EVAL_HELDOUT" ]; then
    step "evaluation" "$PYTHON" -m megatron_ec.eval.demo_eval --hf "$EXPORT_DIR" \
      ${HF_MODEL:+--base "$HF_MODEL"} --heldout "$EVAL_HELDOUT" --max-samples "$EVAL_MAX_SAMPLES" \
      --max-new-tokens "$EVAL_MAX_NEW_TOKENS" --metrics "${metrics[@]}" \
      "${compare_args[@]}" --json "$(dirname "$EXPORT_DIR")/eval.json"
  fi
  if [ -n "$ANALYSIS_DIR" ]; then
    step "analysis" "$PYTHON" -m megatron_ec.analyze demo --out "$ANALYSIS_DIR" \
      --main "$EXPORT_DIR" ${HF_MODEL:+--base "$HF_MODEL"} "${compare_args[@]}" \
      --data "${EVAL_HELDOUT:-$TRAIN_DATA}" --metrics-dirs $MAIN_PHASE_DIRS
  fi
fi
say "done on node $NODE_RANK in $((SECONDS - began)) s"
