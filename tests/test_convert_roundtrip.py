"""The single-process CLI path per family: import -> verify -> export -> the same HF model.

`main()` runs in this process (the CLI's code path minus the interpreter exit; the subprocess
runs are in test_convert_errors.py). Exported tensors must equal the originals bitwise, in their
dtype and under the hub's per-expert names; the config, generation config and tokenizer must come
back unchanged; stock transformers must give identical logits for both directories.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoConfig

from checkpoint_convert.__main__ import main
from tests.convert_testing import (
    FAMILIES,
    TOL,
    VARIANTS,
    assert_bitwise_equal,
    disk_tensors,
    hf_logits,
    hf_state,
    make_variant,
    random_tokens,
)

MOE_FIELDS = ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
              "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
              "mlp_only_layers", "router_aux_loss_coef", "intermediate_size", "head_dim")


def run_cli(capsys, *argv: str) -> list[str]:
    """Run the CLI in-process; return its stdout lines (asserting exit status 0)."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out.strip().splitlines()


def _config_without_version(path) -> dict:
    data = AutoConfig.from_pretrained(path).to_diff_dict()
    return {k: v for k, v in data.items() if k not in ("_name_or_path", "transformers_version")}


@pytest.mark.parametrize("family", FAMILIES)
def test_import_verify_export_round_trip(tmp_path, capsys, family):
    hf_dir = make_variant(family, tmp_path / "hf")
    ckpt, out = tmp_path / "ckpt", tmp_path / "exported"
    run_cli(capsys, "import", "--hf", hf_dir, "--out", ckpt)
    last = run_cli(capsys, "verify", "--hf", hf_dir, "--ckpt", ckpt)[-1]
    assert re.fullmatch(r"max_abs_logit_diff=\S+", last) and float(last.split("=")[1]) < TOL
    run_cli(capsys, "export", "--ckpt", ckpt, "--out", out)

    if not VARIANTS[family].get("fused"):  # same files, names and dtypes as save_pretrained's
        assert_bitwise_equal(disk_tensors(out), disk_tensors(hf_dir))
    assert_bitwise_equal(hf_state(out), hf_state(hf_dir))
    assert _config_without_version(out) == _config_without_version(hf_dir)
    original = AutoConfig.from_pretrained(hf_dir).to_dict()
    exported = AutoConfig.from_pretrained(out).to_dict()
    assert {k: exported.get(k) for k in MOE_FIELDS} == {k: original.get(k) for k in MOE_FIELDS}
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes(), name
    tokens = random_tokens()
    assert torch.equal(hf_logits(out, tokens), hf_logits(hf_dir, tokens))


def test_bin_weights_sharded_export_and_dtype(tmp_path, capsys):
    """`.bin` input (weights_only load), a sharded export with an index, and --dtype bf16."""
    hf_dir = make_variant("qwen2_moe", tmp_path / "hf")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bin_dir / name).write_bytes((hf_dir / name).read_bytes())
    torch.save(disk_tensors(hf_dir), bin_dir / "pytorch_model.bin")
    ckpt = tmp_path / "ckpt"
    run_cli(capsys, "import", "--hf", bin_dir, "--out", ckpt)
    run_cli(capsys, "export", "--ckpt", ckpt, "--out", tmp_path / "fp32",
            "--max-shard-size", "50KB")
    index = json.loads((tmp_path / "fp32" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_bitwise_equal(disk_tensors(tmp_path / "fp32"), disk_tensors(hf_dir))
    run_cli(capsys, "export", "--ckpt", ckpt, "--out", tmp_path / "bf16", "--dtype", "bf16")
    halves = disk_tensors(tmp_path / "bf16")
    assert_bitwise_equal(halves, {k: v.to(torch.bfloat16) for k, v in disk_tensors(hf_dir).items()})
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
