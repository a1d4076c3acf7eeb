"""User errors: one line on stderr naming the problem, exit status 2, no traceback, nothing written."""

from __future__ import annotations

import pytest

from tests.test_finetune_support import make_data, make_start_checkpoint, run_cli, write_config


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    return make_start_checkpoint(root / "start"), make_data(root / "data"), root


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_key_suggests_the_closest_one(start):
    checkpoint, data, root = start
    cfg = write_config(root / "typo.yaml", checkpoint, data, root / "typo_out")
    result = run_cli("megatron_ec.finetune", ["--config", str(cfg), "train.max_step=3"])
    _assert_one_line_error(result, "unknown config key 'train.max_step'",
                           "did you mean 'train.max_steps'?")
    assert not (root / "typo_out").exists()


def test_malformed_data_line_names_file_and_line(start):
    checkpoint, data, root = start
    lines = data.read_text().splitlines()
    lines[4] = lines[4][:-5]  # truncated JSON on line 5
    broken = root / "broken.jsonl"
    broken.write_text("\n".join(lines) + "\n")
    cfg = write_config(root / "broken.yaml", checkpoint, broken, root / "broken_out")
    result = run_cli("megatron_ec.finetune", ["--config", str(cfg)])
    _assert_one_line_error(result, f"{broken}:5")
    assert not (root / "broken_out").exists(), "a failed run must write nothing"


def test_condenser_phase_needs_a_learned_bias(start):
    checkpoint, data, root = start  # the imported model's bias is all zeros
    cfg = write_config(root / "p2.yaml", checkpoint, data, root / "p2_out",
                       method={"name": "condenser"})
    result = run_cli("megatron_ec.finetune", ["--config", str(cfg)])
    _assert_one_line_error(result, "selection bias is all zeros")
    assert not (root / "p2_out").exists()


def test_malformed_validation_line_names_file_and_line(start):
    checkpoint, data, root = start
    lines = data.read_text().splitlines()[:8]
    lines[4] = lines[4][:-5]  # truncated JSON on line 5
    broken = root / "broken_valid.jsonl"
    broken.write_text("\n".join(lines) + "\n")
    cfg = write_config(root / "valid.yaml", checkpoint, data, root / "valid_out",
                       data={"valid": str(broken)})
    result = run_cli("megatron_ec.finetune", ["--config", str(cfg)])
    _assert_one_line_error(result, f"{broken}:5")
    assert not (root / "valid_out").exists(), "a failed run must write nothing"
