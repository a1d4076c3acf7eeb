"""Condenser routing through export: a checkpoint with a learned-looking `selection_bias` and fixed
condensers exports to a stock HF directory whose model, after `restore_condenser_routing`, gives
the Megatron model's logits in both condenser modes; re-importing that directory restores the
method state and the exact fp32 biases."""

from __future__ import annotations

import shutil

import pytest
import torch

from checkpoint_convert.__main__ import main
from checkpoint_convert.exporter import export_hf
from checkpoint_convert.importer import import_hf
from checkpoint_convert.model import build_model, load_megatron, open_checkpoint, set_routing_state
from checkpoint_convert.verify import megatron_logits
from megatron_ec.eval.hf_routing import read_routing_file, restore_condenser_routing
from megatron_ec.models.ckpt_dir import TOKENIZER, WEIGHTS, publish, staging_dir, write_model_meta
from megatron_ec.models.dist_ckpt import load_model_weights, save_model_weights
from megatron_ec.models.family import get_family
from megatron_ec.moe.methods import Method, make_method
from megatron_ec.moe.methods.saved import save_method
from megatron_ec.moe.state import selection_biases
from megatron_ec.parallel import ParallelConfig, shutdown_parallel
from tests.convert_testing import hf_logits, random_tokens
from tests.tolerance import FP32_HF_PARITY, assert_close_scaled, error_ratio
from tools.make_tiny_hf import make_tiny_hf

GAMMA = 1e-3


@pytest.fixture(scope="module", autouse=True)
def one_process():
    yield
    shutdown_parallel()


def learned_biases(cfg, seed: int) -> dict[int, torch.Tensor]:
    """Per MoE layer: multiples of gamma, as the sign updates leave them, large enough to matter."""
    gen = torch.Generator().manual_seed(seed)
    return {layer: torch.randint(-400, 400, (cfg.num_experts,), generator=gen).float() * GAMMA
            for layer in cfg.moe_layers}


def with_routing(src_ckpt, dst, method: Method, seed: int):
    """A copy of an imported checkpoint carrying `method` and non-trivial selection biases."""
    iteration, meta, cfg, _ = open_checkpoint(src_ckpt)
    model = build_model(get_family(meta["family"]), cfg, method, ParallelConfig())
    load_model_weights(model, iteration / WEIGHTS)
    set_routing_state(model, method, learned_biases(cfg, seed))
    staging = staging_dir(dst, 0)
    save_model_weights(model, staging / WEIGHTS)
    write_model_meta(staging, meta)
    save_method(staging, method)
    shutil.copytree(iteration / TOKENIZER, staging / TOKENIZER)
    return publish(dst, 0)


@pytest.mark.parametrize("family, name, mode, ids", [
    ("qwen2_moe", "condenser", "paper", [4]),  # k=2: one forced, one dynamic slot
    ("qwen2_moe", "condenser", "reference", [1, 4]),  # k + r = 4 slots
    ("qwen3_moe", "condenser", "reference", [0, 5]),
    ("qwen3_moe", "bias", "reference", []),  # bias phase: biased weights, no condensers
    ("mixtral", "condenser", "paper", [2]),
    # softmax_topk with a router bias: softmax over the k selected (unbiased) logits
    ("gpt_oss", "condenser", "paper", [3]),
    ("gpt_oss", "condenser", "reference", [0, 5]),  # softmax over the k + r biased slot logits
])
def test_exported_condenser_routing_matches_megatron(tmp_path, capsys, family, name, mode, ids):
    hf_dir = make_tiny_hf(family, tmp_path / "hf")
    import_hf(hf_dir, tmp_path / "plain")
    cfg = open_checkpoint(tmp_path / "plain")[2]
    condensers = {layer: ids for layer in cfg.moe_layers} if ids else {}
    extra = dict(num_condensers=len(ids), condensers=condensers) if ids else {}
    method = make_method(name, condenser_mode=mode, gamma=GAMMA, **extra,
                         decisions={"condensers": condensers} if ids else None)
    ckpt = with_routing(tmp_path / "plain", tmp_path / "ec", method, seed=3)
    export_hf(ckpt, tmp_path / "out")

    tokens = random_tokens()
    model, _, _ = load_megatron(ckpt)
    want = megatron_logits(model, tokens)[..., : cfg.vocab_size]
    biases = selection_biases(model)
    got = hf_logits(tmp_path / "out", tokens, restore=True)
    assert_close_scaled(got, want, FP32_HF_PARITY, f"{family} {name}/{mode}: restored logits")
    stock = hf_logits(tmp_path / "out", tokens)
    assert error_ratio(stock, want, FP32_HF_PARITY) > 100, "routing state had no effect: vacuous"

    exported_method, exported_biases = read_routing_file(tmp_path / "out")
    assert exported_method == method
    assert all(torch.equal(exported_biases[k], biases[k]) for k in biases)  # exact fp32
    assert main(["verify", "--hf", str(tmp_path / "out"), "--ckpt", str(ckpt)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("max_abs_logit_diff=")

    import_hf(tmp_path / "out", tmp_path / "again")  # the side file comes back in
    again, _, _ = load_megatron(tmp_path / "again")
    assert open_checkpoint(tmp_path / "again")[3] == method
    assert all(torch.equal(selection_biases(again)[k], biases[k]) for k in biases)


def test_reference_mode_computes_k_plus_r_experts(tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_ec.eval.hf_routing import write_routing_file

    hf_dir = make_tiny_hf("qwen3_moe", tmp_path / "hf")
    method = make_method("condenser", condenser_mode="reference", num_condensers=[2, 0],
                         decisions={"condensers": {1: [0, 5]}})
    write_routing_file(hf_dir, method, {1: torch.zeros(6), 2: torch.zeros(6)})
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    assert restore_condenser_routing(model, hf_dir) == 2
    hidden = torch.randn(5, 64)
    _, weights, ids = model.model.layers[1].mlp.gate(hidden)
    assert ids.shape == (5, 4) and weights.shape == (5, 4)  # k=2 dynamic + r=2 condensers
    assert bool((ids == 0).any(dim=1).all() and (ids == 5).any(dim=1).all())
    assert model.model.layers[2].mlp.gate(hidden)[2].shape == (5, 2)  # r=0 in layer 2


def test_sft_state_leaves_the_model_unchanged(tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_ec.eval.hf_routing import write_routing_file

    hf_dir = make_tiny_hf("mixtral", tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert restore_condenser_routing(model, hf_dir) == 0  # no routing file at all
    write_routing_file(hf_dir, make_method("sft"), {0: torch.ones(6), 1: torch.ones(6)})
    gate = model.model.layers[0].mlp.gate
    assert restore_condenser_routing(model, hf_dir) == 0 and model.model.layers[0].mlp.gate is gate


def test_restored_bias_stays_fp32_in_a_bf16_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_ec.eval.hf_routing import write_routing_file
    from megatron_ec.moe.routing import route

    hf_dir = make_tiny_hf("qwen2_moe", tmp_path / "hf")
    # Steps of 5e-5 around 0.1: bf16 would round them away.
    bias = torch.tensor([0.10005, -0.1, 0.10010, 0.0, -0.10005, 0.10015])
    method = make_method("bias")
    write_routing_file(hf_dir, method, {1: bias, 2: bias})
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    assert restore_condenser_routing(model, hf_dir) == 2
    model.to(torch.bfloat16)
    gate = model.model.layers[1].mlp.gate
    assert gate.selection_bias.dtype == torch.float32 and torch.equal(gate.selection_bias, bias)
    assert gate.weight.dtype == torch.bfloat16
    hidden = torch.randn(7, 64).to(torch.bfloat16)
    _, weights, ids = gate(hidden)
    logits = torch.nn.functional.linear(hidden.float(), gate.weight.float())
    probs, routing_map = route(logits, gate.routing_cfg, bias)
    assert torch.equal(ids, routing_map.nonzero()[:, 1].view(7, -1))
    assert torch.equal(weights, probs.gather(1, ids).to(torch.bfloat16))
    assert model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.dtype == torch.bfloat16
