"""`python -m megatron_ec.analyze demo`: the demo's comparison reports the paper's mechanistic
directions from the sub-analyses' own numbers (each sub-analysis is tested against its naive
oracle in tests/test_analyze.py and tests/test_analysis_pruning.py)."""

from __future__ import annotations

import pytest

from megatron_ec.analysis import demo


def test_directions_follow_the_measured_numbers():
    kl = {demo.EC_LABEL: 0.01, "sft": 0.03}
    assert demo.directions(kl, {"condenser": 0.2, "routed": 0.1}, 0.05) == {
        "condenser_grad_norm_above_routed": True, "ec_router_kl_below_sft": True,
        "ablation_lowers_accuracy": True}
    assert demo.directions({demo.EC_LABEL: 0.05, "sft": 0.03}, {"condenser": 0.1, "routed": 0.2},
                           -0.01) == {"condenser_grad_norm_above_routed": False,
                                      "ec_router_kl_below_sft": False,
                                      "ablation_lowers_accuracy": False}


def test_unmeasurable_directions_are_none_not_false():
    got = demo.directions({demo.EC_LABEL: 0.05}, {"condenser": 0.1, "routed": None}, 0.0)
    assert got["condenser_grad_norm_above_routed"] is None
    assert got["ec_router_kl_below_sft"] is None


def test_bad_compare_is_one_line_error():
    with pytest.raises(ValueError, match="expected LABEL=DIR"):
        demo._labelled(["sft"])
