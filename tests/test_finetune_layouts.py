"""The same phase at TP2/EP2 on 4 ranks logs the TP1/EP1 loss, grad norm and bias statistics."""

from __future__ import annotations

import pytest

from megatron_ec.training.metrics import read_metrics
from tests.test_finetune_support import make_data, make_start_checkpoint, run_cli, write_config

STEPS = 3


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return make_start_checkpoint(root / "start"), make_data(root / "data"), root


def _run(root, checkpoint, data, name: str, nproc: int, **overrides):
    cfg = write_config(root / f"{name}.yaml", checkpoint, data, root / name,
                       train={"max_steps": STEPS})
    args = ["--config", str(cfg)] + [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    result = run_cli("megatron_ec.finetune", args, nproc=nproc, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(root / name / "metrics.jsonl")


def test_tp2_ep2_matches_tp1_ep1(start):
    checkpoint, data, root = start
    reference = _run(root, checkpoint, data, "tp1ep1", nproc=1)
    sharded = _run(root, checkpoint, data, "tp2ep2", nproc=4,
                   parallel__tensor_model_parallel_size=2,
                   parallel__expert_model_parallel_size=2)
    assert len(reference) == len(sharded) == STEPS
    for ref, got in zip(reference, sharded):
        assert ref["tokens"] == got["tokens"], "both layouts must see the same global batches"
        assert abs(ref["loss"] - got["loss"]) < 1e-4, (ref["step"], ref["loss"], got["loss"])
        assert abs(ref["grad_norm"] - got["grad_norm"]) < 1e-4 * max(1.0, ref["grad_norm"])
        for key, value in ref.items():
            if key.startswith("routing/") and "gini" not in key:
                assert got[key] == pytest.approx(value, abs=1e-6), (ref["step"], key)
    assert sharded[-1]["loss"] < sharded[0]["loss"]
