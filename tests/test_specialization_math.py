"""Oracle tests for megatron_ec.moe.specialization (METHODS.md §6, arXiv 2505.22323).

The oracles are per-token Python loops in float64 written from the definitions: the variance as
an explicit sum over experts, the projection by Gram-Schmidt over the token's other outputs
(each basis vector orthogonalised twice, which keeps it orthonormal for near-collinear inputs).
Gradients are compared by running autograd through both.
"""

import pytest
import torch

from megatron_ec.moe.specialization import (
    DEFAULT_WEIGHTS,
    orthogonality_loss,
    variance_loss,
)
from tests.tolerance import FP32_ORACLE, FP64_ORACLE, assert_close_scaled

NUM_TOKENS, NUM_EXPERTS, TOPK, HIDDEN = 7, 6, 3, 5
F64 = torch.float64


def oracle_variance_loss(scores, token_mask, unbiased):
    per_token = []
    for t in range(scores.shape[0]):
        if not token_mask[t]:
            continue
        row = [scores[t, e] for e in range(scores.shape[1])]
        mean = sum(row) / len(row)
        per_token.append(sum((p - mean) ** 2 for p in row) / (len(row) - (1 if unbiased else 0)))
    return -sum(per_token) / len(per_token)


def oracle_projection_sq_norm(x, others):
    """||projection of x onto span(others)||^2 by twice-orthogonalised Gram-Schmidt."""
    basis = []
    for v in others:
        for _ in range(2):
            for q in basis:
                v = v - torch.dot(q, v) * q
        basis.append(v / torch.linalg.vector_norm(v))
    return sum(torch.dot(q, x) ** 2 for q in basis) if basis else torch.zeros((), dtype=x.dtype)


def oracle_orthogonality_loss(outputs, token_mask):
    terms = []
    for t in range(outputs.shape[0]):
        if not token_mask[t]:
            continue
        slots = [outputs[t, k] for k in range(outputs.shape[1])]
        for j, x in enumerate(slots):
            terms.append(oracle_projection_sq_norm(x, slots[:j] + slots[j + 1 :]))
    return sum(terms) / len(terms)


def make_inputs(seed=0, topk=TOPK, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    outputs = torch.randn(NUM_TOKENS, topk, HIDDEN, generator=gen, dtype=F64).to(dtype)
    ids = torch.stack(
        [torch.randperm(NUM_EXPERTS, generator=gen)[:topk] for _ in range(NUM_TOKENS)]
    )
    token_mask = torch.tensor([True, True, False, True, True, False, True])
    return outputs.requires_grad_(), ids, token_mask


def value_and_grad(loss_fn, leaf):
    loss = loss_fn(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


@pytest.mark.parametrize("unbiased", [False, True])
def test_variance_loss_matches_loop_over_real_tokens(unbiased):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(NUM_TOKENS, NUM_EXPERTS, generator=gen, dtype=F64).requires_grad_()
    token_mask = torch.rand(NUM_TOKENS, generator=gen) > 0.3
    ours = value_and_grad(
        lambda z: variance_loss(torch.softmax(z, -1), token_mask, unbiased), logits
    )
    want = value_and_grad(
        lambda z: oracle_variance_loss(torch.softmax(z, -1), token_mask, unbiased), logits
    )
    assert_close_scaled(ours[0], want[0], FP64_ORACLE, "L_v")
    assert_close_scaled(ours[1], want[1], FP64_ORACLE, "dL_v/dlogits")
    assert torch.equal(ours[1][~token_mask], torch.zeros_like(ours[1][~token_mask]))


def test_variance_loss_is_population_by_default():
    scores = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=F64)
    assert float(variance_loss(scores)) == -0.125  # (0.25 + 0) / 2
    assert float(variance_loss(scores, unbiased=True)) == -0.25


@pytest.mark.parametrize("dtype,tol", [(F64, FP64_ORACLE), (torch.float32, FP32_ORACLE)])
def test_orthogonality_loss_matches_loop(dtype, tol):
    outputs, ids, token_mask = make_inputs(dtype=dtype)
    ours = value_and_grad(lambda x: orthogonality_loss(x, ids, token_mask), outputs)
    want = value_and_grad(lambda x: oracle_orthogonality_loss(x.double(), token_mask), outputs)
    assert_close_scaled(ours[0], want[0], tol, "L_o")
    assert_close_scaled(ours[1], want[1], tol, "dL_o/doutputs")
    assert torch.equal(ours[1][~token_mask], torch.zeros_like(ours[1][~token_mask]))


def test_orthogonality_loss_near_collinear_outputs():
    """Two outputs of each token 1e-4 apart: the projections stay accurate (fp64 vs the loop)."""
    outputs, ids, token_mask = make_inputs(seed=2)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        noise = torch.randn(outputs[:, 0].shape, generator=gen, dtype=F64)
        outputs[:, 1] = outputs[:, 0] + 1e-4 * noise
    ours = value_and_grad(lambda x: orthogonality_loss(x, ids, token_mask), outputs)
    want = value_and_grad(lambda x: oracle_orthogonality_loss(x, token_mask), outputs)
    assert_close_scaled(ours[0], want[0], FP64_ORACLE, "L_o near-collinear")
    assert_close_scaled(ours[1], want[1], FP64_ORACLE, "dL_o/doutputs near-collinear")


def test_orthogonality_loss_of_one_slot_is_zero():
    outputs, ids, token_mask = make_inputs(topk=1)
    loss, grad = value_and_grad(lambda x: orthogonality_loss(x, ids, token_mask), outputs)
    assert float(loss) == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_orthogonal_outputs_give_zero_and_parallel_give_full_norm():
    eye = torch.eye(HIDDEN, dtype=F64)[:TOPK].expand(2, TOPK, HIDDEN).clone()
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    assert abs(float(orthogonality_loss(eye, ids))) < 1e-15
    two = torch.tensor([[[1.0, 0.0], [1.0, 1e-3]]], dtype=F64)  # nearly parallel, norm ~1
    assert float(orthogonality_loss(two, torch.tensor([[0, 1]]))) == pytest.approx(1.0, abs=1e-6)


def test_grouping_is_per_token():
    """Slot order inside a token does not matter; regrouping rows across tokens does (the
    public code's `cat(outputs grouped by expert).view(-1, k, H)` mixes tokens)."""
    outputs, ids, _ = make_inputs(seed=4)
    outputs = outputs.detach()
    loss = orthogonality_loss(outputs, ids)
    order = torch.stack([torch.randperm(TOPK, generator=torch.Generator().manual_seed(t))
                         for t in range(NUM_TOKENS)])
    shuffled = outputs.gather(1, order[..., None].expand_as(outputs))
    assert_close_scaled(orthogonality_loss(shuffled, ids.gather(1, order)), loss, FP64_ORACLE,
                        "L_o with slots permuted inside tokens")
    by_expert = ids.flatten().argsort(stable=True)  # rows sorted by expert id, as dispatched
    mixed = outputs.reshape(-1, HIDDEN)[by_expert].reshape(NUM_TOKENS, TOPK, HIDDEN)
    mixed_ids = torch.arange(NUM_TOKENS * TOPK).reshape(NUM_TOKENS, TOPK)  # no duplicate check
    assert abs(float(orthogonality_loss(mixed, mixed_ids) - loss)) > 1e-3 * float(loss)


def test_duplicate_ids_and_bad_shapes_are_errors():
    outputs, ids, _ = make_inputs()
    ids[0, 1] = ids[0, 0]
    with pytest.raises(ValueError, match="twice"):
        orthogonality_loss(outputs, ids)
    with pytest.raises(ValueError, match="same tokens"):
        orthogonality_loss(outputs, ids[:, :2])
    assert DEFAULT_WEIGHTS == {"variance": 1e-3, "orthogonality": 1e-4}
