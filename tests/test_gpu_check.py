"""The prepared GPU check (tools/gpu_check.py): its recipe overrides keep every output of the demo
under the check's own folder (a recipe key renamed later would otherwise write into runs/demo or
fail on the device, where a rerun costs lease time), and its stage list is what it runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402


@pytest.mark.parametrize("cpu", [True, False])
def test_demo_overrides_keep_every_path_under_the_check_folder(tmp_path, cpu):
    root = tmp_path / "run"
    printed = subprocess.run(
        [sys.executable, "-m", "megatron_ec.recipe", "--config", "examples/recipes/demo.yaml",
         "--print-paths", *gpu_check.demo_overrides(root, cpu, steps=8)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    paths = dict(line.split("=", 1) for line in printed.stdout.splitlines())
    for key in ("HF_MODEL", "IMPORT_CKPT", "FINAL_CKPT", "EXPORT_DIR", "DEMO_DATA_DIR",
                "TRAIN_DATA", "EVAL_HELDOUT"):
        assert paths[key].startswith(str(root)), (key, paths[key])
    for phase_dir in paths["PHASE_DIRS"].strip("'").split():
        assert phase_dir.startswith(str(root)), phase_dir
    assert (paths["TP"], paths["EP"]) == ("1", "1")  # one rank: world of one on one GPU


def test_every_stage_has_a_runner():
    assert set(gpu_check.RUNNERS) == set(gpu_check.STAGES)
    for test_file in gpu_check.DISCIPLINE_TESTS:
        assert (REPO / test_file).is_file(), test_file


def test_unknown_stage_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--cpu", "--out", str(tmp_path), "--stages", "env,warp"])
    assert stop.value.code == 2
    assert "unknown ['warp']" in capsys.readouterr().err
