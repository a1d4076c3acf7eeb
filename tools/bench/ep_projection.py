"""Analytic EP projection of replicated vs routed condensers (docs/EP_PLACEMENT.md).

A model, not a measurement: every number follows from the assumptions in `Setup`, which the doc
lists. `python tools/bench/ep_scaling.py --project` prints the table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Setup:
    """Qwen3-30B-A3B on one node of 8 x H100 (EP 8, TP 1)."""

    hidden: int = 2048
    ffn: int = 768            # moe_intermediate_size
    moe_layers: int = 48
    experts: int = 128
    topk: int = 8
    r: int = 2
    ep: int = 8
    tokens: int = 8192        # tokens per GPU per micro-batch (seq 4096 x micro-batch 2)
    micro_batches: int = 8    # per optimizer step (replica refresh and gradient reduce amortised)
    act_bytes: int = 2        # bf16 hidden states in the all-to-all
    link: float = 450e9       # NVLink bytes/s per direction per GPU
    peak: float = 989e12      # dense bf16 FLOP/s
    mfu: float = 0.5          # grouped-GEMM efficiency of the experts


def alltoall_seconds(s: Setup, slots: int) -> float:
    """Four all-to-alls per MoE layer and micro-batch (dispatch, combine, and both again in the
    backward), each moving the slots bound for other ranks ((EP-1)/EP of them) at `link`."""
    remote = s.tokens * slots * (s.ep - 1) / s.ep
    return 4 * remote * s.hidden * s.act_bytes / s.link * s.moe_layers


def rows(s: Setup, owned: int, replicated: bool) -> float:
    """Expert rows one rank computes per layer and micro-batch when it owns `owned` condensers:
    the dynamic picks spread evenly over the E - r other experts (a lower bound on imbalance),
    plus every token of the EP group for each owned condenser (routed) or r rows per own token
    (replicated)."""
    per_rank = s.experts // s.ep
    dynamic = s.ep * s.tokens * (s.topk - s.r) * (per_rank - owned) / (s.experts - s.r)
    forced = s.r * s.tokens if replicated else owned * s.ep * s.tokens
    return dynamic + forced


def straggler_seconds(s: Setup, owned_max: int, replicated: bool) -> tuple[float, float]:
    """(max / mean rows over the ranks, slowest-minus-mean expert time per micro-batch), with
    forward + backward = 3 x 2 x 3 H F FLOPs per row at peak x mfu."""
    counts = [owned_max] + [0] * (s.ep - 1) if owned_max == s.r else [1] * s.r + [0] * (s.ep - s.r)
    loads = [rows(s, c, replicated) for c in counts]
    mean = s.tokens * s.topk
    per_row = 18 * s.hidden * s.ffn / (s.peak * s.mfu)
    return max(loads) / mean, (max(loads) - mean) * per_row * s.moe_layers


def replication_overhead_seconds(s: Setup) -> float:
    """Per micro-batch: the replica refresh and the replica-gradient all-reduce of each step
    (fp32 buffers of r experts x 3 H F per layer; ring all-reduce moves 2 (n-1)/n of it)."""
    buffer = s.r * 3 * s.hidden * s.ffn * 4 * s.moe_layers
    per_reduce = 2 * (s.ep - 1) / s.ep * buffer / s.link
    return 2 * per_reduce / s.micro_batches


def markdown_table(s: Setup = Setup()) -> str:
    routed_a2a, repl_a2a = alltoall_seconds(s, s.topk), alltoall_seconds(s, s.topk - s.r)
    lines = ["| per micro-batch (48 MoE layers) | routed | replicated | saved |",
             "|---|---|---|---|",
             f"| all-to-all time (4 per layer) | {routed_a2a * 1e3:.1f} ms | "
             f"{repl_a2a * 1e3:.1f} ms | {(routed_a2a - repl_a2a) * 1e3:.1f} ms |"]
    for owned, label in ((1, "J on two ranks"), (s.r, "J on one rank")):
        ratio_r, late_r = straggler_seconds(s, owned, replicated=False)
        ratio_p, late_p = straggler_seconds(s, owned, replicated=True)
        lines.append(f"| expert rows max/mean, {label} | {ratio_r:.2f} | {ratio_p:.3f} | |")
        lines.append(f"| straggler time (slowest - mean), {label} | {late_r * 1e3:.1f} ms | "
                     f"{late_p * 1e3:.1f} ms | {(late_r - late_p) * 1e3:.1f} ms |")
    over = replication_overhead_seconds(s)
    lines.append(f"| replica refresh + gradient all-reduce (per step / {s.micro_batches}) | 0 | "
                 f"{over * 1e3:.1f} ms | {-over * 1e3:.1f} ms |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
