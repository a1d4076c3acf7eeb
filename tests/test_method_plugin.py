"""A method defined only here registers itself and runs through the whole chain unchanged:
`megatron_ec.finetune` -> checkpoint -> `checkpoint_convert export` -> HF restore (and verify).

The toy is bias routing with the router's weight frozen: it reuses the bias method's routing and
adds only `set_trainable`, so after training the router weight is the starting one while the bias
has moved and the other weights have changed. No library file names it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import yaml

from megatron_ec.moe import state as router_ops
from megatron_ec.moe.methods import register
from megatron_ec.moe.methods.bias import BiasConfig, BiasRouting
from megatron_ec.training.metrics import read_metrics
from tests.convert_testing import TOL
from tests.harness import run_on_ranks
from tests.test_finetune_support import demo_start  # noqa: F401

TOY = "frozen_router_bias"
STEPS = 3


@dataclass(frozen=True)
class FrozenRouterBiasConfig(BiasConfig):
    """Bias routing whose router weight does not train."""

    name: str = TOY


@register
class FrozenRouterBias(BiasRouting):
    """Bias routing (selection on s + b, b moves each step) with `router.weight` frozen."""

    name = TOY
    Config = FrozenRouterBiasConfig

    def set_trainable(self, model: torch.nn.Module) -> None:
        for router in router_ops.ec_routers(model):
            router.weight.requires_grad_(False)


def finetune_export_verify(config: str, ckpt: str, hf_out: str) -> float:
    """One rank: train with the toy through the CLI entry point, export, compare logits."""
    from checkpoint_convert.exporter import export_hf
    from checkpoint_convert.verify import verify
    from megatron_ec import finetune

    assert finetune.main(["--config", config]) == 0
    export_hf(ckpt, hf_out)
    return verify(hf_out, ckpt)


def _tensors(iteration) -> dict[str, torch.Tensor]:
    """The tensors of a torch_dist weights directory, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = iteration.parent / f"{iteration.name}_weights.pt"
    dcp_to_torch_save(str(iteration / "weights"), str(flat))
    return {name: t for name, t in torch.load(flat).items() if isinstance(t, torch.Tensor)}


def test_a_toy_method_runs_through_finetune_export_and_hf_restore(
        demo_start, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from megatron_ec.eval.hf_routing import read_routing_file, restore_condenser_routing
    from megatron_ec.models import ckpt_dir
    from megatron_ec.moe.methods.saved import load_method

    checkpoint, train = demo_start
    out, hf_out = tmp_path / "toy", tmp_path / "hf"
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"checkpoint": str(checkpoint)},
        "data": {"train": str(train), "seq_length": 256, "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": STEPS, "micro_batch_size": 4, "global_batch_size": 4, "lr": 3e-3},
        "method": {"name": TOY, "gamma": 1e-2},
        "output": {"dir": str(out), "tensorboard": False},
    }))
    (diff,) = run_on_ranks(finetune_export_verify, world_size=1,
                           args=(str(config), str(out), str(hf_out)), timeout=900)
    assert diff < TOL  # verify's limit: the HF restore routes like the Megatron model

    assert [r["phase"] for r in read_metrics(out / "metrics.jsonl")] == [TOY] * STEPS
    trained = ckpt_dir.latest_iteration(out)
    assert isinstance(load_method(trained), FrozenRouterBias)
    before, after = _tensors(ckpt_dir.resolve(checkpoint)), _tensors(trained)
    weights = [name for name in after if name.endswith("router.weight")]
    assert weights and all(torch.equal(after[n], before[n]) for n in weights), "router trained"
    assert any(after[n].abs().max() > 0 for n in after if n.endswith("selection_bias"))
    assert not torch.equal(after["embedding.word_embeddings.weight"],
                           before["embedding.word_embeddings.weight"]), "nothing trained"

    method, _ = read_routing_file(hf_out)
    assert isinstance(method, FrozenRouterBias)
    model = AutoModelForCausalLM.from_pretrained(hf_out, dtype=torch.float32)
    assert restore_condenser_routing(model, hf_out) == len(weights)
