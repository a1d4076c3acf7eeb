"""`tools/bench/train_bench.py`: a `--quick` smoke run (the JSON it writes), and its FLOP model
against a count of the HF model's own matrix parameters. Speed targets are not asserted here
(they are measured by the benchmark and committed as JSON)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tools" / "bench"


def test_quick_run_writes_every_field(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(BENCH / "train_bench.py"), "--quick",
                           "--variants", "hf,condenser_paper", "--runtime",
                           "attention_backend=sdpa", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"hf", "condenser_paper"}
    for name, result in report["results"].items():
        assert "error" not in result, result
        assert result["tokens_per_s"] > 0 and result["gemm_fraction"] > 0, name
        assert result["peak_rss_mib"] > 0 and len(result["step_seconds"]) == report["steps"]
    ours = report["results"]["condenser_paper"]
    assert ours["runtime"] == {"attention_backend": "sdpa"}
    assert report["measured_median"]["condenser_paper_vs_hf"] > 0
    rounds = ours["interleaved_vs_hf_by_round"]  # its steps took turns with HF's
    assert len(rounds) == report["steps"] and ours["interleaved_vs_hf"] == rounds[0]
    assert report["measured_interleaved"]["condenser_paper_vs_hf"] == rounds[0]
    assert report["met_best"]["bias_vs_hf"] is None  # bias was not run
    assert report["loadavg_before"] and report["loadavg_after"]


def test_flop_model_matches_the_hf_parameter_count():
    """6 x (active matrix parameters) + the attention-score term, from HF's own modules."""
    import torch

    sys.path.insert(0, str(BENCH))
    from train_bench_steps import Shapes, model_flops_per_token

    shapes = Shapes(hidden=64, layers=2, heads=4, experts=8, topk=2, expert_ffn=32,
                    shared_ffn=48, vocab=200, seq=24, batch=1)
    from transformers import Qwen2MoeForCausalLM

    model = Qwen2MoeForCausalLM(shapes.hf_config())
    active = 0
    for name, param in model.named_parameters():
        if param.ndim < 2 or "embed_tokens" in name:
            continue  # norms, biases, the embedding lookup: no matrix product
        share = shapes.topk / shapes.experts if ".experts." in name else 1.0
        active += param.numel() * share
    attention = 2 * 2 * shapes.seq * shapes.hidden * shapes.layers  # q.k and p.v, full s^2
    expected = 3 * (2 * active + attention)
    assert abs(model_flops_per_token(shapes) - expected) <= 1e-9 * expected
