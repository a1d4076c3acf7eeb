"""Oracle tests for megatron_ec.moe.densemixer (METHODS.md §5).

The oracle is the `densemixer` package 1.0.1 (MIT, a test-only requirement). Its three patched
`forward`s are static functions of a transformers-4-style sparse MoE block (`.gate`,
`.experts[i]` with gate/up/down projections, `.top_k`, `.norm_topk_prob`, `.num_experts`, and for
Qwen2 `.shared_expert` / `.shared_expert_gate`); transformers 5 fuses its experts, so we call them
on a stand-in block of plain modules. Our side runs the ordinary top-k layer (experts only on
their routed tokens, `routing.route` weights) and hands its output to `densemixer_combine`, with a
copy of the same weights; outputs and every gradient are compared.
"""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from densemixer.models.olmoe_custom import CustomOlmoeSparseMoeBlock
from densemixer.models.qwen2_moe_custom import CustomQwen2MoeSparseMoeBlock
from densemixer.models.qwen3_moe_custom import CustomQwen3MoeSparseMoeBlock
from torch import nn

from megatron_ec.moe.densemixer import densemixer_combine, selected_tokens_only, straight_through
from megatron_ec.moe.routing import RoutingConfig, route
from tests.tolerance import FP32_ORACLE, assert_all_close_scaled, assert_close_scaled

BATCH, SEQ, HIDDEN, FFN, NUM_EXPERTS, TOPK = 2, 5, 8, 6, 6, 2
PACKAGE_FORWARD = {
    "olmoe": CustomOlmoeSparseMoeBlock.forward,
    "qwen3_moe": CustomQwen3MoeSparseMoeBlock.forward,
    "qwen2_moe": CustomQwen2MoeSparseMoeBlock.forward,
}
logging.getLogger("densemixer").setLevel(logging.WARNING)  # its once-per-model INFO line


class StandInExpert(nn.Module):
    """A SwiGLU expert in the transformers-4 per-expert layout."""

    def __init__(self, ffn):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, ffn, bias=False)
        self.up_proj = nn.Linear(HIDDEN, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, HIDDEN, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class StandInBlock(nn.Module):
    """The attributes the package's forwards read; Qwen2 adds a sigmoid-gated shared expert."""

    def __init__(self, norm_topk_prob, shared, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.gate = nn.Linear(HIDDEN, NUM_EXPERTS, bias=False)
        self.experts = nn.ModuleList(StandInExpert(FFN) for _ in range(NUM_EXPERTS))
        self.top_k, self.num_experts, self.norm_topk_prob = TOPK, NUM_EXPERTS, norm_topk_prob
        if shared:
            self.shared_expert = StandInExpert(2 * FFN)
            self.shared_expert_gate = nn.Linear(HIDDEN, 1, bias=False)
        with torch.no_grad():
            self.gate.weight.mul_(4.0)  # peaked routing: unselected experts still get gradient


def our_forward(block, hidden_BSH, renormalise_dense):
    """The ordinary top-k layer, then `densemixer_combine`; returns (y, ordinary top-k output)."""
    hidden_TH = hidden_BSH.reshape(-1, HIDDEN)
    logits_TE = block.gate(hidden_TH).float()
    cfg = RoutingConfig(NUM_EXPERTS, TOPK, norm_topk_prob=block.norm_topk_prob)
    probs_TE, routing_map_TE = route(logits_TE, cfg)
    sparse_TH = torch.zeros_like(hidden_TH)
    for e, expert in enumerate(block.experts):
        tokens = routing_map_TE[:, e].nonzero().squeeze(-1)
        routed_TH = probs_TE[tokens, e, None] * expert(hidden_TH[tokens])
        sparse_TH = sparse_TH.index_add(0, tokens, routed_TH)
    outputs_ETH = torch.stack([expert(hidden_TH) for expert in block.experts])
    scores_TE = torch.softmax(logits_TE, dim=-1)
    y_TH = densemixer_combine(sparse_TH, outputs_ETH, scores_TE, routing_map_TE, renormalise_dense)
    assert torch.equal(y_TH, sparse_TH)  # forward value = the ordinary top-k output, bitwise
    if hasattr(block, "shared_expert"):
        shared_gate_T1 = torch.sigmoid(block.shared_expert_gate(hidden_TH))
        y_TH = y_TH + shared_gate_T1 * block.shared_expert(hidden_TH)
    return y_TH.reshape(hidden_BSH.shape), sparse_TH


def run_and_grad(forward, block, hidden_BSH, probe_BSH):
    hidden = hidden_BSH.clone().requires_grad_()
    output = forward(block, hidden)
    (output * probe_BSH).sum().backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    grads["hidden"] = hidden.grad.clone()
    return output.detach(), grads


def make_inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, SEQ, HIDDEN, generator=gen),
            torch.randn(BATCH, SEQ, HIDDEN, generator=gen))


# (family, norm_topk_prob, our renormalise_dense): the rule each package variant uses.
VARIANTS = [
    ("olmoe", False, False),
    ("olmoe", True, True),  # partscale_fix_expert = the spec's ratio rule
    ("qwen3_moe", True, True),
    ("qwen3_moe", False, False),
    ("qwen2_moe", False, False),
    ("qwen2_moe", True, False),  # the package's Qwen2 variant: raw p in the dense term
]


@pytest.mark.parametrize("family,norm_topk_prob,renormalise_dense", VARIANTS)
def test_matches_densemixer_package(family, norm_topk_prob, renormalise_dense):
    package_block = StandInBlock(norm_topk_prob, shared=family == "qwen2_moe")
    our_block = copy.deepcopy(package_block)
    hidden, probe = make_inputs()
    package_out, package_grads = run_and_grad(
        lambda block, h: PACKAGE_FORWARD[family](block, h)[0], package_block, hidden, probe
    )
    our_out, our_grads = run_and_grad(
        lambda block, h: our_forward(block, h, renormalise_dense)[0], our_block, hidden, probe
    )
    assert_close_scaled(our_out, package_out, FP32_ORACLE, f"{family} output")
    assert_all_close_scaled(our_grads, package_grads, FP32_ORACLE, f"{family} grads")
    assert package_grads["gate.weight"].abs().min() > 0  # a dense router gradient


def test_qwen2_package_rule_differs_from_the_ratio_rule():
    """With norm_topk_prob the Qwen2 variant is another estimator (documented, not our bug)."""
    package_block = StandInBlock(True, shared=True)
    our_block = copy.deepcopy(package_block)
    hidden, probe = make_inputs()
    _, package_grads = run_and_grad(
        lambda block, h: PACKAGE_FORWARD["qwen2_moe"](block, h)[0], package_block, hidden, probe
    )
    _, ratio_grads = run_and_grad(
        lambda block, h: our_forward(block, h, True)[0], our_block, hidden, probe
    )
    diff = (ratio_grads["gate.weight"] - package_grads["gate.weight"]).abs().max()
    assert diff > 1e-3 * package_grads["gate.weight"].abs().max()


def test_router_sees_every_expert_and_experts_only_their_tokens():
    """The construct alone (no package): d y / d p_e = E_e(h) for all e; experts masked."""
    gen = torch.Generator().manual_seed(3)
    num_tokens = 7
    outputs = torch.randn(NUM_EXPERTS, num_tokens, HIDDEN, generator=gen, requires_grad=True)
    scores = torch.softmax(torch.randn(num_tokens, NUM_EXPERTS, generator=gen), -1).requires_grad_()
    routing_map = torch.zeros(num_tokens, NUM_EXPERTS, dtype=torch.bool)
    routing_map.scatter_(1, scores.detach().topk(TOPK, dim=-1).indices, True)
    sparse = torch.einsum("te,eth->th", torch.where(routing_map, scores, 0.0), outputs).detach()
    probe = torch.randn(num_tokens, HIDDEN, generator=gen)
    y = densemixer_combine(sparse, outputs, scores, routing_map, renormalise_dense=False)
    assert torch.equal(y, sparse)
    grad_scores, grad_outputs = torch.autograd.grad((y * probe).sum(), [scores, outputs])
    expected_scores = torch.einsum("th,eth->te", probe, outputs.detach())
    assert_close_scaled(grad_scores, expected_scores, FP32_ORACLE, "router gradient")
    selected_ET1 = routing_map.t()[..., None]
    expected_outputs = torch.where(selected_ET1, scores.detach().t()[..., None] * probe, 0.0)
    assert_close_scaled(grad_outputs, expected_outputs, FP32_ORACLE, "expert-output gradient")
    unselected = grad_outputs[~routing_map.t()]
    assert torch.equal(unselected, torch.zeros_like(unselected))


def test_pieces_keep_values_bitwise():
    x = torch.randn(3, 4, 5, requires_grad=True)
    mask = torch.rand(4, 3) > 0.5
    assert torch.equal(selected_tokens_only(x, mask), x)
    a, b = torch.randn(4, 5), torch.randn(4, 5, requires_grad=True)
    assert torch.equal(straight_through(a, b), a)
