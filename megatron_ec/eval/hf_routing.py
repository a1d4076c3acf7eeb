"""ExpertCondenser routing in a stock transformers model, restored from an exported directory.

`checkpoint_convert export` writes the routing state next to the HF weights in
`megatron_ec_routing.json`, a file stock transformers ignores: the method state (method, condenser
mode, r, condensers per layer, forcing) and each MoE layer's fp32 `selection_bias` (exact: a
float32 printed as a Python float round-trips bit for bit). `restore_condenser_routing(model,
dir)` then swaps the router of every MoE block for one that selects with
`megatron_ec.moe.routing.route()`, exactly as `ECRouter` does in Megatron, so the HF model gives
Megatron's logits. In reference mode a token gets k + r slots and the HF experts compute all of
them. Method "sft" (or no file) leaves the model untouched.

Block adapters are registered per HF `model_type`. In transformers 5.23 every supported family's
MoE block calls its router (`self.gate`; GPT-OSS: `self.router`, which also has a bias)
`(hidden) -> (router_logits, weights [T, K], expert ids [T, K])` and hands the last two to its
experts module, which accepts any K; one adapter swaps that router.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_ec.moe.fp32_buffers import KeepsFp32Buffers
from megatron_ec.moe.method_state import MethodState
from megatron_ec.textfile import read_json

ROUTING_FILE = "megatron_ec_routing.json"
FORMAT = "megatron_ec_routing/1"


def write_routing_file(out_dir: str | Path, method: MethodState,
                       biases: dict[int, torch.Tensor]) -> Path:
    """Write the method state and the per-layer fp32 selection biases to `ROUTING_FILE`."""
    data = {
        "format": FORMAT,
        "method_state": method.to_dict(),
        "selection_bias": {str(layer): [float(x) for x in bias.to(torch.float32).tolist()]
                           for layer, bias in sorted(biases.items())},
    }
    path = Path(out_dir) / ROUTING_FILE
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def read_routing_file(hf_dir: str | Path) -> tuple[MethodState, dict[int, torch.Tensor]] | None:
    """(method state, {layer: fp32 bias}) from `hf_dir`, or None if it has no routing file."""
    path = Path(hf_dir) / ROUTING_FILE
    if not path.is_file():
        return None
    fix = "re-export the checkpoint with checkpoint_convert export"
    try:
        data = read_json(path, fix)
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror}); {fix}") from None
    try:
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
        method = MethodState.from_dict(data["method_state"])
        biases = {int(layer): torch.tensor(values, dtype=torch.float32)
                  for layer, values in data["selection_bias"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: unreadable routing state ({err}); re-export the checkpoint "
                         "with checkpoint_convert export") from None
    return method, biases


class RestoredGate(KeepsFp32Buffers, torch.nn.Module):
    """A family gate with `route()`'s selection: same weight, same (logits, weights, ids) output.

    The selection bias stays fp32 through `model.to(torch.bfloat16)`, as in `ECRouter`.
    Shape legend: T tokens, E routed experts, K slots (k, or k + r in reference mode).
    """

    fp32_buffers = ("selection_bias",)

    def __init__(self, weight: torch.nn.Parameter, routing_cfg, bias_E: torch.Tensor | None,
                 condensers: list[int] | None, fp32_weights: bool,
                 linear_bias: torch.nn.Parameter | None = None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = linear_bias
        """The router's own (trained) linear bias (GPT-OSS), not the selection bias."""
        self.routing_cfg = routing_cfg
        self.fp32_weights = fp32_weights
        self.register_buffer("selection_bias", bias_E, persistent=False)
        ids = torch.tensor(condensers or [], dtype=torch.long)
        self.register_buffer("condenser_ids", ids, persistent=False)

    def forward(self, hidden_states: torch.Tensor):
        from megatron_ec.moe.routing import route

        hidden_TH = hidden_states.reshape(-1, self.weight.shape[1])
        # Megatron's router computes the logits in fp32 (moe_router_dtype="fp32").
        bias = None if self.bias is None else self.bias.float()
        logits_TE = F.linear(hidden_TH.float(), self.weight.float(), bias)
        condensers = self.condenser_ids if self.condenser_ids.numel() else None
        probs_TE, routing_map_TE = route(logits_TE, self.routing_cfg, self.selection_bias,
                                         condensers)
        num_tokens = routing_map_TE.shape[0]
        ids_TK = routing_map_TE.nonzero()[:, 1].view(num_tokens, -1)
        weights_TK = probs_TE.gather(1, ids_TK)
        if not self.fp32_weights:
            weights_TK = weights_TK.to(hidden_states.dtype)
        return logits_TE.to(hidden_states.dtype), weights_TK, ids_TK


@dataclass(frozen=True)
class GateAdapter:
    """How to find and swap the router of one HF MoE block type."""

    block_class: str
    """Class name of the family's MoE block (e.g. "Qwen2MoeSparseMoeBlock")."""
    gate_attr: str = "gate"
    fp32_weights: bool = False
    """The family hands fp32 gate weights to its experts (Mixtral, DeepSeek) rather than casting
    them to the hidden dtype (Qwen, OLMoE)."""

    def blocks(self, hf_model) -> dict[int, torch.nn.Module]:
        """{decoder layer index: MoE block} of a `*ForCausalLM`."""
        layers = hf_model.model.layers
        return {i: layer.mlp for i, layer in enumerate(layers)
                if type(layer.mlp).__name__ == self.block_class}

    def install(self, block: torch.nn.Module, routing_cfg, bias_E, condensers) -> None:
        router = getattr(block, self.gate_attr)
        gate = RestoredGate(router.weight, routing_cfg, bias_E, condensers, self.fp32_weights,
                            getattr(router, "bias", None))
        setattr(block, self.gate_attr, gate)


ADAPTERS: dict[str, GateAdapter] = {
    "qwen2_moe": GateAdapter("Qwen2MoeSparseMoeBlock"),
    "qwen3_moe": GateAdapter("Qwen3MoeSparseMoeBlock"),
    "mixtral": GateAdapter("MixtralSparseMoeBlock", fp32_weights=True),
    "olmoe": GateAdapter("OlmoeSparseMoeBlock"),
    "deepseek_v2": GateAdapter("DeepseekV2Moe", fp32_weights=True),
    # GptOssTopKRouter: logits with its bias, scores softmaxed in the hidden dtype
    "gpt_oss": GateAdapter("GptOssMLP", gate_attr="router"),
}


def _layer_routing(method: MethodState, biases: dict[int, torch.Tensor], layer: int):
    """(bias or None, condensers or None) of one layer, as `ECRouter` uses them."""
    bias = biases.get(layer) if method.uses_bias else None
    if method.uses_bias and bias is None:
        raise ValueError(f"{ROUTING_FILE}: method {method.name!r} but no selection_bias for "
                         f"MoE layer {layer}; re-export the checkpoint")
    forced = method.name == "condenser" and method.force_condensers
    return bias, (method.condensers.get(layer) or None) if forced else None


def restore_condenser_routing(hf_model, hf_dir: str | Path) -> int:
    """Make a stock HF MoE model route like the Megatron checkpoint it was exported from.

    Args:
        hf_model: a transformers `*ForCausalLM` loaded from `hf_dir`.
        hf_dir: the directory `checkpoint_convert export` wrote.

    Returns:
        The number of MoE blocks whose router was replaced (0: no file, or method "sft").

    Raises:
        ValueError: unsupported model_type, an unreadable routing file, or a routing state that
            does not fit the model (missing bias, condenser ids out of range).
    """
    state = read_routing_file(hf_dir)
    if state is None or state[0].name == "sft":
        return 0
    method, biases = state
    model_type = hf_model.config.model_type
    if model_type not in ADAPTERS:
        raise ValueError(f"restore_condenser_routing: no block adapter for {model_type!r}; "
                         f"supported: {', '.join(sorted(ADAPTERS))}")
    from megatron_ec.models.family import get_family
    from megatron_ec.moe.router import routing_config

    model_cfg = get_family(model_type).to_model_config(hf_model.config)
    routing_cfg = routing_config(model_cfg, method)
    adapter = ADAPTERS[model_type]
    blocks = adapter.blocks(hf_model)
    for layer, block in blocks.items():
        adapter.install(block, routing_cfg, *_layer_routing(method, biases, layer))
    return len(blocks)
