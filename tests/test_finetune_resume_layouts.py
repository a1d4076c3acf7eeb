"""Resume at another layout: a run checkpointed at TP1/EP1 and resumed at TP2/EP2 on 4 ranks (the
data-parallel size changes from 1 to 2), and one checkpointed at TP2/EP2 inside phase 2 and resumed
at TP1/EP1, continue like the uninterrupted TP1/EP1 run: same metrics within a tolerance that
scales with the value, identical selection biases and condensers.

Three launches of the demo recipe (bias phase 4 steps, condenser phase 3 steps):
  1. reference, TP1/EP1 uninterrupted, a checkpoint every step (kept);
  2. TP2/EP2 from a copy of the reference's phase 1 whose `latest` is its step 2 (the checkpoint a
     run killed after step 2 leaves): phase 1 steps 3-4, then phase 2 from scratch, killed after
     its step 2 with its step 1 checkpointed;
  3. TP1/EP1: phase 1 complete, phase 2 resumed at step 1 from the TP2/EP2 checkpoint.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from megatron_ec.models import ckpt_dir
from megatron_ec.moe.methods.saved import load_method
from megatron_ec.training.metrics import read_metrics
from tests.tolerance import FP32_LAYOUT, assert_close_scaled
from tests.test_finetune_support import (  # noqa: F401
    DEMO_RECIPE,
    demo_overrides,
    demo_start,
    run_cli,
    selection_biases,
)

PHASE_STEPS = {"phase1": 4, "phase2": 3}
RESUME_PHASE1_AT = 2
NOT_COMPARED = ("tokens_per_s", "step_time")
LAYOUT_COUNTERS = "ep/"
"""The EP counters (all-to-all bytes, per-rank loads) describe the layout, so they differ."""


def _recipe(demo, out, nproc: int, tp: int, ep: int, **env):
    checkpoint, train = demo
    args = ["--config", str(DEMO_RECIPE), *demo_overrides(
        checkpoint, train, out, phases__bias__train__max_steps=PHASE_STEPS["phase1"],
        phases__condenser__train__max_steps=PHASE_STEPS["phase2"], output__save_interval=1,
        output__keep_last=0, parallel__tensor_model_parallel_size=tp,
        parallel__expert_model_parallel_size=ep)]
    return run_cli("megatron_ec.recipe", args, nproc=nproc, timeout=900, **env)


@pytest.fixture(scope="module")
def runs(demo_start, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("resume_layouts")
    reference, resumed = root / "reference", root / "resumed"
    done = _recipe(demo_start, reference, nproc=1, tp=1, ep=1)
    assert done.returncode == 0, done.stderr[-3000:]

    shutil.copytree(reference / "phase1", resumed / "phase1")
    (resumed / "phase1" / ckpt_dir.LATEST).write_text(ckpt_dir.iteration_name(RESUME_PHASE1_AT))
    killed = _recipe(demo_start, resumed, nproc=4, tp=2, ep=2,
                     MEGATRON_EC_FAULT="kill_after_step:2")
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert f"at step {RESUME_PHASE1_AT}" in killed.stderr, killed.stderr[-3000:]
    assert ckpt_dir.latest_iteration(resumed / "phase2").name == ckpt_dir.iteration_name(1)

    finished = _recipe(demo_start, resumed, nproc=1, tp=1, ep=1)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "already complete" in finished.stderr and "at step 1" in finished.stderr
    return reference, resumed


@pytest.mark.parametrize("phase", sorted(PHASE_STEPS))
def test_resume_across_layouts_continues_like_the_uninterrupted_run(runs, phase):
    reference, resumed = (read_metrics(run / phase / "metrics.jsonl") for run in runs)
    assert [r["step"] for r in resumed] == list(range(1, PHASE_STEPS[phase] + 1))
    assert [r["step"] for r in reference] == [r["step"] for r in resumed]
    for ref, got in zip(reference, resumed):
        assert ref.keys() == got.keys()
        for key in sorted(set(ref) - set(NOT_COMPARED)):
            if key.startswith(LAYOUT_COUNTERS):
                continue
            if isinstance(ref[key], float):
                assert_close_scaled(got[key], ref[key], FP32_LAYOUT,
                                    f"{phase} step {ref['step']} {key}")
            else:
                assert ref[key] == got[key], (phase, ref["step"], key, ref[key], got[key])


@pytest.mark.parametrize("phase", sorted(PHASE_STEPS))
def test_resume_across_layouts_keeps_biases_and_condensers_identical(runs, phase):
    final = [ckpt_dir.latest_iteration(run / phase) for run in runs]
    assert final[0].name == final[1].name == ckpt_dir.iteration_name(PHASE_STEPS[phase])
    reference, resumed = (selection_biases(iteration) for iteration in final)
    assert reference.keys() == resumed.keys() and reference
    for layer, bias in reference.items():
        assert torch.equal(bias, resumed[layer]), (phase, layer, bias, resumed[layer])
    assert load_method(final[0]) == load_method(final[1])
    if phase == "phase2":
        assert load_method(final[1]).decisions.condensers
