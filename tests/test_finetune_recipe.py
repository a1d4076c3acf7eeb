"""The demo recipe end to end on 2 ranks (EP2): phase 1 -> phase 2 -> export; re-running skips."""

from __future__ import annotations

import json

from megatron_ec.models import ckpt_dir
from megatron_ec.moe.methods.saved import load_method
from megatron_ec.moe.routing import select_condensers
from megatron_ec.training.metrics import read_metrics
from tests.test_finetune_support import (  # noqa: F401
    DEMO_RECIPE,
    demo_overrides,
    demo_start,
    run_cli,
    selection_biases,
)

STEPS = 4
NUM_CONDENSERS = 1  # examples/recipes/demo.yaml


def test_two_phases_chain_export_and_rerun(demo_start, tmp_path):  # noqa: F811
    checkpoint, train = demo_start
    args = ["--config", str(DEMO_RECIPE),
            *demo_overrides(checkpoint, train, tmp_path, train__max_steps=STEPS)]
    result = run_cli("megatron_ec.recipe", args, nproc=2, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    phase1 = read_metrics(tmp_path / "phase1" / "metrics.jsonl")
    phase2 = read_metrics(tmp_path / "phase2" / "metrics.jsonl")
    assert [r["phase"] for r in phase1 + phase2] == ["bias"] * STEPS + ["condenser"] * STEPS
    assert phase1[-1]["loss"] < phase1[0]["loss"]
    # Phase 2's condensers are the lowest-bias experts of phase 1's final bias, fixed.
    biases = selection_biases(ckpt_dir.latest_iteration(tmp_path / "phase1"))
    chosen = load_method(ckpt_dir.latest_iteration(tmp_path / "phase2")).decisions.condensers
    assert chosen == {layer: select_condensers(bias, NUM_CONDENSERS).tolist() for layer, bias in biases.items()}
    for record in phase2:
        for layer, experts in chosen.items():
            assert record[f"routing/layer{layer}/condensers"] == experts
            assert 0.0 < record[f"routing/layer{layer}/condenser_gate"] < 1.0

    exported = run_cli("checkpoint_convert", ["export", "--ckpt", str(tmp_path / "phase2"),
                                              "--out", str(tmp_path / "hf")])
    assert exported.returncode == 0, exported.stderr
    routing = json.loads((tmp_path / "hf" / "megatron_ec_routing.json").read_text())
    assert routing["method_state"]["condensers"] == {str(k): v for k, v in chosen.items()}

    again = run_cli("megatron_ec.recipe", args, nproc=2, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already complete") == 3  # bias, condenser, the sft baseline
    assert len(read_metrics(tmp_path / "phase2" / "metrics.jsonl")) == STEPS
