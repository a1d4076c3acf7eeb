"""The parity checks every family adapter passes, written once.

A family test module subclasses `FamilyParityChecks` as `TestParity`, sets the class attributes
and provides a `case` fixture over its cases:

    class TestParity(FamilyParityChecks):
        FAMILY, CASES = "olmoe", CASES
        IMPORT_CASE, ROUND_TRIP_CASE, FUSED_CASE = "renormalised", "hub_routing", "renormalised"

        @pytest.fixture(params=list(CASES))
        def case(self, request):
            return request.param

One 4-rank launch per family (`layout_results`) runs every case at every layout, the checkpoint
reshard and the converter import; the tests below read its results.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from tests.convert_testing import (
    assert_bitwise_equal,
    disk_tensors,
    hf_logits,
    hf_state,
    random_tokens,
)
from tests.family_parity import (
    IMPORTED,
    LAYOUTS,
    RESHARDED,
    converter_round_trip,
    hf_named_grads,
    hf_reference,
    parity_worker,
    roundtrip_mismatches,
    save_reference,
)
from tests.harness import run_on_ranks
from tests.tolerance import FP32_HF_PARITY, assert_all_close_scaled, assert_close_scaled


class FamilyParityChecks:
    """Megatron == HF transformers at every layout, and bitwise rule and converter round trips."""

    FAMILY: str
    CASES: dict
    IMPORT_CASE: str
    """The case the converter imports at every layout (4 ranks)."""
    ROUND_TRIP_CASE: str
    """The case that goes import -> verify -> export in one process."""
    FUSED_CASE: str
    """The case saved in transformers v5's fused-expert layout."""
    LOGIT_TOL = 1e-4
    """`checkpoint_convert verify`'s own absolute limit on max |dlogit| (the CLI's contract)."""
    TOL = FP32_HF_PARITY
    """Megatron vs HF logits and gradients, per tensor and scale-relative (tests/tolerance.py)."""

    @pytest.fixture(scope="class")
    @classmethod
    def references(cls):
        return {case: hf_reference(config) for case, config in cls.CASES.items()}

    @pytest.fixture(scope="class")
    @classmethod
    def hf_dirs(cls, tmp_path_factory):
        root = tmp_path_factory.mktemp(f"{cls.FAMILY}_hf")
        return {case: save_reference(config, root / case, fused=case == cls.FUSED_CASE)
                for case, config in cls.CASES.items()}

    @pytest.fixture(scope="class")
    @classmethod
    def layout_results(cls, references, hf_dirs, tmp_path_factory):
        tokens = next(iter(references.values())).tokens
        assert all(torch.equal(ref.tokens, tokens) for ref in references.values())
        configs = {case: (ref.model_cfg, ref.full) for case, ref in references.items()}
        kwargs = {"ckpt_dir": str(tmp_path_factory.mktemp(f"{cls.FAMILY}_ckpt")),
                  "hf_dirs": {cls.IMPORT_CASE: hf_dirs[cls.IMPORT_CASE]}}
        return run_on_ranks(parity_worker, world_size=4, args=(cls.FAMILY, configs, tokens),
                            kwargs=kwargs, timeout=600)[0]

    @pytest.fixture(params=LAYOUTS, ids=lambda layout: f"TP{layout[0]}EP{layout[1]}")
    def layout(self, request):
        return request.param

    def test_family_imports_without_megatron_core(self):
        """The converter reads configs and weights before importing MCore (which, for one, widens
        torch.load's safe globals), so a family file must not import it."""
        code = (f"import sys, megatron_ec.models.{self.FAMILY}; "
                "assert 'megatron.core' not in sys.modules")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])

    def test_rules_round_trip_every_hf_tensor_bitwise(self, references, case):
        assert roundtrip_mismatches(references[case]) == []

    def test_mapped_tensors_cover_the_model_exactly(self, layout_results, case, layout):
        assert layout_results[(case, layout)].unmatched == []

    def test_logits_match_hf(self, references, layout_results, case, layout):
        assert_close_scaled(layout_results[(case, layout)].logits, references[case].logits,
                            self.TOL, f"{case} {layout}: logits")

    def test_resharded_checkpoint_keeps_hf_logits(self, references, layout_results, case):
        assert_close_scaled(layout_results[(case, RESHARDED)], references[case].logits,
                            self.TOL, f"{case}: {RESHARDED}: logits")

    def test_gradients_match_hf(self, references, layout_results, case, layout):
        reference = references[case]
        grads = hf_named_grads(reference, layout_results[(case, layout)].grads)
        assert_all_close_scaled(grads, reference.hf_grads, self.TOL, f"{case} {layout}: grad")

    def test_converter_import_matches_hf(self, references, layout_results, layout):
        """`checkpoint_convert` import (each rank reads its own slices) at every layout."""
        assert_close_scaled(layout_results[(self.IMPORT_CASE, layout, IMPORTED)],
                            references[self.IMPORT_CASE].logits, self.TOL,
                            f"imported at {layout}: logits")

    def test_converter_round_trip(self, hf_dirs, tmp_path):
        """import -> verify -> export gives back the hub tensors bitwise and the same logits."""
        hf_dir = hf_dirs[self.ROUND_TRIP_CASE]
        result = converter_round_trip(hf_dir, tmp_path)
        assert result.verify_diff <= self.LOGIT_TOL
        if self.ROUND_TRIP_CASE != self.FUSED_CASE:  # export writes the per-expert hub layout
            assert_bitwise_equal(disk_tensors(result.exported), disk_tensors(hf_dir))
        assert_bitwise_equal(hf_state(result.exported), hf_state(hf_dir))
        unnamed = {"_name_or_path": ""}
        assert AutoConfig.from_pretrained(result.exported).to_dict() | unnamed == \
            AutoConfig.from_pretrained(hf_dir).to_dict() | unnamed
        tokens = random_tokens()
        assert torch.equal(hf_logits(result.exported, tokens), hf_logits(hf_dir, tokens))
