"""User errors through the real CLI (subprocesses, run concurrently; the cases that fail before
Megatron-Core starts run in-process): one line on stderr,
`checkpoint_convert: error: <where>: <what>; <fix>`, exit 2, no traceback, nothing written."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint_convert.__main__ import main
from tools.make_tiny_hf import make_tiny_hf

ROOT = Path(__file__).resolve().parents[1]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weights(hf_dir: Path, edit) -> None:
    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(hf_dir: Path, **changes) -> None:
    path = hf_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def missing_tensor(base: Path, case: Path):
    hf = _copy(base, case / "hf")
    _edit_weights(hf, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    return ["import", "--hf", hf], "missing tensor"


def unexpected_tensor(base: Path, case: Path):
    hf = _copy(base, case / "hf")
    _edit_weights(hf, lambda t: t.update({"model.layers.1.mlp.experts.6.up_proj.weight":
                                          torch.zeros(32, 64)}))
    return ["import", "--hf", hf], "unexpected tensor"


def shape_mismatch(base: Path, case: Path):
    hf = _copy(base, case / "hf")
    _edit_config(hf, moe_intermediate_size=16)
    return ["import", "--hf", hf], "but the model needs"


def experts_not_divisible(base: Path, case: Path):
    return ["import", "--hf", base, "--ep", "4"], "6 experts do not split over 4 ranks"


def kv_groups_not_divisible(base: Path, case: Path):
    return ["import", "--hf", base, "--tp", "4"], "2 KV heads (query groups) do not split"


def corrupt_safetensors(base: Path, case: Path):
    hf = _copy(base, case / "hf")
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return ["import", "--hf", hf], "corrupt safetensors file"


def unsafe_pickle(base: Path, case: Path):
    hf = _copy(base, case / "hf")
    state = load_file(hf / "model.safetensors")
    (hf / "model.safetensors").unlink()
    torch.save({**state, "extra": argparse.Namespace(x=1)}, hf / "pytorch_model.bin")
    return ["import", "--hf", hf], "torch.load(weights_only=True)"


def unsupported_model_type(base: Path, case: Path):
    hf = _copy(base, case / "hf")
    _edit_config(hf, model_type="llama")
    return ["import", "--hf", hf], "supported: deepseek_v2, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe"


def unsupported_setting(base: Path, case: Path):
    hf = _copy(base, case / "hf")
    _edit_config(hf, use_sliding_window=True)
    return ["import", "--hf", hf], "use_sliding_window=True is not supported"


def export_not_a_checkpoint(base: Path, case: Path):
    (case / "empty").mkdir()
    return ["export", "--ckpt", case / "empty"], "not a megatron_ec checkpoint"


CASES = [missing_tensor, unexpected_tensor, shape_mismatch, experts_not_divisible,
         kv_groups_not_divisible, corrupt_safetensors, unsafe_pickle, unsupported_model_type,
         unsupported_setting, export_not_a_checkpoint]


_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _launch(argv: list) -> subprocess.Popen:
    # A plain `python -m` launch: none of the rendezvous variables in-process tests have set.
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV}
    env.update(PYTHONPATH=str(ROOT), TORCH_COMPILE_DISABLE="1", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen([sys.executable, "-m", "checkpoint_convert", *map(str, argv)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_hf("qwen2_moe", tmp_path_factory.mktemp("hf") / "qwen2_moe")


def test_user_errors_are_one_line_and_write_nothing(base, tmp_path):
    runs = {}
    for case in CASES:
        case_dir = tmp_path / case.__name__
        case_dir.mkdir()
        argv, expected = case(base, case_dir)
        out = case_dir / "out"
        runs[case.__name__] = (_launch([*argv, "--out", out]), expected, out)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    runs["existing_output"] = (_launch(["import", "--hf", base, "--out", existing]),
                               "exists and is not empty; pass --overwrite", existing)
    for name, (proc, expected, out) in runs.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{stderr}"
        assert len(lines) == 1 and lines[0].startswith("checkpoint_convert: error: "), \
            f"{name}: stderr is not one error line:\n{stderr}"
        assert expected in lines[0], f"{name}: {lines[0]}"
        assert "Traceback" not in stdout + stderr
        if name != "existing_output":
            assert not out.exists(), f"{name}: left {out} behind"
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_verify_above_tolerance_exits_1(base, tmp_path, capsys):
    other = make_tiny_hf("qwen2_moe", tmp_path / "other", seed=1)
    assert main(["import", "--hf", str(base), "--out", str(tmp_path / "ckpt")]) == 0
    assert main(["verify", "--hf", str(other), "--ckpt", str(tmp_path / "ckpt")]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("max_abs_logit_diff=") and float(last.split("=")[1]) > 1e-2


# Path and decode errors, all caught before anything is loaded: (case -> argv, expected message).
# {base}: the tiny HF model; {ckpt}: its import; {tmp}: a scratch directory for the case.
_NOT_UTF8 = b"\xff\xfe not UTF-8"


def _hf_with(base: Path, case: Path, name: str, content: bytes) -> Path:
    hf = _copy(base, case / "hf")
    (hf / name).write_bytes(content)
    return hf


def _safetensors_with_header(base: Path, case: Path, header: bytes) -> Path:
    hf = _copy(base, case / "hf")
    (hf / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return hf


EARLY_CASES = {
    "verify_missing_hf": (lambda b, c, k: ["verify", "--hf", c / "MISSING", "--ckpt", k],
                          "MISSING: no such directory; pass the HF model directory to compare "
                          "with as --hf"),
    "verify_missing_ckpt": (lambda b, c, k: ["verify", "--hf", b, "--ckpt", c / "MISSING"],
                            "MISSING: no such checkpoint directory"),
    "import_missing_hf": (lambda b, c, k: ["import", "--hf", c / "MISSING", "--out", c / "out"],
                          "MISSING: no such directory; pass the HF model directory"),
    "import_hf_is_a_file": (lambda b, c, k: ["import", "--hf", b / "config.json",
                                             "--out", c / "out"], "config.json: not a directory"),
    "import_out_under_a_file": (lambda b, c, k: ["import", "--hf", b, "--out",
                                                 b / "config.json" / "out"],
                                "cannot be created: " + "{base}/config.json is not a directory"),
    "export_missing_ckpt": (lambda b, c, k: ["export", "--ckpt", c / "MISSING", "--out", c / "out"],
                            "MISSING: no such checkpoint directory"),
    "export_ckpt_is_a_file": (lambda b, c, k: ["export", "--ckpt", k / "latest", "--out",
                                               c / "out"], "latest: not a directory"),
    "config_json_not_utf8": (lambda b, c, k: ["import", "--hf", _hf_with(b, c, "config.json",
                                                                         _NOT_UTF8),
                                              "--out", c / "out"],
                             "config.json:1: not UTF-8 text (byte 0xff at column 1)"),
    "config_json_invalid": (lambda b, c, k: ["import", "--hf", _hf_with(b, c, "config.json",
                                                                        b'{\n"model_type": \n'),
                                             "--out", c / "out"],
                            "config.json:3: invalid JSON (Expecting value)"),
    "index_not_utf8": (lambda b, c, k: ["import", "--hf", _hf_with(
        b, c, "model.safetensors.index.json", b'{"weight_map":\n\xff}'), "--out", c / "out"],
        "model.safetensors.index.json:2: not UTF-8 text"),
    "routing_file_not_utf8": (lambda b, c, k: ["import", "--hf", _hf_with(
        b, c, "megatron_ec_routing.json", _NOT_UTF8), "--out", c / "out"],
        "megatron_ec_routing.json:1: not UTF-8 text"),
    "safetensors_header_not_utf8": (lambda b, c, k: ["import", "--hf", _safetensors_with_header(
        b, c, b'{"\xff": 1}'), "--out", c / "out"], "model.safetensors: corrupt safetensors file"),
    "safetensors_header_invalid_json": (lambda b, c, k: ["import", "--hf",
                                                         _safetensors_with_header(b, c, b"{[}"),
                                                         "--out", c / "out"],
                                        "model.safetensors: corrupt safetensors file"),
    "model_json_not_utf8": (lambda b, c, k: ["export", "--ckpt", _ckpt_with_meta(k, c, _NOT_UTF8),
                                             "--out", c / "out"],
                            "model.json:1: not UTF-8 text"),
}


def _ckpt_with_meta(ckpt: Path, case: Path, content: bytes) -> Path:
    iteration = _copy(ckpt / (ckpt / "latest").read_text().strip(), case / "iter")
    (iteration / "model.json").write_bytes(content)
    return iteration


@pytest.fixture(scope="module")
def imported(base, tmp_path_factory) -> Path:
    ckpt = tmp_path_factory.mktemp("imported") / "ckpt"
    assert main(["import", "--hf", str(base), "--out", str(ckpt)]) == 0
    return ckpt


@pytest.mark.parametrize("case", sorted(EARLY_CASES))
def test_path_and_decode_errors_fail_first_in_one_line(case, base, imported, tmp_path, capsys):
    build, expected = EARLY_CASES[case]
    argv = [str(a) for a in build(base, tmp_path, imported)]
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("checkpoint_convert: error: "), captured.err
    assert expected.format(base=base) in lines[0], lines[0]
    assert "Traceback" not in captured.out + captured.err
    assert not (tmp_path / "out").exists()
