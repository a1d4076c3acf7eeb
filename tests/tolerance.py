"""The suite's tolerance policy, written once (see tests/README.md, "Tolerances").

Float results that went through different arithmetic (another layout, HF transformers, another
CPU's GEMM kernels) are compared per tensor, relative to the reference's scale:

    max |actual - ref|  <=  rtol * max |ref|  +  atol

An absolute limit applied to tensors of every scale is a machine-dependent test: a gradient of
magnitude 0.5 carries ~1e-7 * 0.5 * sqrt(depth) of rounding noise whatever the limit says. `atol`
is only a floor for tensors whose reference is (near) zero. Bitwise equality (`torch.equal`) is
kept where it is the contract: round trips through the converter and the shard maps, biases
across the ranks of one layout, reruns of the same arithmetic.

Each check returns its observed error as a fraction of the limit. With `MEC_TOL_REPORT=path` set,
every check also appends one JSON line (test id, tolerance, what, ratio) to `path`;
`python -m tests.tolerance path...` prints the worst ratio per test and tolerance as a table.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """A scale-relative limit: `rtol * max|ref| + atol`, per tensor."""

    name: str
    rtol: float
    atol: float

    def limit(self, ref: torch.Tensor) -> float:
        scale = ref.detach().abs().max().item() if ref.numel() else 0.0
        return self.rtol * scale + self.atol


# Measured on this project's CPU box (tests/README.md has the margin table): the worst error of
# every check, as a fraction of these limits, stays below 0.1 with 1 thread and with the default.
FP32_LAYOUT = Tolerance("FP32_LAYOUT", rtol=2e-5, atol=1e-7)
"""TP/EP/ETP layouts (and dispatchers) vs TP1/EP1, fp32, up to 9 SGD steps: loss, gradients,
usage, grad norm, trainer metrics. Measured worst: 0.040 of this limit (8e-7 relative, a
phase-3 attention gradient in test_router_layouts), 1 thread and default threads. The issue's
fresh-machine failure (1.0e-5 on a gradient of max 0.47, at lr 0.5) was 2e-5 relative."""

FP32_HF_PARITY = Tolerance("FP32_HF_PARITY", rtol=1e-4, atol=1e-6)
"""Megatron-Core vs HF transformers, fp32 eager: logits and loss gradients of one batch
(different kernels: fused QKV, grouped experts, TP-split softmax). Measured worst: 0.014 of this
limit (1.4e-6 relative, loss gradients); the suite's earlier limits were 1e-4 too."""

FP64_ORACLE = Tolerance("FP64_ORACLE", rtol=1e-10, atol=1e-13)
"""A float64 implementation vs a naive float64 loop of the same formula (test_*_math.py):
only summation order differs, so the error is a few ulps of the terms (~1e-15 relative)."""

FP32_ORACLE = Tolerance("FP32_ORACLE", rtol=1e-5, atol=1e-7)
"""A float32 implementation vs a naive float64 loop, or vs an independent float32
implementation of the same formula (the `densemixer` package): fp32 rounding of short sums
and one expert MLP (~1e-7 relative), no different algorithm."""


def _as_tensor(value) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float64) if not torch.is_tensor(value) else value


def error_ratio(actual, ref, tol: Tolerance) -> float:
    """max |actual - ref| / (rtol * max|ref| + atol); <= 1 passes. Shapes must match."""
    actual, ref = _as_tensor(actual), _as_tensor(ref)
    assert actual.shape == ref.shape, f"shape {tuple(actual.shape)} vs {tuple(ref.shape)}"
    diff = (actual.double() - ref.double()).abs()
    err = diff.max().item() if diff.numel() else 0.0
    if err != err:  # nan anywhere is a failure, not a comparison
        return float("inf")
    return err / tol.limit(ref.double())


def assert_close_scaled(actual, ref, tol: Tolerance, what: str) -> float:
    """Assert `error_ratio(actual, ref, tol) <= 1`; return the ratio (recorded when reporting)."""
    ratio = error_ratio(actual, ref, tol)
    _record(tol, what, ratio)
    if not ratio <= 1.0:
        actual, ref = _as_tensor(actual), _as_tensor(ref)
        err = (actual.double() - ref.double()).abs().max().item()
        raise AssertionError(
            f"{what}: max |diff| {err:.3e} > {tol.name} limit {tol.limit(ref.double()):.3e} "
            f"(rtol {tol.rtol:g} * max|ref| {ref.double().abs().max().item():.3e} + "
            f"atol {tol.atol:g}); ratio {ratio:.2f}")
    return ratio


def assert_all_close_scaled(actual: Mapping, ref: Mapping, tol: Tolerance, what: str) -> float:
    """`assert_close_scaled` per key (each tensor against its own scale); the worst ratio."""
    assert actual.keys() == ref.keys(), f"{what}: names differ: {set(actual) ^ set(ref)}"
    return max((assert_close_scaled(actual[k], ref[k], tol, f"{what}: {k}") for k in ref),
               default=0.0)


def _record(tol: Tolerance, what: str, ratio: float) -> None:
    path = os.environ.get("MEC_TOL_REPORT")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
    with open(path, "a") as out:
        out.write(json.dumps({"test": test, "tol": tol.name, "what": what, "ratio": ratio}) + "\n")


def worst_ratios(paths: list[str]) -> dict[tuple[str, str], tuple[float, str]]:
    """{(test file::test name without params, tolerance): (worst ratio, what)} over report files."""
    worst: dict[tuple[str, str], tuple[float, str]] = {}
    for path in paths:
        with open(path) as lines:
            for line in lines:
                row = json.loads(line)
                key = (row["test"].split("[", 1)[0], row["tol"])
                if key not in worst or row["ratio"] > worst[key][0]:
                    worst[key] = (row["ratio"], row["what"])
    return worst


def main(paths: list[str]) -> None:
    """Print a Markdown table: one column of worst ratios per report file."""
    tables = [worst_ratios([p]) for p in paths]
    keys = sorted(set().union(*tables))
    print("| test | tolerance | " + " | ".join(paths) + " |")
    print("|---|---|" + "---|" * len(paths))
    for key in keys:
        cells = [f"{t[key][0]:.3f}" if key in t else "-" for t in tables]
        print(f"| `{key[0]}` | {key[1]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
