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


def _early_case(root, checkpoint, data, case):
    """(CLI module, argv, expected fragment) of a config/path/data error found by `--check`."""
    from tests.test_finetune_support import write_config

    case_dir = root / case
    case_dir.mkdir()

    def config(train=data):
        return write_config(case_dir / "c.yaml", checkpoint, train, case_dir / "out")

    if case == "yaml_not_utf8":
        path = case_dir / "c.yaml"
        path.write_bytes(b"model:\n  checkpoint: caf\xe9\n")
        return ["--config", path], f"{path}:2: not UTF-8 text (byte 0xe9 at column 18)"
    if case == "yaml_syntax":
        path = case_dir / "c.yaml"
        path.write_text("model:\n  checkpoint: [x\ntrain: {}\n")
        return ["--config", path], f"{path}:3:"
    if case == "yaml_control_character":
        path = case_dir / "c.yaml"
        path.write_text("model:\n  checkpoint: x\x07\n")
        return ["--config", path], f"{path}:2: unacceptable character #x0007"
    if case == "config_missing":
        return ["--config", case_dir / "none.yaml"], "none.yaml: no such config file"
    if case == "config_is_a_directory":
        return ["--config", case_dir], f"{case_dir}: not a file"
    if case == "checkpoint_missing":
        return ["--config", config(), f"model.checkpoint={case_dir / 'none'}"], \
            f"{case_dir / 'none'}: no"  # finetune: no such directory; recipe: no checkpoint yet
    if case == "output_dir_is_a_file":
        (case_dir / "file").write_text("x")
        return ["--config", config(), f"output.dir={case_dir / 'file'}"], \
            "file is not a directory; choose another output.dir"
    if case == "data_missing":
        return ["--config", config(train=case_dir / "none.jsonl")], "none.jsonl: no such file"
    if case == "data_not_utf8":
        broken = case_dir / "train.jsonl"
        lines = data.read_bytes().splitlines(keepends=True)
        broken.write_bytes(b"".join(lines[:6]) + b"\xff" + b"".join(lines[6:]))
        return ["--config", config(train=broken)], f"{broken}:7: not UTF-8 text (byte 0xff"
    raise AssertionError(case)


EARLY = ["yaml_not_utf8", "yaml_syntax", "yaml_control_character", "config_missing",
         "config_is_a_directory", "checkpoint_missing", "output_dir_is_a_file", "data_missing",
         "data_not_utf8"]


@pytest.mark.parametrize("module", ["finetune", "recipe"])
def test_config_path_and_data_errors_are_one_line(start, module, capsys):
    """In-process `main(--check)` of both CLIs: one line naming file (and line), exit 2."""
    import importlib

    checkpoint, data, root = start
    main = importlib.import_module(f"megatron_ec.{module}").main
    (root / module).mkdir()
    for case in EARLY:
        argv, expected = _early_case(root / module, checkpoint, data, case)
        capsys.readouterr()
        assert main(["--check", *map(str, argv)]) == 2, case
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1 and "Traceback" not in err, f"{case}: {err}"
        assert lines[0].startswith(f"megatron_ec.{module}: error: "), f"{case}: {lines[0]}"
        assert expected in lines[0], f"{case}: {lines[0]}"
