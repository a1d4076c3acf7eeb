"""`python -m megatron_ec.analyze` on tiny exported models: each analysis against a naive loop
(one conversation at a time, no padding, no batching), each PNG opened and checked."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from megatron_ec import analyze

LIMIT = 4


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny Qwen2-MoE base; a "fine-tuned" copy whose MoE experts and routers moved, with
    condenser routing (bias + J) recorded; the training data."""
    from safetensors.torch import load_file, save_file

    from megatron_ec.eval.hf_routing import write_routing_file
    from megatron_ec.moe.methods import make_method
    from tools.make_demo_data import write_demo_data
    from tools.make_tiny_model import make_tiny_qwen2_moe

    root = tmp_path_factory.mktemp("analyze")
    train, _ = write_demo_data(str(root / "demo"), num_train=20, num_heldout=1)
    base = make_tiny_qwen2_moe(str(root / "base"), [train], seed=3)
    tuned = root / "tuned"
    shutil.copytree(base, tuned)
    weights = load_file(str(tuned / "model.safetensors"))
    generator = torch.Generator().manual_seed(1)
    for name, tensor in weights.items():
        if ".mlp.experts." in name or name.endswith(".mlp.gate.weight"):
            noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
            weights[name] = tensor + 0.3 * tensor.std() * noise
    save_file(weights, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    method = make_method("condenser", num_condensers=1,
                         decisions={"condensers": {0: [3], 1: [5]}})
    write_routing_file(str(tuned), method, {layer: torch.randn(8, generator=generator)
                                            for layer in (0, 1)})
    return {"base": str(base), "tuned": str(tuned), "data": train, "root": root}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = analyze.main(argv)
    return code, capsys.readouterr().err


def assert_png(path) -> None:
    """A real picture: a sensible size and more than a few colours."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 300, path
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 30, (path, len(colours or []))


def per_conversation(hf_dir: str, data: str):
    """(model, [(layer -> experts' (input, ids, weights, output)) per conversation]) from a
    loop of batch-1 forwards, hooks on the experts modules only."""
    from megatron_ec.analysis import inputs

    loaded = inputs.load_model(hf_dir, "cpu")
    rows = inputs.token_rows(loaded.encoder, data, LIMIT, 512)
    blocks = {i: layer.mlp for i, layer in enumerate(loaded.model.model.layers)
              if hasattr(layer.mlp, "experts")}
    seen = []

    def hook(layer):
        def record(module, args, output):
            seen[-1][layer] = (args[0], args[1], args[2], output)
        return record

    handles = [block.experts.register_forward_hook(hook(i)) for i, block in blocks.items()]
    with torch.no_grad():
        for row in rows:
            seen.append({})
            loaded.model(input_ids=torch.tensor([row]))
    for handle in handles:
        handle.remove()
    return loaded.model, seen


@pytest.fixture(scope="module")
def naive(dirs):
    """`per_conversation` of the base and the fine-tuned model, run once for the module."""
    return {name: per_conversation(dirs[name], dirs["data"]) for name in ("base", "tuned")}


def test_a_missing_subcommand_module_and_bad_input_fail_in_one_line(tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.setattr(analyze, "SUBCOMMANDS", analyze.SUBCOMMANDS + ("not_built",))
    code, err = run_cli(["not_built", "--out", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "megatron_ec.analysis.not_built" in err
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"instruction": "2 + 2?", "output": "4"}) + "\n")
    code, err = run_cli(["activation", "--models", str(tmp_path / "none"), "--data", str(data),
                         "--out", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "--models" in err
    assert "config.json" in err and "checkpoint" in err
    code, err = run_cli(["activation", "--models", str(tmp_path), "--data", "x.jsonl",
                         "--out", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "--data x.jsonl" in err
    code, err = run_cli(["grad_norms", "--runs", str(tmp_path), "--out", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "expert_grad_norms.jsonl" in err


def test_activation_counts_match_a_per_conversation_loop(dirs, naive, tmp_path, capsys):
    out = tmp_path / "activation"
    code, err = run_cli(["activation", "--models", dirs["base"], dirs["tuned"], "--labels",
                         "SFT", "EC", "--data", dirs["data"], "--limit", str(LIMIT),
                         "--batch-size", "4", "--out", str(out)], capsys)
    assert code == 0, err
    report = json.loads((out / "activation.json").read_text())
    for model_report, name in zip(report["models"], ("base", "tuned")):
        _, seen = naive[name]
        for layer, summary in model_report["layers"].items():
            counts, tokens = [0] * 8, 0
            for conversation in seen:
                _, ids, weights, _ = conversation[int(layer)]
                tokens += ids.shape[0]
                for row_ids, row_weights in zip(ids.tolist(), weights.tolist()):
                    for expert in {e for e, w in zip(row_ids, row_weights) if w != 0}:
                        counts[expert] += 1
            assert summary["tokens"] == tokens and summary["counts"] == counts, layer
    ec = report["models"][1]
    assert ec["condensers"] == {"0": [3], "1": [5]} and ec["method"] == "condenser"
    for layer, (condenser,) in ((0, [3]), (1, [5])):  # forced: every token activates it
        summary = ec["layers"][str(layer)]
        assert summary["counts"][condenser] == summary["tokens"]
    assert ec["mean_gini"] > report["models"][0]["mean_gini"]
    assert sorted(report["figures"]) == sorted(
        str(out / name) for name in ("activation_SFT.png", "activation_EC.png",
                                     "activation_compare.png"))
    for figure in report["figures"]:
        assert_png(figure)


def _naive_divergence(naive) -> dict[int, tuple[float, float]]:
    """{layer: (mean KL, relative output divergence)} with each model on its own hidden states."""
    (base_model, base_seen), (tuned_model, tuned_seen) = naive["base"], naive["tuned"]
    result = {}
    for layer in base_seen[0]:
        kl = diff = norm = 0.0
        tokens = 0
        gates = [m.model.layers[layer].mlp.gate.weight for m in (base_model, tuned_model)]
        for base_conv, tuned_conv in zip(base_seen, tuned_seen):
            (h_b, _, _, y_b), (h_t, _, _, y_t) = base_conv[layer], tuned_conv[layer]
            logits_b, logits_t = (h_b.double() @ gates[0].double().T).tolist(), (
                h_t.double() @ gates[1].double().T).tolist()
            for lb, lt, yb, yt in zip(logits_b, logits_t, y_b.tolist(), y_t.tolist()):
                zb, zt = sum(math.exp(v) for v in lb), sum(math.exp(v) for v in lt)
                kl += sum(math.exp(b) / zb * (b - math.log(zb) - t + math.log(zt))
                          for b, t in zip(lb, lt))
                diff += math.sqrt(sum((a - b) ** 2 for a, b in zip(yt, yb)))
                norm += math.sqrt(sum(a * a for a in yb))
                tokens += 1
        result[layer] = (kl / tokens, diff / norm)
    return result


def test_router_kl_and_output_divergence_match_a_loop(dirs, naive, tmp_path, capsys):
    reports = {}
    for mode in ("own", "base"):
        out = tmp_path / mode
        code, err = run_cli(["router_kl", "--base", dirs["base"], "--models", dirs["tuned"],
                             dirs["base"], "--labels", "EC", "same", "--data", dirs["data"],
                             "--limit", str(LIMIT), "--batch-size", "4", "--inputs", mode,
                             "--out", str(out)], capsys)
        assert code == 0, err
        reports[mode] = json.loads((out / "router_kl.json").read_text())
        for figure in reports[mode]["figures"]:
            assert_png(figure)
    for layer, (kl, relative) in _naive_divergence(naive).items():
        got = reports["own"]["models"][0]["layers"][str(layer)]
        # fp32 forwards, batched and padded vs one at a time: fp32 noise, relative
        assert math.isclose(got["router_kl"], kl, rel_tol=1e-4), (layer, got, kl)
        assert math.isclose(got["output_relative"], relative, rel_tol=1e-4), (layer, got)
        assert kl > 1e-4 and relative > 1e-3
    for mode in ("own", "base"):  # the base against itself
        same = reports[mode]["models"][1]["layers"].values()
        assert all(s["router_kl"] < 1e-9 and s["output_relative"] < 1e-6 for s in same)
    # Only MoE blocks differ: the first MoE layer sees the same input in both modes, later
    # layers do not.
    first, second = (reports[m]["models"][0]["layers"] for m in ("own", "base"))
    assert math.isclose(first["0"]["router_kl"], second["0"]["router_kl"], rel_tol=1e-5)
    assert not math.isclose(first["1"]["router_kl"], second["1"]["router_kl"], rel_tol=1e-3)


def test_pearson_gain_matches_a_loop_over_the_weight_files(dirs, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "pearson"
    code, err = run_cli(["pearson", "--base", dirs["base"], "--models", dirs["tuned"],
                         dirs["base"], "--labels", "EC", "SFT", "--condensers-from",
                         dirs["tuned"], "--out", str(out)], capsys)
    assert code == 0, err
    report = json.loads((out / "pearson.json").read_text())
    files = [load_file(f"{d}/model.safetensors") for d in (dirs["base"], dirs["tuned"])]

    def pearson(weights, layer, i, j):
        a = weights[f"model.layers.{layer}.mlp.experts.{i}.down_proj.weight"].flatten().tolist()
        b = weights[f"model.layers.{layer}.mlp.experts.{j}.down_proj.weight"].flatten().tolist()
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
        return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))

    layer_means = []
    for layer, condenser in ((0, 3), (1, 5)):
        gains = [100 * (pearson(files[1], layer, condenser, j) - pearson(files[0], layer,
                                                                         condenser, j))
                 / abs(pearson(files[0], layer, condenser, j))
                 for j in range(8) if j != condenser]
        got = report["models"][0]["layers"][str(layer)]
        assert got["condensers"] == [condenser] and len(got["gain"][0]) == 7
        assert max(abs(a - b) for a, b in zip(got["gain"][0], gains)) <= 1e-6 * max(
            abs(g) for g in gains)
        layer_means.append(sum(gains) / len(gains))
    ec = report["models"][0]
    assert math.isclose(ec["mean_gain"], sum(layer_means) / 2, rel_tol=1e-6)
    assert math.isclose(ec["std_gain"], abs(layer_means[0] - layer_means[1]) / 2, rel_tol=1e-6)
    assert report["models"][1]["mean_gain"] == 0.0  # the base against itself
    for figure in report["figures"]:
        assert_png(figure)


def test_grad_norm_means_match_a_loop(tmp_path, capsys):
    records = [{"step": step, "phase": "condenser",
                "norms": {"1": [0.5 * step, 1.0, None, 2.0], "2": [3.0, 0.25 * step, 1.5, 0.0]},
                "condensers": {"1": [0], "2": [1, 2]}} for step in (10, 20, 30)]
    (tmp_path / "expert_grad_norms.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in reversed(records)))
    out = tmp_path / "out"
    code, err = run_cli(["grad_norms", "--runs", str(tmp_path), "--labels", "EC", "--out",
                         str(out)], capsys)
    assert code == 0, err
    run = json.loads((out / "grad_norms.json").read_text())["runs"][0]
    assert run["steps"] == [10, 20, 30]
    for index, record in enumerate(records):
        condenser, routed = [], []
        for layer, norms in record["norms"].items():
            for expert, norm in enumerate(norms):
                if norm is None:
                    continue
                if expert in record["condensers"][layer]:
                    condenser.append(norm)
                else:
                    routed.append(norm)
        assert math.isclose(run["condenser_mean"][index], sum(condenser) / len(condenser))
        assert math.isclose(run["routed_mean"][index], sum(routed) / len(routed))
    assert run["per_layer"]["2"]["condenser"][0] == (0.25 * 10 + 1.5) / 2
    assert_png(out / "grad_norms.png")


def test_a_megatron_checkpoint_is_exported_first(dirs, tmp_path, capsys):
    """The fine-tuned model as a megatron_ec checkpoint (imported, with its condenser routing):
    exported into OUT/exported/ and analysed like its HF directory (a bitwise round trip)."""
    from checkpoint_convert.importer import import_hf

    ckpt = tmp_path / "megatron"
    import_hf(dirs["tuned"], ckpt)
    reports = []
    for name, model in (("hf", dirs["tuned"]), ("megatron", str(ckpt))):
        out = tmp_path / name
        code, err = run_cli(["pearson", "--base", dirs["base"], "--models", model, "--labels",
                             "EC", "--out", str(out)], capsys)
        assert code == 0, err
        reports.append(json.loads((out / "pearson.json").read_text())["models"][0])
    assert (tmp_path / "megatron" / "exported").is_dir()
    assert reports[1]["dir"].startswith(str(tmp_path / "megatron" / "exported"))
    assert reports[0]["layers"] == reports[1]["layers"]  # condensers and gains alike
