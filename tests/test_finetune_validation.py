"""Validation during training on 2 data-parallel ranks: `valid_loss` at `train.eval_interval` steps
and at the end equals a naive recomputation from the saved checkpoints, and evaluation leaves the
training (losses, gradients, selection biases) bitwise unchanged."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from megatron_ec.training.metrics import read_metrics
from tests.data_testing import alpaca_records, write_jsonl
from tests.test_finetune_support import make_data, make_start_checkpoint, run_cli, write_config
from tests.test_finetune_support import selection_biases
from tests.tolerance import Tolerance, assert_close_scaled

STEPS = 5
EVAL_INTERVAL = 2
VALIDATED_STEPS = [2, 4, 5]  # every EVAL_INTERVAL steps, and the last
NUM_VALID = 9  # 9 rows over 2 ranks x micro-batch 2: the last micro-batches hold padding rows
# fp32 forwards summed in different orders (per micro-batch vs per row, fused cross entropy vs
# fp64 log_softmax); measured |logged - naive| <= 2.5e-7 on losses of about 4.
VALID_RECOMPUTE = Tolerance("VALID_RECOMPUTE", rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 2-rank bias phase with and without `data.valid` (checkpoints every 2 steps)."""
    root = tmp_path_factory.mktemp("validation")
    checkpoint, train = make_start_checkpoint(root / "start"), make_data(root / "data")
    valid = write_jsonl(str(root / "data" / "valid.jsonl"), alpaca_records(96 + NUM_VALID)[96:])
    outputs = {}
    for name, extra in [("with", {"data": {"valid": valid}}), ("without", {})]:
        cfg = write_config(root / f"{name}.yaml", checkpoint, train, root / name,
                           train={"max_steps": STEPS, "eval_interval": EVAL_INTERVAL},
                           output={"save_interval": 2, "tensorboard": name == "with"}, **extra)
        done = run_cli("megatron_ec.finetune", ["--config", str(cfg)], nproc=2, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[name] = (cfg, root / name)
    return outputs


def _naive_valid_losses(config: str, iterations: list[str]) -> tuple[int, list[float]]:
    """(validation rows, per checkpoint: sum of -log softmax(logits)[label] over loss-mask tokens
    / their count), one row at a time, on one process."""
    import torch

    from megatron_ec.data import build_sft_dataset, collate, load_tokenizer
    from megatron_ec.models import ckpt_dir
    from megatron_ec.models.config import MoEModelConfig
    from megatron_ec.moe.methods.saved import load_method
    from megatron_ec.parallel import ParallelConfig, init_parallel
    from megatron_ec.training import checkpoint
    from megatron_ec.training.loop import StartPoint, build_model
    from megatron_ec.training.phase import load_phase_config

    init_parallel(ParallelConfig(), seed=1)
    cfg = load_phase_config(config, [], None)
    results = []
    for iteration in map(Path, iterations):
        model_cfg = MoEModelConfig.from_dict(ckpt_dir.read_model_meta(iteration)["model_config"])
        method = load_method(iteration)
        start = StartPoint(source=iteration, model_cfg=model_cfg, family="",
                           source_method=method, resume=None)
        model, _ = build_model(start, cfg, method)
        checkpoint.load_weights(model, iteration)
        method.apply(model)
        model.eval()
        tokenizer = load_tokenizer(str(iteration / ckpt_dir.TOKENIZER))
        dataset = build_sft_dataset(cfg.data, tokenizer, model_cfg.vocab_size, split="valid")
        loss_sum, tokens = 0.0, 0.0
        with torch.no_grad():
            for index in range(len(dataset)):
                batch = collate([dataset[index]])
                logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                               padding_mask=batch["padding_mask"])
                log_probs = torch.log_softmax(logits.double(), dim=-1)[0]
                for t in batch["loss_mask"][0].nonzero().flatten().tolist():
                    loss_sum -= float(log_probs[t, batch["labels"][0, t]])
                    tokens += 1
        results.append(loss_sum / tokens)
    return len(dataset), results


def test_valid_loss_at_interval_and_end_matches_naive_recomputation(runs):
    from tests.harness import run_on_ranks

    cfg, out = runs["with"]
    records = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert sorted(records) == list(range(1, STEPS + 1))
    assert [s for s, r in records.items() if "valid_loss" in r] == VALIDATED_STEPS
    iterations = [str(out / f"iter_{step:07d}") for step in VALIDATED_STEPS]
    [(num_rows, naive)] = run_on_ranks(_naive_valid_losses, world_size=1,
                                       args=(str(cfg), iterations), timeout=300)
    assert num_rows == NUM_VALID
    for step, reference in zip(VALIDATED_STEPS, naive):
        logged = records[step]["valid_loss"]
        assert math.isfinite(reference), (step, reference)
        assert_close_scaled(logged, reference, VALID_RECOMPUTE, f"valid_loss at step {step}")
        assert records[step]["valid_tokens"] == records[VALIDATED_STEPS[0]]["valid_tokens"] > 0
    assert records[5]["valid_loss"] < records[2]["valid_loss"]  # it learns the held-out answers


def test_valid_loss_reaches_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = runs["with"]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = {r["step"]: r["valid_loss"] for r in read_metrics(out / "metrics.jsonl")
              if "valid_loss" in r}
    scalars = {e.step: e.value for e in events.Scalars("valid/loss")}
    assert sorted(scalars) == VALIDATED_STEPS
    assert all(abs(scalars[s] - logged[s]) <= 1e-6 * abs(logged[s]) for s in VALIDATED_STEPS)
    assert "valid/tokens" in events.Tags()["scalars"]


def test_evaluation_changes_no_training_number_and_no_bias(runs):
    (_, with_valid), (_, without) = runs["with"], runs["without"]
    trained = read_metrics(with_valid / "metrics.jsonl")
    plain = read_metrics(without / "metrics.jsonl")
    timing = {"tokens_per_s", "step_time", "valid_loss", "valid_tokens"}
    for a, b in zip(trained, plain, strict=True):
        assert {k: v for k, v in a.items() if k not in timing} == \
               {k: v for k, v in b.items() if k not in timing}, a["step"]
    for step in VALIDATED_STEPS:  # the saved fp32 biases, bitwise
        name = f"iter_{step:07d}"
        biased = selection_biases(with_valid / name)
        reference = selection_biases(without / name)
        assert biased.keys() == reference.keys() and biased
        for layer, bias in reference.items():
            assert bool((bias != 0).any()) and bool((biased[layer] == bias).all()), (step, layer)
