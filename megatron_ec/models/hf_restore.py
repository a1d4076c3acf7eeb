"""A trained method's routing in a stock transformers model, restored from an exported directory.

`checkpoint_convert export` writes the method record and every MoE layer's fp32 selection bias
to `megatron_ec_routing.json` (`megatron_ec.moe.methods.saved`). `restore_condenser_routing`
asks the method how its routers route (the routing rule, bias or not, forced condensers) and
installs the family's `hf_gate` adapter accordingly, so the HF model gives Megatron's logits.
A method that keeps the family's routing (SFT), or no file, leaves the model untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_ec.models.family import get_family
from megatron_ec.moe.methods import Method
from megatron_ec.moe.methods.saved import ROUTING_FILE, read_routing_file


def _layer_routing(method: Method, biases: dict[int, torch.Tensor], layer: int):
    """(bias or None, forced condensers or None) of one layer, as `ECRouter` uses them."""
    if not method.router_policy().select_with_bias:
        return None, method.forced_condensers(layer) or None
    if layer not in biases:
        raise ValueError(f"{ROUTING_FILE}: method {method.name!r} but no selection_bias for "
                         f"MoE layer {layer}; re-export the checkpoint")
    return biases[layer], method.forced_condensers(layer) or None


def restore_condenser_routing(hf_model, hf_dir: str | Path) -> int:
    """Make a stock HF MoE model route like the Megatron checkpoint it was exported from.

    Args:
        hf_model: a transformers `*ForCausalLM` loaded from `hf_dir`.
        hf_dir: the directory `checkpoint_convert export` wrote.

    Returns:
        The number of MoE blocks whose router was replaced (0: no file, or a method that keeps
        the family's routing).

    Raises:
        ValueError: unsupported model_type, an unreadable routing file, or a routing state that
            does not fit the model (missing bias, condenser ids out of range).
    """
    saved = read_routing_file(hf_dir)
    if saved is None:
        return 0
    return restore_routing(hf_model, *saved)


def restore_routing(hf_model, method: Method, biases: dict[int, torch.Tensor]) -> int:
    """`restore_condenser_routing` from a method and its biases rather than a directory (e.g.
    a method whose config an analysis changed); same return value and errors."""
    if not method.changes_routing():
        return 0
    family = get_family(hf_model.config.model_type)
    if family.hf_gate is None:
        raise ValueError(f"restore_condenser_routing: the {family.model_type} family has no "
                         "HF gate adapter (Family.hf_gate)")
    routing_cfg = method.routing(family.to_model_config(hf_model.config).moe_facts())
    blocks = family.hf_gate.blocks(hf_model)
    for layer, block in blocks.items():
        family.hf_gate.install(block, routing_cfg, *_layer_routing(method, biases, layer))
    return len(blocks)
