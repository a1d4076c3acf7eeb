"""Specialisation losses wired into the trainer (`method.spec_losses`, moe/spec_losses.py).

Values and gradients through the trainer path (`forward_backward` with the method's
`micro_batch_loss`) equal a naive per-token float64 loop on the same tiny model; the trainer's
micro-batches carry a zero loss mask so that their gradient is the spec term alone (no task
gradient to subtract). One 2-rank launch checks both terms at EP2 (orthogonality: its outputs
travel home along the dispatcher's combine), at TP2 (sequence parallel) and at TP2 with expert
TP2 (the outputs' fc2 shards summed by the combine's reduce-scatter) against EP1, with tokens
whose experts sit on both EP ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_ec.moe import state
from megatron_ec.moe.methods import make_method
from megatron_ec.moe.methods.saved import method_from_record, method_record
from megatron_ec.moe.spec_losses import check_layout
from megatron_ec.parallel import ParallelConfig, init_parallel, shutdown_parallel
from megatron_ec.training.distributed import finalize_grads, wrap_ddp
from megatron_ec.training.loop import forward_backward
from tests.harness import run_on_ranks
from tests.test_finetune_support import demo_start  # noqa: F401 (a fixture)
from tests.tiny import build_tiny, forward_loss, tiny_batch
from tests.tolerance import FP32_LAYOUT, FP32_ORACLE, assert_all_close_scaled, assert_close_scaled

WEIGHTS = {"variance": 1.0, "orthogonality": 1.0}


def _scale_experts(model, factor: float = 10.0) -> None:
    """Routed-expert weights x factor: at init the expert outputs are so small (~1e-3) that the
    orthogonality term (~1e-7) sits at the tolerances' atol; x10 makes it O(0.1)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." in name and "shared" not in name:
                param.mul_(factor)


def _aux_only(batch):
    """The batch with a zero loss mask: the trainer's task gradient is exactly zero."""
    return {**batch, "loss_mask": torch.zeros_like(batch["loss_mask"])}


# --- config ---------------------------------------------------------------------------------

def test_config_validation():
    assert make_method("sft").config.spec_losses == {}
    method = make_method("bias", spec_losses={"variance": 1e-3, "orthogonality": 0})
    assert method.config.spec_losses == {"variance": 1e-3, "orthogonality": 0.0}
    assert method.config.to_dict()["spec_losses"] == {"orthogonality": 0.0, "variance": 1e-3}
    with pytest.raises(ValueError, match="unknown loss"):
        make_method("sft", spec_losses={"varience": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        make_method("condenser", spec_losses={"variance": -1.0})
    check_layout({"orthogonality": 1e-4}, 2, 1, "none", "allgather")  # TP2, experts local
    with pytest.raises(ValueError, match="token_dispatcher=alltoall"):
        check_layout({"orthogonality": 1e-4}, 1, 2, "none", "allgather")
    with pytest.raises(ValueError, match="expert_tensor_parallel_size=2 needs parallel.token_dis"):
        check_layout({"orthogonality": 1e-4}, 2, 1, "none", "allgather", 2)
    check_layout({"orthogonality": 1e-4}, 2, 1, "none", "alltoall", 2)
    check_layout({"orthogonality": 1e-4}, 1, 2, "none", "alltoall")
    with pytest.raises(ValueError, match="recompute=none"):
        check_layout({"variance": 1e-3}, 1, 1, "selective")
    check_layout({"variance": 1e-3}, 2, 4, "none")


def test_config_section_and_layout_error():
    from megatron_ec.training.config import FinetuneConfig
    from megatron_ec.training.config_tree import build

    data = {"model": {"checkpoint": "x"}, "data": {"train": ["x.jsonl"]}, "output": {"dir": "o"},
            "method": {"name": "sft", "spec_losses": {"variance": 1.0e-3}},
            "parallel": {"expert_model_parallel_size": 2, "token_dispatcher": "allgather"}}
    assert build(FinetuneConfig, data).method.spec_losses == {"variance": 1e-3}
    data["method"]["spec_losses"]["orthogonality"] = 1.0e-4
    with pytest.raises(ValueError, match="token_dispatcher=alltoall"):
        build(FinetuneConfig, data)


# --- one rank: trainer path vs naive loop ----------------------------------------------------

@pytest.fixture(scope="module")
def one_rank():
    init_parallel(ParallelConfig(), seed=7)
    yield
    shutdown_parallel()


def _moe_layers(model):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


def _expert_output(expert, h_H):
    """SwiGLU expert MLP on one token, float64: fc2(silu(gate) * up)."""
    gate, up = (expert.linear_fc1.weight.double() @ h_H).chunk(2)
    return expert.linear_fc2.weight.double() @ (F.silu(gate) * up)


def _naive_terms(model, batch):
    """{name: mean over MoE layers of the per-token loop} on this forward's graph."""
    hiddens = {}
    layers = _moe_layers(model)
    hooks = [layer.register_forward_pre_hook(
        lambda m, args, n=i: hiddens.__setitem__(n, args[0])) for i, layer in enumerate(layers)]
    try:
        model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
              labels=batch["labels"], padding_mask=batch["padding_mask"])
    finally:
        for hook in hooks:
            hook.remove()
    real_T = ~batch["padding_mask"].T.reshape(-1)  # [S, B] flattened, as the router sees them
    variance, ortho = [], []
    for index, layer in enumerate(layers):
        routing_map = layer.router.take_spec_record()[2]
        layer.experts.take_spec_outputs()
        h_TH = hiddens[index].reshape(-1, hiddens[index].shape[-1]).double()
        weight = layer.router.weight.double()
        var_t, ortho_t = [], []
        for t in range(h_TH.shape[0]):
            if not real_T[t]:
                continue
            p = torch.softmax(weight @ h_TH[t], dim=0)
            var_t.append(-((p - p.mean()) ** 2).mean())
            xs = [_expert_output(layer.experts.local_experts[int(e)], h_TH[t])
                  for e in routing_map[t].nonzero().flatten()]
            per_slot = []
            for j, x in enumerate(xs):
                others = torch.stack([y for i, y in enumerate(xs) if i != j], dim=1)  # [H, K-1]
                coef = torch.linalg.solve(others.T @ others, others.T @ x)
                per_slot.append((others @ coef).square().sum())
            ortho_t.append(torch.stack(per_slot).mean())
        variance.append(torch.stack(var_t).mean())
        ortho.append(torch.stack(ortho_t).mean())
    return {"variance": torch.stack(variance).mean(), "orthogonality": torch.stack(ortho).mean()}


def test_trainer_path_equals_naive_loop(one_rank):
    method = make_method("sft", spec_losses=WEIGHTS)
    model, tcfg = build_tiny(ParallelConfig(), method=method)
    _scale_experts(model)
    batches = [tiny_batch(seed=0), tiny_batch(seed=1)]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    naive = [_naive_terms(model, b) for b in batches]
    naive_value = {k: sum(n[k] for n in naive) / len(naive) for k in WEIGHTS}
    naive_loss = sum(WEIGHTS[k] * naive_value[k] for k in WEIGHTS)
    naive_grads = torch.autograd.grad(naive_loss, params, allow_unused=True)
    model.zero_grad(set_to_none=True)

    ddp = wrap_ddp(model, tcfg)
    ddp.zero_grad_buffer()
    forward_backward(ddp, [_aux_only(b) for b in batches], method)
    method.after_optimizer_step(model)
    metrics = method.metrics(model)
    for name in WEIGHTS:
        assert_close_scaled(torch.tensor(metrics[f"spec/{name}"]), naive_value[name].detach(),
                            FP32_ORACLE, f"spec/{name}")
    assert naive_value["orthogonality"] > 1e-2 and naive_value["variance"] < 0
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    got = {n: p.main_grad.clone() for n, p in zip(names, params)}
    want = {n: (g if g is not None else torch.zeros_like(p)).float()
            for n, g, p in zip(names, naive_grads, params)}
    assert any("router" in n and want[n].abs().max() > 0 for n in want)
    assert any("experts" in n and want[n].abs().max() > 0 for n in want)
    assert_all_close_scaled(got, want, FP32_ORACLE, "spec-loss gradient")


@pytest.mark.parametrize("name", ["bias", "densemixer"])
def test_other_methods_take_the_variance(one_rank, name):
    """The add-on is the base class's: a method with its own router (DenseMixer) records too."""
    method = make_method(name, spec_losses={"variance": 1.0})
    model, tcfg = build_tiny(ParallelConfig(), method=method)
    ddp = wrap_ddp(model, tcfg)
    ddp.zero_grad_buffer()
    forward_backward(ddp, [_aux_only(tiny_batch(seed=6))], method)
    method.after_optimizer_step(model)
    assert method.metrics(model)["spec/variance"] < 0
    assert all(r.weight.main_grad.abs().max() > 0 for r in state.ec_routers(model))


def test_orthogonality_is_refused_with_densemixer_experts(one_rank):
    """DenseMixer builds its own experts: the orthogonality loss is a one-line build error."""
    with pytest.raises(ValueError, match="densemixer brings its own experts"):
        build_tiny(ParallelConfig(), method=make_method(
            "densemixer", spec_losses={"orthogonality": 1.0}))


def test_unweighted_experts_keep_outputs_and_keys(one_rank):
    """The orthogonality experts return what Megatron-Core's return; same state-dict keys."""
    plain, _ = build_tiny(ParallelConfig(), method=make_method("sft"))
    spec, _ = build_tiny(ParallelConfig(), method=make_method("sft", spec_losses=WEIGHTS))
    assert type(_moe_layers(spec)[0].experts).__name__.startswith("Unweighted")
    spec.load_state_dict(plain.state_dict())  # strict: the keys are the same
    batch = tiny_batch(seed=3)
    plain.train()
    spec.train()
    assert_close_scaled(forward_loss(spec, batch).detach(), forward_loss(plain, batch).detach(),
                        FP32_ORACLE, "loss with unweighted experts")


# --- two ranks: EP2 and TP2 (sequence parallel) vs EP1 --------------------------------------

LAYOUTS = [(1, 1, 1), (1, 2, 1), (2, 1, 1), (2, 1, 2)]
LOSSES = {"variance": {"variance": 1.0}, "both": WEIGHTS}
"""(TP, EP, expert TP): variance alone and both losses at every layout."""


def _layout_worker(tmp_dir):
    from megatron.core import parallel_state as ps

    from megatron_ec.models.dist_ckpt import load_model_weights, save_model_weights
    from megatron_ec.models.layout import full_tensors

    results = {}
    for tp, ep, etp in LAYOUTS:
        parallel = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                  expert_tensor_parallel_size=etp)
        init_parallel(parallel, seed=11)
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        # the same 4 micro-batches in every layout: 2 per rank at DP2, all 4 at DP1
        seeds = range(20, 24) if dp_size == 1 else range(20 + dp_rank, 24, 2)
        batches = [_aux_only(tiny_batch(seed=s)) for s in seeds]
        for key, weights in LOSSES.items():
            method = method_from_record(method_record(make_method("sft", spec_losses=weights)))
            model, tcfg = build_tiny(parallel, method=method)
            if (tp, ep, etp) == (1, 1, 1) and key == "variance":
                _scale_experts(model)
                save_model_weights(model, f"{tmp_dir}/w")
            else:
                load_model_weights(model, f"{tmp_dir}/w")
            ddp = wrap_ddp(model, tcfg)
            model.train()
            ddp.zero_grad_buffer()
            forward_backward(ddp, batches, method)
            finalize_grads(ddp)
            method.after_optimizer_step(model)
            grads = full_tensors(model, lambda p: p.main_grad)
            split = 0
            if (tp, ep, etp) == (1, 1, 1):  # tokens whose two experts sit on different EP2 ranks
                for batch in batches:
                    forward_loss(model, batch)
                    for router in state.ec_routers(model):
                        owner = router.take_spec_record()[2].nonzero()[:, 1] // 3  # 3 per rank
                        split += int((owner.view(-1, 2).sum(dim=1) == 1).sum())
            spec = {k: v for k, v in method.metrics(model).items() if k.startswith("spec/")}
            results[(key, tp, ep, etp)] = (grads, spec, split)
    return results


def test_spec_losses_layouts_match():
    """Both terms at EP2 (DP2), TP2 (sequence parallel) and TP2 / expert TP2 equal TP1/EP1."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp_dir:
        per_rank = run_on_ranks(_layout_worker, world_size=2, args=(tmp_dir,), timeout=600)
    for key in LOSSES:
        ref_grads, ref_spec, split = per_rank[0][(key, 1, 1, 1)]
        assert split > 0, "no token has its experts on two EP ranks"
        assert set(ref_spec) == {f"spec/{name}" for name in LOSSES[key]}
        assert ref_spec.get("spec/orthogonality", 1.0) > 1e-2
        assert any("router" in n and g.abs().max() > 0 for n, g in ref_grads.items())
        for rank, results in enumerate(per_rank):
            for layout in LAYOUTS:
                grads, spec, _ = results[(key, *layout)]
                where = f"{key}, (TP, EP, ETP) {layout}, rank {rank}"
                for name, value in spec.items():
                    assert_close_scaled(torch.tensor(value), torch.tensor(ref_spec[name]),
                                        FP32_LAYOUT, f"{where}: {name}")
                assert_all_close_scaled(grads, ref_grads, FP32_LAYOUT, f"{where}: gradient")


# --- the trainer end to end: the demo's baseline recipe, phase sft, with both losses ----------

def test_finetune_logs_spec_losses(demo_start, tmp_path):  # noqa: F811
    from megatron_ec.models import ckpt_dir
    from megatron_ec.moe.methods.saved import load_method
    from megatron_ec.training.metrics import read_metrics
    from tests.test_finetune_support import REPO, run_cli

    checkpoint, train = demo_start
    out = tmp_path / "sft_spec"
    args = ["--config", str(REPO / "examples/recipes/baselines/demo.yaml"), "--phase", "sft",
            f"model.checkpoint={checkpoint}", f"data.train={train}",
            f"data.cache_dir={tmp_path / 'cache'}", f"phases.sft.output.dir={out}",
            "output.tensorboard=false", "train.max_steps=2", "train.global_batch_size=4",
            "parallel.expert_model_parallel_size=1",
            "method.spec_losses={variance: 1.0e-3, orthogonality: 1.0e-4}"]
    result = run_cli("megatron_ec.finetune", args, nproc=1, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    assert len(records) == 2
    for record in records:
        assert record["spec/variance"] < 0 < record["spec/orthogonality"]
    saved = load_method(ckpt_dir.latest_iteration(out))
    assert saved.config.spec_losses == {"variance": 1e-3, "orthogonality": 1e-4}

    refused = run_cli("megatron_ec.finetune", args[:-2] + [
        "parallel.expert_model_parallel_size=2", "parallel.token_dispatcher=allgather", args[-1]],
        nproc=1, timeout=300)
    assert refused.returncode == 2 and "needs parallel.token_dispatcher=alltoall" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
