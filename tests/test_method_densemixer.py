"""DenseMixer on the method seam (`method.name: densemixer`, METHODS.md s.5).

- The model's forward is the top-k (SFT) forward bitwise; only the router learns differently.
- One MoE layer of OUR model (Qwen2-MoE, Qwen3-MoE and OLMoE routing/shapes) against the
  `densemixer` 1.0.1 package's patched forwards on a stand-in block built from that layer's
  weights: output, router / expert / shared-expert / input gradients (FP32_ORACLE).
- One multi-rank launch: TP2 (sequence parallel), TP2 with expert TP2, EP2, TP2/EP2 and
  TP2/EP2 with expert TP2 (both dispatchers) equal TP1/EP1 (FP32_LAYOUT).
- Checkpoint, export and HF restore: the export is a plain model (routing unchanged).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from densemixer.models.olmoe_custom import CustomOlmoeSparseMoeBlock
from densemixer.models.qwen2_moe_custom import CustomQwen2MoeSparseMoeBlock
from densemixer.models.qwen3_moe_custom import CustomQwen3MoeSparseMoeBlock
from torch import nn

from megatron_ec.moe.methods import make_method
from megatron_ec.parallel import ParallelConfig, init_parallel, shutdown_parallel
from tests.harness import run_on_ranks
from tests.test_finetune_support import demo_start  # noqa: F401
from tests.tiny import (BATCH, SEQ, build_tiny, forward_loss, sgd_step, start_phase, tiny_batch,
                        tiny_config)
from tests.tolerance import (
    FP32_LAYOUT,
    FP32_ORACLE,
    assert_all_close_scaled,
    assert_close_scaled,
)

logging.getLogger("densemixer").setLevel(logging.WARNING)

# family: (package forward, tiny-model overrides in that family's routing rule and MLP shape)
FAMILIES = {
    "qwen2_moe": (CustomQwen2MoeSparseMoeBlock.forward,
                  dict(norm_topk_prob=False, shared_expert_size=48, shared_expert_gate=True)),
    "qwen3_moe": (CustomQwen3MoeSparseMoeBlock.forward,
                  dict(norm_topk_prob=True, shared_expert_size=0, shared_expert_gate=False)),
    "olmoe": (CustomOlmoeSparseMoeBlock.forward,
              dict(norm_topk_prob=False, shared_expert_size=0, shared_expert_gate=False)),
}
"""Per-family rule (docs/BASELINES.md): the spec's ratio rule iff `norm_topk_prob`; the package's
Qwen2 patch agrees with it for Qwen1.5-MoE's `norm_topk_prob=false`, the setting tested here."""
MOE_LAYER = 1  # layer 0 of the tiny model is dense


@pytest.fixture(scope="module")
def one_rank():
    init_parallel(ParallelConfig(), seed=3)
    yield
    shutdown_parallel()


def _pair(overrides):
    """(sft model, densemixer model) with the same weights."""
    cfg = tiny_config(**overrides)
    sft, _ = build_tiny(ParallelConfig(), cfg, method=make_method("sft"))
    dense, _ = build_tiny(ParallelConfig(), cfg, method=make_method("densemixer"))
    dense.load_state_dict(sft.state_dict())
    with torch.no_grad():  # peaked routing, so unselected experts matter
        for model in (sft, dense):
            model.decoder.layers[MOE_LAYER].mlp.router.weight.mul_(4.0)
    return sft, dense


def _router_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith("router.weight")}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_is_the_top_k_forward_and_only_the_router_learns_more(one_rank, family):
    sft, dense = _pair(FAMILIES[family][1])
    batch = tiny_batch(seed=0)
    sft.train()
    dense.train()
    loss_sft, loss_dense = forward_loss(sft, batch), forward_loss(dense, batch)
    assert torch.equal(loss_sft, loss_dense)  # bitwise
    loss_sft.backward()
    loss_dense.backward()
    for name, grad in _router_grads(dense).items():
        assert not torch.equal(grad, _router_grads(sft)[name]), f"{name}: no dense gradient"
    with torch.no_grad():
        dense.eval()
        sft.eval()
        assert torch.equal(forward_loss(sft, batch), forward_loss(dense, batch))


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_recompute_keeps_the_dense_gradient(one_rank, recompute):
    """The no-grad first pass leaves no stash; the recompute pass adds the router term."""
    from megatron_ec.models.builder import RuntimeOptions

    cfg = tiny_config()
    plain, _ = build_tiny(ParallelConfig(), cfg, method=make_method("densemixer"))
    runtime = RuntimeOptions(seq_length=SEQ, recompute=recompute)
    again, _ = build_tiny(ParallelConfig(), cfg, runtime, method=make_method("densemixer"))
    again.load_state_dict(plain.state_dict())
    grads = []
    for model in (plain, again):
        model.train()
        forward_loss(model, tiny_batch(seed=0)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert_all_close_scaled(grads[1], grads[0], FP32_ORACLE, f"recompute {recompute}")


class _Expert(nn.Module):
    """A SwiGLU expert in the transformers-4 per-expert layout the package's forwards call."""

    def __init__(self, fc1, fc2):
        super().__init__()
        ffn = fc1.shape[0] // 2
        self.gate_proj = nn.Linear(fc1.shape[1], ffn, bias=False)
        self.up_proj = nn.Linear(fc1.shape[1], ffn, bias=False)
        self.down_proj = nn.Linear(ffn, fc2.shape[0], bias=False)
        with torch.no_grad():  # Megatron's fc1 is [gate; up]
            self.gate_proj.weight.copy_(fc1[:ffn])
            self.up_proj.weight.copy_(fc1[ffn:])
            self.down_proj.weight.copy_(fc2)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class StandInBlock(nn.Module):
    """The package's view of one of OUR MoE layers: its weights copied into plain modules."""

    def __init__(self, layer, cfg):
        super().__init__()
        weights = {n: p.detach() for n, p in layer.named_parameters()}
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(weights["router.weight"])
        self.experts = nn.ModuleList(
            _Expert(weights[f"experts.local_experts.{e}.linear_fc1.weight"],
                    weights[f"experts.local_experts.{e}.linear_fc2.weight"])
            for e in range(cfg.num_experts))
        self.top_k, self.num_experts, self.norm_topk_prob = cfg.topk, cfg.num_experts, \
            cfg.norm_topk_prob
        if cfg.shared_expert_size:
            self.shared_expert = _Expert(weights["shared_experts.linear_fc1.weight"],
                                         weights["shared_experts.linear_fc2.weight"])
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
            with torch.no_grad():
                self.shared_expert_gate.weight.copy_(weights["shared_experts.gate_weight"])


def _package_names(cfg):
    """{our layer's parameter name: the stand-in's name (or a fc1 half)}."""
    names = {"router.weight": ["gate.weight"]}
    for e in range(cfg.num_experts):
        names[f"experts.local_experts.{e}.linear_fc1.weight"] = [
            f"experts.{e}.gate_proj.weight", f"experts.{e}.up_proj.weight"]
        names[f"experts.local_experts.{e}.linear_fc2.weight"] = [f"experts.{e}.down_proj.weight"]
    if cfg.shared_expert_size:
        names["shared_experts.linear_fc1.weight"] = ["shared_expert.gate_proj.weight",
                                                     "shared_expert.up_proj.weight"]
        names["shared_experts.linear_fc2.weight"] = ["shared_expert.down_proj.weight"]
        names["shared_experts.gate_weight"] = ["shared_expert_gate.weight"]
    return names


@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_layer_matches_the_densemixer_package(one_rank, family):
    package_forward, overrides = FAMILIES[family]
    cfg = tiny_config(**overrides)
    _, dense = _pair(overrides)
    layer = dense.decoder.layers[MOE_LAYER].mlp
    block = StandInBlock(layer, cfg)
    gen = torch.Generator().manual_seed(1)
    hidden_SBH = torch.randn(SEQ, BATCH, cfg.hidden_size, generator=gen)
    probe_SBH = torch.randn(SEQ, BATCH, cfg.hidden_size, generator=gen)

    layer.train()
    ours_in = hidden_SBH.clone().requires_grad_()
    ours, _ = layer(ours_in)
    (ours * probe_SBH).sum().backward()
    theirs_in = hidden_SBH.transpose(0, 1).contiguous().requires_grad_()
    theirs = package_forward(block, theirs_in)[0]
    (theirs * probe_SBH.transpose(0, 1)).sum().backward()

    assert_close_scaled(ours, theirs.transpose(0, 1), FP32_ORACLE, f"{family} output")
    ours_grads = {n: p.grad for n, p in layer.named_parameters()}
    got, want = {"hidden": ours_in.grad}, {"hidden": theirs_in.grad.transpose(0, 1)}
    stand_in = dict(block.named_parameters())
    for name, theirs_names in _package_names(cfg).items():
        got[name] = ours_grads[name]
        want[name] = torch.cat([stand_in[n].grad for n in theirs_names])
    assert_all_close_scaled(got, want, FP32_ORACLE, f"{family} grads")
    assert want["router.weight"].abs().min() > 0  # the package's router gradient is dense


# ---------------------------------------------------------------------------------------------
# Layouts: one 4-rank launch.
# ---------------------------------------------------------------------------------------------

LAYOUTS = [(1, 1, 1, "alltoall"), (2, 1, 1, "alltoall"), (2, 1, 2, "alltoall"),
           (2, 1, 2, "allgather"), (1, 2, 1, "alltoall"), (2, 2, 1, "alltoall"),
           (2, 2, 1, "allgather"), (2, 2, 2, "alltoall"), (2, 2, 2, "allgather")]
"""(TP, EP, ETP, dispatcher) on 4 ranks; TP2 is sequence parallel."""
LR, STEPS = 0.05, 2


def densemixer_layouts_worker(tmp_dir):
    """Per layout: (losses, last full gradients) of STEPS SGD steps."""
    from megatron_ec.models.dist_ckpt import load_model_weights, save_model_weights
    from megatron_ec.training.distributed import wrap_ddp

    results = {}
    for tp, ep, etp, dispatcher in LAYOUTS:
        parallel = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                  expert_tensor_parallel_size=etp, token_dispatcher=dispatcher)
        init_parallel(parallel, seed=1234)
        method = make_method("densemixer")
        model, tcfg = build_tiny(parallel, method=method)
        (save_model_weights if (tp, ep, etp) == (1, 1, 1) else load_model_weights)(
            model, f"{tmp_dir}/start")
        start_phase(model, method)
        ddp = wrap_ddp(model, tcfg)
        losses = []
        for step in range(STEPS):
            loss, grads = sgd_step(ddp, model, tiny_batch(seed=step), LR)
            losses.append(loss.item())
        results[(tp, ep, etp, dispatcher)] = (losses, grads)
    return results


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("densemixer_layouts")
    return run_on_ranks(densemixer_layouts_worker, 4, args=(str(tmp),), timeout=600)[0]


def test_tp_ep_and_expert_tp_layouts_match_tp1(layouts):
    ref_losses, ref_grads = layouts[LAYOUTS[0]]
    for layout in LAYOUTS[1:]:
        losses, grads = layouts[layout]
        assert_close_scaled(torch.tensor(losses), torch.tensor(ref_losses), FP32_LAYOUT,
                            f"{layout}: losses")
        assert_all_close_scaled(grads, ref_grads, FP32_LAYOUT, f"{layout}: grads")


# ---------------------------------------------------------------------------------------------
# Checkpoint, export and HF restore (as tests/test_method_plugin.py runs its toy method).
# ---------------------------------------------------------------------------------------------

def test_finetune_checkpoint_export_and_hf_restore(demo_start, tmp_path):  # noqa: F811
    import yaml
    from transformers import AutoModelForCausalLM

    from megatron_ec.eval.hf_routing import read_routing_file, restore_condenser_routing
    from megatron_ec.models import ckpt_dir
    from megatron_ec.moe.methods.densemixer import DenseMixer
    from megatron_ec.moe.methods.saved import load_method
    from megatron_ec.training.metrics import read_metrics
    from tests.convert_testing import TOL
    from tests.test_method_plugin import _tensors, finetune_export_verify

    checkpoint, train = demo_start
    out, hf_out = tmp_path / "densemixer", tmp_path / "hf"
    config = tmp_path / "densemixer.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"checkpoint": str(checkpoint)},
        "data": {"train": str(train), "seq_length": 256, "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 2, "micro_batch_size": 4, "global_batch_size": 4, "lr": 3e-3},
        "method": {"name": "densemixer"},
        "output": {"dir": str(out), "tensorboard": False},
    }))
    (diff,) = run_on_ranks(finetune_export_verify, world_size=1,
                           args=(str(config), str(out), str(hf_out)), timeout=900)
    assert diff < TOL  # the stock HF model reproduces the trained Megatron model's logits

    assert [r["phase"] for r in read_metrics(out / "metrics.jsonl")] == ["densemixer"] * 2
    trained = ckpt_dir.latest_iteration(out)
    assert isinstance(load_method(trained), DenseMixer)
    before, after = _tensors(ckpt_dir.resolve(checkpoint)), _tensors(trained)
    routers = [n for n in after if n.endswith("router.weight")]
    assert routers and not any(torch.equal(after[n], before[n]) for n in routers)

    method, _ = read_routing_file(hf_out)
    assert isinstance(method, DenseMixer) and not method.changes_routing()
    model = AutoModelForCausalLM.from_pretrained(hf_out, dtype=torch.float32)
    assert restore_condenser_routing(model, hf_out) == 0  # a plain model: routing unchanged


def test_experts_keep_the_spec_submodules_or_fall_back_to_biased_safe_linears(one_rank):
    """The spec's SequentialMLP submodules are kept (a family's fc2); grouped-GEMM specs (GPU)
    fall back to local linears whose fc2 takes a bias (GPT-OSS) safely."""
    import functools

    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_ec.moe.densemixer_modules import DenseMixerExperts
    from megatron_ec.moe.expert_linear import ExpertRowParallelLinear
    from megatron_ec.moe.methods.densemixer import _with_spec_submodules

    def build(*args, **kwargs):
        return args, kwargs

    marker = object()
    bound = _with_spec_submodules(build, functools.partial(SequentialMLP, submodules=marker))
    assert bound() == ((), {"submodules": marker})
    assert _with_spec_submodules(build, functools.partial(nn.Linear, 2)) is build
    _, dense = _pair(FAMILIES["olmoe"][1])
    experts = dense.decoder.layers[MOE_LAYER].mlp.experts
    assert isinstance(experts, DenseMixerExperts)
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    fallback = DenseMixerExperts(2, experts.config, pg_collection=get_default_pg_collection(),
                                 router=dense.decoder.layers[MOE_LAYER].mlp.router)
    assert all(isinstance(e.linear_fc2, ExpertRowParallelLinear) for e in fallback.local_experts)
