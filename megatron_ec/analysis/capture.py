"""What every MoE block of an HF model saw and did in one forward: router logits, selection,
routed output.

Forward hooks on each MoE block (found by the family's ``GateAdapter``), its gate and its
experts module record, per block call:

- ``logits_TE``: the router logits in fp32, recomputed from the gate's input and weight (and the
  router's own linear bias, GPT-OSS) exactly as ``RestoredGate`` computes them; the stock HF gates
  return probabilities rather than logits in some families, so their output is not used;
- ``weights_TK`` / ``ids_TK``: the gate weights and expert ids the block handed its experts;
- ``routed_TH``: the experts module's output, sum_{e in S(t)} g_t,e E_e(h_t) (shared experts
  excluded);
- ``block_input``: the block's input, kept only when asked (to replay it through another model's
  block).

Shape legend: T tokens (batch x sequence, flattened as the blocks flatten them), E routed
experts, K gate slots, H hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class BlockRecord:
    """One MoE block call."""

    logits_TE: torch.Tensor | None = None
    weights_TK: torch.Tensor | None = None
    ids_TK: torch.Tensor | None = None
    routed_TH: torch.Tensor | None = None
    block_input: torch.Tensor | None = None


def moe_blocks(model) -> tuple[dict[int, torch.nn.Module], str]:
    """({decoder layer: MoE block}, the gate's attribute name) of an HF ``*ForCausalLM``."""
    from megatron_ec.models.family import get_family

    adapter = get_family(model.config.model_type).hf_gate
    if adapter is None:
        raise ValueError(f"model_type {model.config.model_type!r}: its family has no HF gate "
                         "adapter, so its MoE blocks cannot be found")
    blocks = adapter.blocks(model)
    if not blocks:
        raise ValueError(f"model_type {model.config.model_type!r}: no MoE block found")
    return blocks, adapter.gate_attr


def router_logits(gate: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits [T, E] of a gate (stock or ``RestoredGate``) on its input."""
    weight = gate.weight
    bias = getattr(gate, "bias", None)
    hidden_TH = hidden.reshape(-1, weight.shape[1]).float()
    return F.linear(hidden_TH, weight.float(), None if bias is None else bias.float())


class MoERecorder:
    """Records each MoE block's calls while active (``with MoERecorder(model) as rec:``).

    Args:
        model: an HF ``*ForCausalLM`` of a supported family.
        keep_routed: record the experts' output (costs [T, H] per block).
        keep_inputs: record the block's input (costs [T, H] per block).
    """

    def __init__(self, model, keep_routed: bool = False, keep_inputs: bool = False):
        self.blocks, self.gate_attr = moe_blocks(model)
        self.keep_routed, self.keep_inputs = keep_routed, keep_inputs
        self.records: dict[int, BlockRecord] = {}
        self._handles: list = []

    def __enter__(self) -> MoERecorder:
        for layer, block in self.blocks.items():
            self._handles += self._hook_block(layer, block)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        self.records = {}

    def _record(self, layer: int) -> BlockRecord:
        return self.records.setdefault(layer, BlockRecord())

    def _hook_block(self, layer: int, block: torch.nn.Module) -> list:
        def on_gate(module, args, output):
            record = self._record(layer)
            record.logits_TE = router_logits(module, args[0]).detach()
            record.weights_TK = output[1].detach().reshape(record.logits_TE.shape[0], -1)
            record.ids_TK = output[2].detach().reshape(record.logits_TE.shape[0], -1)

        def on_experts(module, args, output):
            if self.keep_routed:
                routed = output[0] if isinstance(output, tuple) else output
                self._record(layer).routed_TH = routed.detach().reshape(-1, routed.shape[-1])

        def before_block(module, args):
            if self.keep_inputs:
                self._record(layer).block_input = args[0].detach()

        return [getattr(block, self.gate_attr).register_forward_hook(on_gate),
                block.experts.register_forward_hook(on_experts),
                block.register_forward_pre_hook(before_block)]


def forward(model, batch) -> None:
    """One no-grad forward of a padded batch (recorders collect what they hook)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
              use_cache=False)
