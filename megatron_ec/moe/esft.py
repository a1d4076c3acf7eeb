"""ESFT (Wang et al. 2024) as pure math: expert scores, per-layer selection, trainable-expert masks.

The spec is METHODS.md §4. Score each routed expert of each MoE layer on task data with the frozen
base model, keep per layer the highest-scoring experts until their cumulative score reaches
`top_p`, and train only those experts. Nothing here touches modules, optimizers or process groups:
the callers (the scoring pass, the trainer's freeze hook) pass tensors in and get tensors back.

Shape-suffix legend:
    _T   one entry per token            (T = tokens in the micro-batch, padding included)
    _E   one entry per routed expert     (E = num_experts)
    _TE  token x expert                  (probs_TE, routing_map_TE: Megatron-Core's routing pair)
    _S   one accumulator row: [selection counts (E) | gate-weight sums (E) | real tokens (1)]
    _LS  layer x accumulator row;  _LE  layer x expert (per-layer scores)

Scores (per layer, over REAL tokens t = 1..N; padding never counts):
    ES-Token_e = sum_t 1[e in TopK_t] / sum_e' sum_t 1[e' in TopK_t]   (= that count / (k N))
    ES-Gate_e  = sum_t g_te / N,  g_te = the family's gate weight of e for t (0 if unselected)
Both are normalised per layer, never across layers (the public script divides each expert's score
by its sum over layers: deepseek-ai/ESFT#8, #17). ES-Token sums to 1 per layer; ES-Gate sums to the
mean selected gate mass (1 x scaling factor for renormalising families, below 1 for the others).

Data parallelism: `score_sums` returns sums, never means, so the accumulators of every micro-batch
and of every data-parallel rank add up (one SUM all-reduce of the stacked [L, 2E + 1] tensor) to
the global sums; `scores_from_sums` then divides once. Counts are integers held in fp64, exact up
to 2**53 selections; gate sums are fp64 as well, exact up to the order of the additions.

Expert placement under expert parallelism (Megatron-Core, contiguous): global expert g lives on EP
rank g // (E / EP) as local expert g % (E / EP). (A public port used g // EP: a bug not to copy.)

Freezing unselected experts that share one fused/grouped weight tensor with selected ones:
masking the gradient is not enough, because AdamW's decoupled weight decay (p -= lr * wd * p)
moves a row whose gradient is zero. Param groups cannot help either: a group holds whole tensors,
and Megatron's distributed optimizer flattens tensors into shared buffers. We therefore (1) zero
the frozen rows' gradient (a grad hook or before clipping: the global grad norm then counts only
trainable experts, as it would if the frozen ones were separate frozen parameters), and (2) keep a
copy of the frozen rows and write it back after every optimizer step (`ExpertRowFreeze`); the
rows are then bitwise unchanged whatever the optimizer does. With a distributed/mixed-precision
optimizer, restore the tensor the optimizer updates (its fp32 main-parameter shard) as well as the
model's copy, or the next main -> model copy undoes the restore.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

DEFAULT_TOP_P = {"token": 0.2, "gate": 0.1}
"""ESFT's defaults per score function (METHODS.md §4; the ESFT README uses token with 0.2)."""


# ---------------------------------------------------------------------------------------------
# Scores.
# ---------------------------------------------------------------------------------------------


def score_sums(
    probs_TE: torch.Tensor,
    routing_map_TE: torch.Tensor,
    token_mask_T: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-expert accumulator of one layer and one micro-batch, to be summed over batches/ranks.

    Args:
        probs_TE: gate weights [T, E] of the frozen base model, zero off the selection (what the
            router hands the dispatcher: renormalised and scaled as the family does).
        routing_map_TE: bool [T, E], True where the expert is selected (k per token).
        token_mask_T: bool [T], True for real tokens; None = all real. Padding rows never count.

    Returns:
        sums_S: fp64 [2E + 1] = [selection counts | gate-weight sums | number of real tokens].
    """
    if probs_TE.shape != routing_map_TE.shape or probs_TE.dim() != 2:
        raise ValueError(
            f"probs {tuple(probs_TE.shape)} and routing_map {tuple(routing_map_TE.shape)} must "
            "both be [tokens, experts]."
        )
    if token_mask_T is None:
        token_mask_T = torch.ones(probs_TE.shape[0], dtype=torch.bool, device=probs_TE.device)
    if token_mask_T.shape != probs_TE.shape[:1]:
        raise ValueError(
            f"token_mask {tuple(token_mask_T.shape)} must be [tokens={probs_TE.shape[0]}]."
        )
    real_T1 = token_mask_T.to(torch.float64).unsqueeze(-1)
    counts_E = (routing_map_TE.to(torch.float64) * real_T1).sum(dim=0)
    gates_E = (probs_TE.detach().to(torch.float64) * real_T1).sum(dim=0)
    return torch.cat([counts_E, gates_E, real_T1.sum().reshape(1)])


def scores_from_sums(sums_LS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ES-Token and ES-Gate per layer from (globally summed) accumulators.

    Args:
        sums_LS: fp64 [L, 2E + 1] (or [2E + 1] for one layer), rows from `score_sums`.

    Returns:
        (token_LE, gate_LE): fp64 [L, E] (or [E]); each row of token_LE sums to 1.

    Raises:
        ValueError: a layer saw no real token.
    """
    num_experts = (sums_LS.shape[-1] - 1) // 2
    if sums_LS.shape[-1] != 2 * num_experts + 1 or num_experts < 1:
        raise ValueError(f"accumulator rows must be [2E + 1], got {sums_LS.shape[-1]}.")
    counts_LE = sums_LS[..., :num_experts]
    gates_LE = sums_LS[..., num_experts : 2 * num_experts]
    tokens_L1 = sums_LS[..., 2 * num_experts :]
    if bool((tokens_L1 <= 0).any()):
        raise ValueError("a layer has no real tokens: score on data with unmasked tokens.")
    token_LE = counts_LE / counts_LE.sum(dim=-1, keepdim=True)
    return token_LE, gates_LE / tokens_L1


# ---------------------------------------------------------------------------------------------
# Selection and its record.
# ---------------------------------------------------------------------------------------------


def select_experts(scores_E: torch.Tensor, top_p: float) -> list[int]:
    """Experts by descending score until their cumulative score reaches `top_p`, crossing one in.

    Ties rank the lower expert id first. The running sum is fp64 in that order, and it stops at
    the first expert with `cumulative >= top_p` (an exact hit stops there). If the scores never
    reach `top_p` (ES-Gate of a non-renormalising family with a large `top_p`), every expert is
    selected.

    Args:
        scores_E: one layer's scores [E] (ES-Token or ES-Gate), non-negative.
        top_p: cumulative-score threshold in (0, 1].

    Returns:
        The selected global expert ids, in selection order (highest score first).
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r} (defaults: {DEFAULT_TOP_P}).")
    values = scores_E.detach().to(torch.float64).tolist()
    order = sorted(range(len(values)), key=lambda e: (-values[e], e))
    selected, cumulative = [], 0.0
    for expert in order:
        selected.append(expert)
        cumulative += values[expert]
        if cumulative >= top_p:
            break
    return selected


def select_experts_per_layer(scores_LE: torch.Tensor, top_p: float) -> list[list[int]]:
    """`select_experts` on every row of [L, E] scores (each layer on its own scores)."""
    return [select_experts(scores_E, top_p) for scores_E in scores_LE]


def selection_record(
    experts_per_layer: Mapping[int, Sequence[int]],
    score_function: str,
    top_p: float,
    shared_experts: bool = False,
    non_expert_modules: bool = False,
) -> dict:
    """A JSON-serialisable selection, in ESFT's expert-config format plus how it was made.

    Args:
        experts_per_layer: {layer number: selected global expert ids}; the caller chooses the
            numbering (we use Megatron's 0-based MoE layer numbers) and says so in the file.
        score_function: "token" or "gate".
        top_p: the threshold used.
        shared_experts: train the shared experts too (ESFT's switch; off by default).
        non_expert_modules: train attention, norms, embeddings and the router too (off).

    Returns:
        {"experts": {"<layer>": [ids, sorted]}, "shared_experts", "non_expert_modules",
         "score_function", "top_p"}.
    """
    if score_function not in DEFAULT_TOP_P:
        raise ValueError(
            f"score_function must be one of {sorted(DEFAULT_TOP_P)}, got {score_function!r}."
        )
    return {
        "experts": {
            str(layer): sorted(int(e) for e in ids) for layer, ids in experts_per_layer.items()
        },
        "shared_experts": bool(shared_experts),
        "non_expert_modules": bool(non_expert_modules),
        "score_function": score_function,
        "top_p": float(top_p),
    }


def experts_from_record(record: Mapping, num_experts: int) -> dict[int, list[int]]:
    """{layer: sorted global ids} from a `selection_record` (or an ESFT expert config), checked."""
    experts = {}
    for layer, ids in record["experts"].items():
        ids = sorted(int(e) for e in ids)
        if len(set(ids)) != len(ids) or any(not 0 <= e < num_experts for e in ids):
            raise ValueError(
                f"layer {layer}: expert ids {ids} must be distinct and in [0, {num_experts})."
            )
        experts[int(layer)] = ids
    return experts


# ---------------------------------------------------------------------------------------------
# Placement under expert parallelism and freezing inside fused expert tensors.
# ---------------------------------------------------------------------------------------------


def local_trainable_experts(
    selected_global: Sequence[int], num_experts: int, ep_rank: int, ep_size: int
) -> list[int]:
    """Local ids, on this EP rank, of the selected global experts (contiguous placement).

    Global g lives on EP rank g // (E / EP) as local g % (E / EP); selected experts of other ranks
    are not returned.
    """
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} must be >= 1 and divide num_experts={num_experts}.")
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank={ep_rank} must be in [0, ep_size={ep_size}).")
    num_local = num_experts // ep_size
    local = []
    for g in selected_global:
        if not 0 <= int(g) < num_experts:
            raise ValueError(f"expert id {g} is outside [0, {num_experts}).")
        if int(g) // num_local == ep_rank:
            local.append(int(g) % num_local)
    return sorted(set(local))


@dataclass(frozen=True)
class ExpertRowFreeze:
    """Freezes some experts' slices of one fused expert weight (experts stacked along `dim`).

    Layouts: HF fused `gate_up_proj [E, H, 2F]` (dim 0); Megatron GroupedMLP `weight1
    [H, E_local * 2F]` (dim 1) and `weight2 [E_local * F, H]` (dim 0); per-expert tensors
    (SequentialMLP, TEGroupedMLP's weight<i>) need no rows: freeze them whole.
    Use: `mask_grad` on the gradient before clipping, `snapshot` once before training,
    `restore_` after every optimizer step (why: module docstring).
    """

    dim: int
    """Tensor dimension along which the local experts are stacked, in equal contiguous blocks."""
    frozen_index: torch.Tensor
    """LongTensor of the indices along `dim` that belong to frozen experts."""
    size: int
    """Length of the tensor along `dim`."""

    def keep_mask(self, param: torch.Tensor) -> torch.Tensor:
        """Bool tensor broadcastable to `param`: True on trainable slices."""
        shape = [1] * param.dim()
        shape[self.dim] = self.size
        keep = torch.ones(self.size, dtype=torch.bool, device=param.device)
        keep[self.frozen_index.to(param.device)] = False
        return keep.reshape(shape)

    def mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient with frozen slices set to exactly zero (usable as a tensor hook)."""
        zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
        return torch.where(self.keep_mask(grad), grad, zero)

    def snapshot(self, param: torch.Tensor) -> torch.Tensor:
        """A copy of the frozen slices (only those: memory = the frozen experts' weights)."""
        return param.detach().index_select(self.dim, self.frozen_index.to(param.device)).clone()

    def restore_(self, param: torch.Tensor, snapshot: torch.Tensor) -> None:
        """Writes the frozen slices back, bitwise, in place."""
        with torch.no_grad():
            param.index_copy_(self.dim, self.frozen_index.to(param.device), snapshot)


def expert_row_freeze(
    trainable_local: Sequence[int], num_local_experts: int, size: int, dim: int = 0
) -> ExpertRowFreeze:
    """The `ExpertRowFreeze` of a fused tensor of `num_local_experts` blocks of `size // E_local`.

    Args:
        trainable_local: local expert ids that train (`local_trainable_experts`).
        num_local_experts: experts stacked in the tensor (E / EP).
        size: the tensor's length along `dim` (a multiple of num_local_experts).
        dim: the stacking dimension.
    """
    if num_local_experts < 1 or size % num_local_experts:
        raise ValueError(
            f"size {size} along dim {dim} is not a multiple of "
            f"num_local_experts={num_local_experts}."
        )
    trainable = set(int(e) for e in trainable_local)
    if any(not 0 <= e < num_local_experts for e in trainable):
        raise ValueError(f"local expert ids {sorted(trainable)} outside [0, {num_local_experts}).")
    block = size // num_local_experts
    frozen = [i for i in range(size) if i // block not in trainable]
    return ExpertRowFreeze(dim, torch.tensor(frozen, dtype=torch.long), size)
