"""DenseMixer and ESFT on HF-converted tiny models of the paper's families (one launch).

A tiny random HF checkpoint of Qwen2-MoE, Qwen3-MoE and GPT-OSS (`tools/make_tiny_hf.py`) and of
OLMoE (`tests/family_parity.save_reference`) goes through `checkpoint_convert` import; the
imported checkpoint is then loaded with each method:
- DenseMixer: the forward equals SFT's bitwise, the router gradient differs (dense), one SGD step
  moves the routers; the converted model's first MoE layer, on the hidden states the model feeds
  it, equals (output, input, router, expert and shared-expert gradients; FP32_ORACLE) the
  `densemixer` package's patched forward of that family on a stand-in block of the same weights,
  and for GPT-OSS (which the package does not patch: biased experts, clamped SwiGLU, softmax over
  the k selected logits) the straight-through formula (`moe/densemixer.densemixer_combine`,
  itself checked against a naive loop) on the layer's own router weights and expert modules.
- ESFT: the scoring pass's selection = a naive loop over the frozen converted model's routing;
  after an AdamW step (weight decay) exactly the selected experts changed.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.harness import run_on_ranks
from tests.tolerance import FP32_ORACLE, assert_all_close_scaled

FAMILIES = ("qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")
PACKAGE_FAMILIES = ("qwen2_moe", "qwen3_moe", "olmoe")
TOP_P = 0.5
_EXPERT = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.")


def _write_hf(family: str, out: str) -> None:
    if family == "olmoe":
        from tests.family_parity import save_reference
        from tests.test_family_olmoe import olmoe_config

        save_reference(olmoe_config(), out)
    else:
        from tools.make_tiny_hf import make_tiny_hf

        make_tiny_hf(family, out)


def _load(ckpt: str, method):
    """(model, TransformerConfig, model config) of the imported checkpoint, built for `method`."""
    from checkpoint_convert.model import open_checkpoint
    from megatron_ec.models import ckpt_dir
    from megatron_ec.models.assembly import assemble_model
    from megatron_ec.models.builder import RuntimeOptions
    from megatron_ec.models.dist_ckpt import load_model_weights
    from megatron_ec.models.family import get_family
    from megatron_ec.parallel import ParallelConfig
    from tests.tiny import SEQ

    iteration, meta, cfg, _ = open_checkpoint(ckpt)
    model, tcfg = assemble_model(cfg, method, ParallelConfig(), RuntimeOptions(seq_length=SEQ),
                                 family=get_family(meta["family"]), initialize=False)
    load_model_weights(model, iteration / ckpt_dir.WEIGHTS)
    return model, tcfg, cfg


def _first_moe_layer(model):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return next(m for m in model.decoder.layers if isinstance(m.mlp, MoELayer)).mlp


def _densemixer(ckpt: str, family: str) -> dict:
    from megatron_ec.moe.methods import make_method
    from megatron_ec.training.distributed import wrap_ddp
    from tests.test_method_densemixer import FAMILIES as PACKAGE
    from tests.test_method_densemixer import StandInBlock, _package_names
    from tests.tiny import forward_loss, sgd_step, start_phase, tiny_batch

    sft, _, _ = _load(ckpt, make_method("sft"))
    method = make_method("densemixer")
    dense, tcfg, cfg = _load(ckpt, method)
    batch = tiny_batch(seed=0, vocab=cfg.vocab_size)
    layer = _first_moe_layer(dense)
    seen = []
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    losses = []
    for model in (sft, dense):
        model.train()
        losses.append(forward_loss(model, batch))
        losses[-1].backward()
    hook.remove()
    routers = {n: (p.grad.clone(), dict(sft.named_parameters())[n].grad)
               for n, p in dense.named_parameters() if n.endswith("router.weight")}
    dense.zero_grad(set_to_none=True)

    # the oracle on the converted layer, fed the hidden states the model gives it
    probe_SBH = torch.randn(seen[0].shape, generator=torch.Generator().manual_seed(1))
    ours_in = seen[0].clone().requires_grad_()
    ours, _ = layer(ours_in)
    (ours * probe_SBH).sum().backward()
    got = {"output": ours.detach(), "hidden": ours_in.grad}
    got.update({n: p.grad.clone() for n, p in layer.named_parameters()})
    dense.zero_grad(set_to_none=True)
    if family in PACKAGE_FAMILIES:
        block = StandInBlock(layer, cfg)
        theirs_in = seen[0].transpose(0, 1).contiguous().requires_grad_()
        theirs = PACKAGE[family][0](block, theirs_in)[0]
        (theirs * probe_SBH.transpose(0, 1)).sum().backward()
        stand_in = dict(block.named_parameters())
        want = {"output": theirs.detach().transpose(0, 1), "hidden": theirs_in.grad.transpose(0, 1)}
        for name, theirs_names in _package_names(cfg).items():
            want[name] = torch.cat([stand_in[n].grad for n in theirs_names])
    else:
        want = _straight_through_oracle(layer, seen[0], probe_SBH, cfg.topk)
    got = {name: got[name] for name in want}

    start_phase(dense, method)
    before = {n: p.detach().clone() for n, p in dense.named_parameters() if "router" in n}
    ddp = wrap_ddp(dense, tcfg)
    step_loss, _ = sgd_step(ddp, dense, tiny_batch(seed=1, vocab=cfg.vocab_size), lr=0.05)
    moved = [n for n, p in dense.named_parameters() if n in before
             and not torch.equal(p.detach(), before[n])]
    return {"losses": [loss.detach() for loss in losses], "routers": routers, "got": got,
            "want": want, "shared": bool(cfg.shared_expert_size), "step_loss": step_loss.item(),
            "router_names": sorted(before), "moved": moved}


def _straight_through_oracle(layer, hidden_SBH, probe_SBH, topk: int) -> dict:
    """DenseMixer's layer output and gradients from the formula, for a softmax-over-the-top-k
    router with a bias (GPT-OSS): p = softmax over all logits, y = densemixer_combine (ratio
    rule), computed with the layer's router tensors and its expert modules run one by one."""
    import torch.nn.functional as F

    from megatron_ec.moe.densemixer import densemixer_combine

    hidden_TH = hidden_SBH.reshape(-1, hidden_SBH.shape[-1]).clone().requires_grad_()
    router = layer.router
    logits_TE = F.linear(hidden_TH.float(), router.weight.float(), router.bias.float())
    slots_TK = logits_TE.topk(topk, dim=-1).indices
    routing_map_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter(1, slots_TK, True)
    ones_T = hidden_TH.new_ones(hidden_TH.shape[0])
    outputs_ETH = torch.stack([expert(hidden_TH, ones_T)[0]
                               for expert in layer.experts.local_experts])
    gates_TK = torch.softmax(logits_TE.gather(1, slots_TK), dim=-1)
    sparse_TH = torch.einsum("tk,tkh->th", gates_TK,
                             outputs_ETH.permute(1, 0, 2).gather(
                                 1, slots_TK[..., None].expand(-1, -1, outputs_ETH.shape[-1])))
    output_TH = densemixer_combine(sparse_TH.detach(), outputs_ETH, torch.softmax(logits_TE, -1),
                                   routing_map_TE, renormalise_dense=True)
    layer.zero_grad(set_to_none=True)
    (output_TH * probe_SBH.reshape(output_TH.shape)).sum().backward()
    want = {"output": output_TH.detach().view(hidden_SBH.shape),
            "hidden": hidden_TH.grad.view(hidden_SBH.shape)}
    want.update({n: p.grad.clone() for n, p in layer.named_parameters()})
    layer.zero_grad(set_to_none=True)
    return want


def _esft(ckpt: str) -> dict:
    from megatron_ec.models.layout import full_tensors
    from megatron_ec.moe import state
    from megatron_ec.moe.methods import PhaseStart, make_method
    from megatron_ec.training.config import TrainConfig
    from megatron_ec.training.distributed import finalize_grads, wrap_ddp
    from megatron_ec.training.loop import forward_backward
    from megatron_ec.training.optimizer import build_optimizer
    from tests.test_method_esft import _naive_scores, _naive_select, _record_routing
    from tests.tiny import tiny_batch

    method = make_method("esft", top_p=TOP_P)
    model, tcfg, cfg = _load(ckpt, method)
    scoring = [tiny_batch(seed=10 + i, vocab=cfg.vocab_size) for i in range(2)]
    token, _ = _naive_scores(_record_routing(model, scoring), cfg.num_experts)
    naive = {layer: _naive_select(scores, TOP_P) for layer, scores in token.items()}
    model.train()
    method.begin_phase(PhaseStart(model, make_method("sft"), resumed=False,
                                  micro_batches=lambda: iter(scoring)))
    method.set_trainable(model)
    before = full_tensors(model)
    ddp = wrap_ddp(model, tcfg)
    optimizer = build_optimizer(ddp, TrainConfig(lr=1e-3, weight_decay=0.1, adam_eps=1e-6))
    ddp.zero_grad_buffer()
    forward_backward(ddp, [tiny_batch(seed=3, vocab=cfg.vocab_size)], method)
    finalize_grads(ddp)
    method.after_backward(model)
    optimizer.step()
    method.after_optimizer_step(model)
    after = full_tensors(model)
    assert len(state.ec_routers(model)) == len(token)
    return {"selected": method.decisions.experts, "naive": naive,
            "changed": sorted(n for n in after if not torch.equal(after[n], before[n])),
            "names": sorted(after)}


def families_worker(root: str) -> dict:
    """Per family: write the tiny HF model, import it, run DenseMixer and ESFT on the import."""
    from checkpoint_convert.importer import import_hf
    from megatron_ec.parallel import ParallelConfig, init_parallel

    results = {}
    for family in FAMILIES:
        hf_dir, ckpt = f"{root}/{family}_hf", f"{root}/{family}_ckpt"
        _write_hf(family, hf_dir)
        import_hf(hf_dir, ckpt)
        init_parallel(ParallelConfig(), seed=5)
        results[family] = {"densemixer": _densemixer(ckpt, family), "esft": _esft(ckpt)}
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("method_families")
    return run_on_ranks(families_worker, world_size=1, args=(str(root),), timeout=600)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_densemixer_on_the_converted_model(results, family):
    result = results[family]["densemixer"]
    sft_loss, dense_loss = result["losses"]
    assert torch.equal(sft_loss, dense_loss)  # the forward is the top-k forward, bitwise
    assert result["routers"]
    for name, (dense, sft) in result["routers"].items():
        assert not torch.equal(dense, sft), f"{family} {name}: no dense router gradient"
    assert_all_close_scaled(result["got"], result["want"], FP32_ORACLE,
                            f"{family}: converted MoE layer vs its oracle")
    assert ("shared_experts.linear_fc1.weight" in result["got"]) == result["shared"]
    assert any(name.startswith("experts.") for name in result["got"])
    assert result["want"]["router.weight"].abs().min() > 0  # dense: every expert's row moves
    assert torch.isfinite(torch.tensor(result["step_loss"]))
    assert sorted(result["moved"]) == result["router_names"], "a DenseMixer step left a router"


@pytest.mark.parametrize("family", FAMILIES)
def test_esft_scores_and_trains_the_converted_model(results, family):
    result = results[family]["esft"]
    assert result["selected"] == result["naive"]
    selected = {(layer, e) for layer, ids in result["selected"].items() for e in ids}
    assert selected and len(selected) < sum(
        1 for n in result["names"] if _EXPERT.match(n) and n.endswith("linear_fc2.weight"))
    for name in result["names"]:
        match = _EXPERT.match(name)
        trains = match is not None and (int(match.group(1)), int(match.group(2))) in selected
        assert (name in result["changed"]) == trains, f"{family} {name}: trains={trains}"

