"""The expert-pruning study and the persistent-path ablation (megatron_ec.analysis.pruning,
.ablation) against independent oracles: a physically smaller stock HF model, a naive per-token
loop over the App. E scores, and `megatron_ec.evaluate` on exported directories."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from megatron_ec import evaluate
from megatron_ec.analysis import ablation, pruning
from megatron_ec.moe.methods import make_method
from tests.tolerance import FP32_HF_PARITY, FP32_ORACLE, assert_close_scaled
from tools.make_tiny_hf import make_tiny_hf

NUM_EXPERTS_KEY = {"qwen2_moe": "num_experts", "mixtral": "num_local_experts"}
MAX_NEW_TOKENS = 6


def load(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def loud_experts(hf_dir: Path, scale: float = 10.0) -> Path:
    """The tiny model with its routed experts' outputs scaled up, so that a routing change moves
    greedy answers (at the tiny init the residual stream drowns the experts)."""
    model = load(hf_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.experts.down_proj"):
                param.mul_(scale)
    model.save_pretrained(hf_dir)
    return hf_dir


def smaller_model(hf_dir: Path, keep: dict[int, list[int]], topk: int, out: Path) -> Path:
    """A stock HF model holding only the kept experts: router rows and expert tensors sliced."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    state = load(hf_dir).state_dict()
    for name, tensor in state.items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and int(parts[2]) in keep and (
                ".mlp.experts." in name or name.endswith(".mlp.gate.weight")):
            state[name] = tensor[keep[int(parts[2])]]
    setattr(config, NUM_EXPERTS_KEY[config.model_type], len(next(iter(keep.values()))))
    config.num_experts_per_tok = topk
    small = AutoModelForCausalLM.from_config(config)
    small.load_state_dict(state)
    small.save_pretrained(out)
    for path in Path(hf_dir).glob("*token*"):
        shutil.copy(path, out)
    return out


@pytest.mark.parametrize("family, keep, topk", [
    ("qwen2_moe", [0, 2, 3, 5], 2),  # small MoE: 6 -> 4 experts, k = 2
    ("qwen2_moe", [1, 4, 5], 3),  # small dense: k = n' = 3
    ("mixtral", [0, 1, 3, 4, 5], 1),  # small MoE with a reduced k (renormalised top-k)
])
def test_pruned_model_equals_a_smaller_stock_model(tmp_path, family, keep, topk):
    hf_dir = make_tiny_hf(family, tmp_path / "hf", seed=1)
    model = load(hf_dir)
    base = pruning.routing_gates(model)
    tokens = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=tokens).logits
        pruning.prune(model, base, {layer: keep for layer in base}, topk)
        got = model(input_ids=tokens).logits
        pruning.install_gates(model, base)
        assert torch.equal(model(input_ids=tokens).logits, before)  # un-pruned again
        small = load(smaller_model(hf_dir, {layer: keep for layer in base}, topk, tmp_path / "s"))
        want = small(input_ids=tokens).logits
    assert_close_scaled(got, want, FP32_HF_PARITY, f"{family} pruned vs smaller model")
    assert (got - before).abs().max() > 100 * FP32_HF_PARITY.limit(before), "pruning did nothing"


@torch.no_grad()
def naive_scores(model, rows):
    """ES-Act and ES-Mag from App. E, one token and one selected expert at a time, with the
    expert MLP written out from its weights (SwiGLU: down(silu(gate x) * up x))."""
    blocks = {i: layer.mlp for i, layer in enumerate(model.model.layers)
              if hasattr(layer.mlp, "experts")}
    inputs = {}
    hooks = [block.register_forward_pre_hook(
        lambda module, args, i=i: inputs.__setitem__(i, args[0].reshape(-1, args[0].shape[-1])))
        for i, block in blocks.items()]
    num_experts = model.config.num_experts
    act = {i: torch.zeros(num_experts, dtype=torch.float64) for i in blocks}
    mag = {i: torch.zeros(num_experts, dtype=torch.float64) for i in blocks}
    for row in rows:
        model(input_ids=torch.tensor([row]))
        for i, block in blocks.items():
            experts, length = block.experts, len(row)
            for x in inputs[i]:
                _, weights, ids = block.gate(x[None])
                for g, e in zip(weights[0].tolist(), ids[0].tolist()):
                    if g <= 0:
                        continue
                    act[i][e] += 1 / (ids.shape[1] * length)
                    gate_x, up_x = (experts.gate_up_proj[e] @ x).chunk(2)
                    out = experts.down_proj[e] @ (torch.nn.functional.silu(gate_x) * up_x)
                    mag[i][e] += (g * out).double().norm() / length
    for hook in hooks:
        hook.remove()
    return {i: {"act": act[i] / len(rows), "mag": mag[i] / len(rows)} for i in blocks}


def test_expert_scores_match_a_naive_loop(tmp_path):
    from megatron_ec.eval.hf_routing import restore_condenser_routing, write_routing_file

    hf_dir = make_tiny_hf("qwen2_moe", tmp_path / "hf", seed=2)
    method = make_method("condenser", num_condensers=1, decisions={"condensers": {1: [4], 2: [0]}})
    write_routing_file(hf_dir, method, {1: torch.linspace(-0.3, 0.3, 6), 2: torch.zeros(6)})
    model = load(hf_dir)
    assert restore_condenser_routing(model, hf_dir) == 2
    rows = [[5, 17, 33, 2, 90, 41, 7], [8, 8, 120, 3], [200, 1, 64, 64, 9]]
    got = pruning.ScoreRecorder(model, pruning.routing_gates(model)).run(model, rows)
    want = naive_scores(model, rows)
    assert sorted(got) == sorted(want) == [1, 2]
    for layer in want:
        for name in ("act", "mag"):
            assert_close_scaled(got[layer][name], want[layer][name], FP32_ORACLE,
                                f"layer {layer} ES-{name}")
        assert got[layer]["act"].sum().item() == pytest.approx(1.0)  # K slots per token
    assert got[1]["act"][4] == pytest.approx(1 / 2)  # the condenser holds one of k = 2 slots


def test_kept_experts_rank_by_score_condensers_first():
    scores = torch.tensor([0.1, 0.5, 0.5, 0.0, 0.9, 0.2])
    assert pruning.kept_experts(scores, 3, []) == [1, 2, 4]
    assert pruning.kept_experts(scores, 2, []) == [1, 4]  # tie 1 vs 2: the lower id
    assert pruning.kept_experts(scores, 2, [3]) == [3, 4]


def namespace(parser_module, **values) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser_module.add_arguments(parser)
    argv = [token for key, value in values.items()
            for token in [f"--{key.replace('_', '-')}", *map(str, value if isinstance(
                value, list) else [value])]]
    return parser.parse_args(argv)


def outputs(hf_dir: str, questions: list[str]) -> list[str]:
    from megatron_ec.eval.generate import generate, load_exported, render_prompts

    loaded = load_exported(hf_dir, "cpu")
    return generate(loaded, render_prompts(loaded, questions), MAX_NEW_TOKENS)


def write_gsm8k(data_dir: Path, questions: list[str], answers: list[str]) -> None:
    """GSM8K records whose golds are the parsed answers of one model, so it scores 100%."""
    from megatron_ec.eval.tasks import TASKS

    golds = [TASKS["gsm8k"].parse(text) or "0" for text in answers]
    path = data_dir / "gsm8k" / "test.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question": q, "answer": f"#### {g}"}) + "\n"
                            for q, g in zip(questions, golds)))


def evaluate_accuracy(hf_dir, data_dir: Path, out: Path) -> float:
    assert evaluate.main(["--hf", str(hf_dir), "--tasks", "gsm8k", "--data-dir", str(data_dir),
                          "--out", str(out), "--max-new-tokens", str(MAX_NEW_TOKENS),
                          "--no-progress"]) == 0
    return json.loads(out.read_text())["tasks"]["gsm8k"]["accuracy"]


QUESTIONS = ["t5 t9 t33 t2", "t7 t7 t100 t41 t8", "t60 t61 t62", "t199 t3 t45 t12 t90 t91"]


def test_pruning_run_scores_each_variant_like_evaluate_on_the_smaller_model(tmp_path):
    hf_dir = make_tiny_hf("qwen2_moe", tmp_path / "hf", seed=4)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"instruction": q, "output": "t10 t11"}) + "\n"
                             for q in QUESTIONS))
    args = namespace(pruning, out=tmp_path / "out", hf=hf_dir, tasks="gsm8k",
                     data_dir=tmp_path / "data", calib=calib, small_moe=["4"], small_dense=["3"],
                     inference_reduce=["1"], rankings=["act", "mag"],
                     max_new_tokens=MAX_NEW_TOKENS, device="cpu")
    # The ranking the run will use, computed beforehand: the ES-Act small dense as a real model.
    from megatron_ec.eval.generate import load_exported

    loaded = load_exported(str(hf_dir), "cpu")
    gates = pruning.routing_gates(loaded.model)
    rows = pruning.calibration_rows(loaded, str(calib), 64, 512)
    act = pruning.ScoreRecorder(loaded.model, gates).run(loaded.model, rows)
    keep = {layer: pruning.kept_experts(act[layer]["act"], 3, []) for layer in gates}
    small = smaller_model(hf_dir, keep, 3, tmp_path / "small")
    write_gsm8k(tmp_path / "data", QUESTIONS, outputs(str(small), QUESTIONS))

    report = pruning.run(args)
    [dense] = [v for v in report["variants"]
               if v["strategy"] == "small_dense" and v["ranking"] == "act"]
    assert dense["kept"] == {str(k): v for k, v in keep.items()} and dense["active"] == 3
    assert dense["average"] == evaluate_accuracy(small, tmp_path / "data",
                                                     tmp_path / "small.json") == 1.0
    assert report["base"]["average"] == evaluate_accuracy(hf_dir, tmp_path / "data",
                                                          tmp_path / "base.json")
    assert report["base"]["average"] < 1.0, "pruning changed no answer: vacuous"
    strategies = sorted((v["strategy"], v["ranking"] or "") for v in report["variants"])
    assert strategies == [("inference_reduce", ""), ("small_dense", "act"), ("small_dense", "mag"),
                          ("small_moe", "act"), ("small_moe", "mag")]
    scores = report["calibration"]["scores"]
    assert scores["1"]["act"] == pytest.approx(act[1]["act"].tolist())
    assert_png(report["figures"], "pruning.png")


def assert_png(figures: list[str], name: str) -> None:
    [path] = figures
    assert Path(path).name == name
    with Image.open(path) as image:
        pixels = torch.tensor(list(image.convert("L").getdata()), dtype=torch.float32)
    assert image.size[0] > 300 and pixels.std() > 10, "an empty plot"


def test_ablation_run_equals_evaluate_with_the_forcing_dropped_in_the_export(tmp_path):
    from megatron_ec.eval.hf_routing import write_routing_file

    hf_dir = loud_experts(make_tiny_hf("qwen2_moe", tmp_path / "hf", seed=5))
    method = make_method("condenser", num_condensers=1, decisions={"condensers": {1: [2], 2: [5]}})
    # The condensers have the lowest bias (as select_condensers picks them): unforced, the
    # biased top-k never selects them, so the ablation removes their contribution.
    biases = {1: torch.tensor([0.1, 0.0, -2.0, 0.2, 0.0, 0.1]),
              2: torch.tensor([0.0, 0.1, 0.0, -0.1, 0.2, -2.0])}
    write_routing_file(hf_dir, method, biases)
    routed = tmp_path / "routed"
    shutil.copytree(hf_dir, routed)
    write_routing_file(routed, make_method("condenser", num_condensers=1, force_condensers=False,
                                           decisions={"condensers": {1: [2], 2: [5]}}), biases)
    answers = outputs(str(routed), QUESTIONS)
    assert answers != outputs(str(hf_dir), QUESTIONS), "the forcing changed no answer: vacuous"
    write_gsm8k(tmp_path / "data", QUESTIONS, answers)

    report = ablation.run(namespace(ablation, out=tmp_path / "out", hf=hf_dir, tasks="gsm8k",
                                    data_dir=tmp_path / "data", max_new_tokens=MAX_NEW_TOKENS,
                                    device="cpu"))
    assert report["without"]["average"] == evaluate_accuracy(routed, tmp_path / "data",
                                                             tmp_path / "w.json") == 1.0
    assert report["with"]["average"] == evaluate_accuracy(hf_dir, tmp_path / "data",
                                                          tmp_path / "f.json")
    assert report["drop"] == report["with"]["average"] - report["without"]["average"]
    assert report["condensers"] == {"1": [2], "2": [5]}
    assert report["slots"] == {"with": {1: 2, 2: 2}, "without": {1: 2, 2: 2}}  # paper mode: k
    assert_png(report["figures"], "ablation.png")


def test_ablation_refuses_a_model_without_condensers(tmp_path):
    hf_dir = make_tiny_hf("qwen2_moe", tmp_path / "hf")
    with pytest.raises(ValueError, match="no megatron_ec_routing.json"):
        ablation.without_forcing(str(hf_dir))
