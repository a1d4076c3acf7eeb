"""Import at TP1/EP1, TP2/EP1, TP1/EP2, TP2/EP2 and TP2/EP2/ETP2 on 4 gloo ranks, one launch for
all families:
each layout's Megatron logits match stock transformers (FP32_HF_PARITY), every layout writes the same
tensors, and at TP2/EP2 a rank reads well under the whole checkpoint."""

from __future__ import annotations

import torch.distributed as dist

from checkpoint_convert.importer import import_hf
from checkpoint_convert.model import load_megatron
from checkpoint_convert.verify import megatron_logits
from megatron_ec.models.layout import full_tensors
from megatron_ec.parallel import ParallelConfig, init_parallel
from tests.convert_testing import FAMILIES, hf_logits, make_variant, random_tokens
from tests.harness import run_on_ranks
from tests.tolerance import FP32_HF_PARITY, assert_close_scaled

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (2, 2, 2)]


def _layout(tp: int, ep: int, etp: int) -> ParallelConfig:
    return ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                          expert_tensor_parallel_size=etp)


def _import_and_run(hf_dir: str, ckpt: str, layout, tokens):
    report = import_hf(hf_dir, ckpt, _layout(*layout))
    model, _, cfg = load_megatron(ckpt, _layout(*layout))
    logits = megatron_logits(model, tokens)[..., : cfg.vocab_size]
    return logits, report.bytes_read / report.bytes_total


def _same_weights(ckpts: dict) -> bool:
    """The most split layouts' checkpoints, read back at TP1/EP1, hold bitwise the TP1/EP1
    tensors (the logits already cover the others)."""
    init_parallel(ParallelConfig(), seed=0)
    reference = full_tensors(load_megatron(ckpts[(1, 1, 1)])[0])
    for ckpt in (ckpts[(2, 2, 1)], ckpts[(2, 2, 2)]):
        weights = full_tensors(load_megatron(ckpt)[0])
        if weights.keys() != reference.keys():
            return False
        if not all(weights[k].equal(reference[k]) for k in reference):
            return False
    return True


def layouts_worker(hf_dirs: dict, tmp_dir: str, tokens):
    """Per rank: {(family, layout): (logits, read fraction)} and {family: same weights}."""
    logits, same = {}, {}
    for family, hf_dir in hf_dirs.items():
        ckpts = {layout: f"{tmp_dir}/{family}_{'_'.join(map(str, layout))}" for layout in LAYOUTS}
        for layout, ckpt in ckpts.items():
            logits[(family, layout)] = _import_and_run(hf_dir, ckpt, layout, tokens)
        same[family] = _same_weights(ckpts)
    return logits, same, dist.get_rank()


def test_import_at_every_layout_matches_hf(tmp_path):
    hf_dirs = {family: str(make_variant(family, tmp_path / "hf")) for family in FAMILIES}
    tokens = random_tokens()
    results = run_on_ranks(layouts_worker, world_size=4, args=(hf_dirs, str(tmp_path), tokens),
                           timeout=600)
    for family, hf_dir in hf_dirs.items():
        expected = hf_logits(hf_dir, tokens)
        for layout in LAYOUTS:
            got, _ = results[0][0][(family, layout)]
            assert_close_scaled(got, expected, FP32_HF_PARITY, f"{family} at TP/EP/ETP {layout}")
        assert results[0][1][family], f"{family}: layouts wrote different tensors"
        fractions = [rank_result[0][(family, (2, 2, 1))][1] for rank_result in results]
        # TP2/EP2: half the experts, half of every split tensor; replicated norms/routers in full
        assert max(fractions) < 0.55, f"{family}: a rank read {max(fractions):.0%} of the weights"
