"""SIGKILL mid-training and during a checkpoint save, then resume: the run continues identically,
and no process of the killed trainer's process group survives it."""

from __future__ import annotations

import signal

import pytest

from megatron_ec.models import ckpt_dir
from megatron_ec.training.expert_grad_norms import EXPERT_GRAD_NORMS_FILE
from megatron_ec.training.metrics import read_metrics
from tests.test_finetune_support import make_data, make_start_checkpoint, run_cli, write_config

COMPARED = ("loss", "lr", "grad_norm", "tokens")


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return make_start_checkpoint(root / "start"), make_data(root / "data"), root


def _config(root, start, data, name):
    return write_config(root / f"{name}.yaml", start, data, root / name,
                        train={"max_steps": 6},
                        output={"save_interval": 2, "tensorboard": True, "log_interval": 1})


def _assert_same(reference: list[dict], resumed: list[dict]) -> None:
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for ref, got in zip(reference, resumed):
        for key in set(ref) - {"tokens_per_s", "step_time"}:
            if isinstance(ref[key], float):
                assert abs(ref[key] - got[key]) <= 1e-6, (ref["step"], key, ref[key], got[key])
            else:
                assert ref[key] == got[key], (ref["step"], key)


def _assert_same_expert_norms(reference_dir, resumed_dir) -> None:
    """Per-expert gradient norms at every logged step (log_interval 1), the crashed run's extra
    lines dropped on resume."""
    reference = read_metrics(reference_dir / EXPERT_GRAD_NORMS_FILE)
    resumed = read_metrics(resumed_dir / EXPERT_GRAD_NORMS_FILE)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == [1, 2, 3, 4, 5, 6]
    for ref, got in zip(reference, resumed):
        assert ref["norms"].keys() == got["norms"].keys() and ref["norms"]
        for layer, norms in ref["norms"].items():
            # every expert trains (SFT); one no token reached this step has a zero gradient
            assert all(n is not None for n in norms) and any(n > 0 for n in norms)
            assert max(abs(a - b) for a, b in zip(norms, got["norms"][layer])) <= 1e-6 * max(norms)


def test_sigkill_and_killed_save_resume_identically(start):
    checkpoint, data, root = start
    reference_cfg = _config(root, checkpoint, data, "uninterrupted")
    done = run_cli("megatron_ec.finetune", ["--config", str(reference_cfg)])
    assert done.returncode == 0, done.stderr
    reference = read_metrics(root / "uninterrupted" / "metrics.jsonl")
    assert len(reference) == 6 and reference[-1]["loss"] < reference[0]["loss"]

    cfg, out = _config(root, checkpoint, data, "crashy"), root / "crashy"
    killed = run_cli("megatron_ec.finetune", ["--config", str(cfg)],
                     MEGATRON_EC_FAULT="kill_after_step:3")
    assert killed.returncode == -signal.SIGKILL
    assert killed.survivors == [], "a process of the killed trainer's group outlived it"
    assert ckpt_dir.latest_iteration(out).name == "iter_0000002"
    assert len(read_metrics(out / "metrics.jsonl")) == 3  # step 3 logged, not checkpointed

    # Resume from 2, then die inside the save of step 4: weights written, not published.
    killed = run_cli("megatron_ec.finetune", ["--config", str(cfg)],
                     MEGATRON_EC_FAULT="kill_in_save:4")
    assert killed.returncode == -signal.SIGKILL
    assert killed.survivors == [], "a process of the trainer killed in a save outlived it"
    assert ckpt_dir.latest_iteration(out).name == "iter_0000002"
    partial = ckpt_dir.staging_dir(out, 4)
    assert (partial / ckpt_dir.WEIGHTS).is_dir() and not (out / "iter_0000004").exists()

    resumed = run_cli("megatron_ec.finetune", ["--config", str(cfg)])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "at step 2" in resumed.stderr
    _assert_same(reference, read_metrics(out / "metrics.jsonl"))
    _assert_same_expert_norms(root / "uninterrupted", out)
    assert ckpt_dir.latest_iteration(out).name == "iter_0000006"
    assert not partial.exists()  # the half-written save is cleaned up

    again = run_cli("megatron_ec.finetune", ["--config", str(cfg)])
    assert again.returncode == 0 and "0 steps this run" in again.stderr
    assert len(read_metrics(out / "metrics.jsonl")) == 6


def test_full_recompute_changes_no_number(start):
    checkpoint, data, root = start
    reference = root / "uninterrupted" / "metrics.jsonl"
    if not reference.is_file():
        cfg = _config(root, checkpoint, data, "uninterrupted")
        assert run_cli("megatron_ec.finetune", ["--config", str(cfg)]).returncode == 0
    cfg = _config(root, checkpoint, data, "recompute")
    result = run_cli("megatron_ec.finetune", ["--config", str(cfg), "train.recompute=full"])
    assert result.returncode == 0, result.stderr
    _assert_same(read_metrics(reference), read_metrics(root / "recompute" / "metrics.jsonl"))
