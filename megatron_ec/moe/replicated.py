"""Replicated condensers (`method.condenser_placement: replicated`): computed where the tokens are.

Once the condenser phase starts every token visits the r condensers J. Routed, they travel the
all-to-all (r of the k slots) and make their owning EP ranks stragglers. Replicated, every rank
computes them on its own tokens, weighted by the same per-token gate weight the router gives them
(`ECRouter` hands the weights over and dispatches only the other slots), so the layer output and
every gradient are those of the routed computation; the router still gets the condensers'
gradient on every token.

Storage stays in the routed layout: the condensers' weights remain the routed experts' parameters
on their owning EP ranks (the master copy, the only one the optimizer, the checkpoints and the
export see). Each rank holds a replica (plain tensors, no parameters), filled from the owners by
`refresh_replicas` when the phase starts, after every weight load and after every optimizer step
(one all-reduce of r experts per layer). `reduce_replica_grads`, after the step's gradients are
final, sums the replicas' gradients over every rank that routed tokens (one all-reduce), scales
them as Megatron's DDP scales expert gradients (1 / data-parallel size) and adds each owner's shard
into its parameter's `main_grad`. Checkpoints, resume at another layout or placement, export and
HF restore therefore see one format by construction.

The MoE layer is Megatron-Core's `MoELayer`, subclassed through the spec's MLP seam: `route()` and
`postprocess()` call the originals and add the local term, both inside the layer's forward (so a
selective recompute recomputes it too); the dispatcher and experts are untouched.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_ec.moe.ep_counters import count_local_rows

_SEQUENTIAL = re.compile(r"^local_experts\.(\d+)\.(linear_fc[12])\.weight$")
_GROUPED = re.compile(r"^(linear_fc[12])\.weight(\d+)$")


def check_supported(config) -> None:
    """ValueError (one line) for an expert MLP the replica does not reproduce."""
    if config.add_bias_linear:
        raise ValueError("method.condenser_placement=replicated: experts with biases (GPT-OSS) "
                         "are not supported; use condenser_placement=routed")
    if getattr(config, "moe_apply_probs_on_input", False):
        raise ValueError("method.condenser_placement=replicated needs the gate weights applied "
                         "after the activation (moe_apply_probs_on_input=false)")


def local_expert_weights(experts: torch.nn.Module) -> dict[tuple[int, str], torch.nn.Parameter]:
    """{(local expert index, "linear_fc1" | "linear_fc2"): weight} of MCore's experts module
    (SequentialMLP or TE grouped naming)."""
    found = {}
    for name, param in experts.named_parameters():
        match = _SEQUENTIAL.match(name)
        if match:
            found[(int(match.group(1)), match.group(2))] = param
            continue
        match = _GROUPED.match(name)
        if match:
            found[(int(match.group(2)), match.group(1))] = param
    return found


def _etp():
    from megatron.core import parallel_state as ps

    return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()


def _shard_view(full_1: torch.Tensor, full_2: torch.Tensor, gated: bool):
    """Views of this ETP rank's shard inside full fc1 [2F or F, H] and fc2 [H, F] tensors, in the
    shard's own row order (fc1 of a gated MLP: [gate_k; up_k])."""
    rank, size = _etp()
    if gated:
        gate, up = full_1.chunk(2, dim=0)
        rows_1 = [gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]]
    else:
        rows_1 = [full_1.chunk(size, dim=0)[rank]]
    return rows_1, full_2.chunk(size, dim=1)[rank]


def _into(accumulator: torch.Tensor):
    """A post-accumulate hook moving a replica's gradient into its fp32 accumulator (so bf16
    weights still accumulate the step's micro-batches in fp32, as Megatron's main_grad does)."""
    def hook(weight: torch.Tensor) -> None:
        accumulator.add_(weight.grad.float())
        weight.grad = None
    return hook


class CondenserReplica:
    """One MoE layer's replicated condensers: full fc1/fc2 weights [r, ...] and fp32 gradients.

    Not a module: nothing here is a parameter, a buffer or part of any state dict.
    """

    def __init__(self, layer: MoELayer) -> None:
        check_supported(layer.config)
        if (0, "linear_fc1") not in local_expert_weights(layer.experts):
            raise ValueError("method.condenser_placement=replicated supports Megatron-Core's "
                             "SequentialMLP and TE grouped experts, not "
                             f"{type(layer.experts).__name__}; use condenser_placement=routed")
        self.config = layer.config
        self.ids: list[int] = []
        self.fc1: torch.Tensor | None = None  # [r, 2F or F, H]
        self.fc2: torch.Tensor | None = None  # [r, H, F]
        self.grad1: torch.Tensor | None = None  # fp32, summed over the step's micro-batches
        self.grad2: torch.Tensor | None = None

    def owned_pieces(self, layer: MoELayer, ids: list[int]):
        """(full fc1 [r, ...], full fc2 [r, ...]) in fp32 holding this rank's shards of the
        condensers it owns and zeros elsewhere: summed over EP x ETP, the full weights."""
        weights = local_expert_weights(layer.experts)
        first, count = layer.local_expert_indices[0], layer.num_local_experts
        any_fc1 = weights[(0, "linear_fc1")]
        ffn, hidden = self.config.moe_ffn_hidden_size, self.config.hidden_size
        rows = 2 * ffn if self.config.gated_linear_unit else ffn
        fc1 = torch.zeros(len(ids), rows, hidden, dtype=torch.float32, device=any_fc1.device)
        fc2 = torch.zeros(len(ids), hidden, ffn, dtype=torch.float32, device=any_fc1.device)
        for slot, expert in enumerate(ids):
            if not first <= expert < first + count:
                continue
            local = expert - first
            rows_1, view_2 = _shard_view(fc1[slot], fc2[slot], self.config.gated_linear_unit)
            shard_1 = weights[(local, "linear_fc1")].detach().float()
            for view, piece in zip(rows_1, shard_1.chunk(len(rows_1), dim=0)):
                view.copy_(piece)
            view_2.copy_(weights[(local, "linear_fc2")].detach().float())
        return fc1, fc2

    def install(self, ids: list[int], fc1: torch.Tensor, fc2: torch.Tensor, dtype) -> None:
        """Take the gathered full weights (fresh leaf tensors, so autograd sees this step's)."""
        self.ids = list(ids)
        self.fc1 = fc1.to(dtype).requires_grad_(True)
        self.fc2 = fc2.to(dtype).requires_grad_(True)
        if self.grad1 is None or self.grad1.shape != fc1.shape:
            self.grad1, self.grad2 = torch.zeros_like(fc1), torch.zeros_like(fc2)
        for weight, grad in ((self.fc1, self.grad1), (self.fc2, self.grad2)):
            weight.register_post_accumulate_grad_hook(_into(grad))

    def __call__(self, hidden_states: torch.Tensor, weights_TR: torch.Tensor) -> torch.Tensor:
        """sum_j w_tj * fc2_j(glu(fc1_j h_t)), the weight applied after the activation (as in
        Megatron-Core's expert MLP), in the hidden states' shape and dtype."""
        cfg = self.config
        hidden_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        out_TH = torch.zeros_like(hidden_TH)
        for slot in range(len(self.ids)):
            inner = hidden_TH @ self.fc1[slot].t()
            if cfg.gated_linear_unit:
                x_glu, x_linear = inner.chunk(2, dim=-1)
                if (clamp := cfg.activation_func_clamp_value) is not None:
                    x_glu, x_linear = x_glu.clamp(max=clamp), x_linear.clamp(-clamp, clamp)
                inner = cfg.activation_func(x_glu) * (x_linear + cfg.glu_linear_offset)
            else:
                inner = cfg.activation_func(inner)
            inner = (inner * weights_TR[:, slot:slot + 1]).to(hidden_TH.dtype)
            out_TH = out_TH + inner @ self.fc2[slot].t()
        return out_TH.view_as(hidden_states)


class ReplicatedCondenserMoELayer(MoELayer):
    """Megatron-Core's MoELayer plus the replicated condensers' local term (see module doc)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Bypass nn.Module registration: the replica holds no parameters and no state.
        object.__setattr__(self, "condenser_replica", CondenserReplica(self))
        self._condenser_output: torch.Tensor | None = None

    def route(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None):
        probs, routing_map = super().route(hidden_states, padding_mask)
        weights_TR = self.router.take_condenser_weights()
        self._condenser_output = None
        if weights_TR is not None:
            # Shapes only (no value read in the forward); the ids were installed with them.
            if len(self.condenser_replica.ids) != weights_TR.shape[1]:
                raise RuntimeError(f"layer {self.router.layer_index}: the replicated condensers "
                                   "are not installed; call refresh_replicas(model) after loads")
            self._condenser_output = self.condenser_replica(hidden_states, weights_TR)
            count_local_rows(self, weights_TR.numel())
        return probs, routing_map

    def postprocess(self, output: torch.Tensor, shared_expert_output):
        output = super().postprocess(output, shared_expert_output)
        local, self._condenser_output = self._condenser_output, None
        return output if local is None else output + local


def replicated_layers(model: torch.nn.Module) -> list[ReplicatedCondenserMoELayer]:
    return [m for m in model.modules() if isinstance(m, ReplicatedCondenserMoELayer)]


@torch.no_grad()
def refresh_replicas(model: torch.nn.Module) -> None:
    """Copy every replicated layer's condensers in from their owners (one all-reduce over EP x
    ETP, exact: each entry is one owner's value plus zeros). Call on every rank."""
    from megatron.core import parallel_state as ps

    layers = [layer for layer in replicated_layers(model) if layer.router.condenser_ids.numel()]
    if not layers:
        return
    ids = [layer.router.condenser_ids.tolist() for layer in layers]  # host read, off the forward
    pieces = [layer.condenser_replica.owned_pieces(layer, j) for layer, j in zip(layers, ids)]
    flat = torch.cat([t.reshape(-1) for pair in pieces for t in pair])
    if dist.is_initialized():
        dist.all_reduce(flat, group=ps.get_expert_tensor_and_model_parallel_group())
    offset = 0
    for layer, layer_ids, (fc1, fc2) in zip(layers, ids, pieces):
        full = []
        for like in (fc1, fc2):
            full.append(flat[offset:offset + like.numel()].view_as(like).clone())
            offset += like.numel()
        dtype = local_expert_weights(layer.experts)[(0, "linear_fc1")].dtype
        layer.condenser_replica.install(layer_ids, *full, dtype)


@torch.no_grad()
def reduce_replica_grads(model: torch.nn.Module) -> None:
    """Sum the replicas' gradients over every rank that routes tokens, scale by 1 / DP (Megatron's
    expert-gradient scaling) and add each owner's shard to its expert weight's `main_grad`.

    Call once per step on every rank, after `finalize_model_grads`, before the optimizer."""
    from megatron.core import parallel_state as ps

    layers = [layer for layer in replicated_layers(model) if layer.condenser_replica.ids]
    if not layers:
        return
    replicas = [layer.condenser_replica for layer in layers]
    flat = torch.cat([g.reshape(-1) for rep in replicas for g in (rep.grad1, rep.grad2)])
    if dist.is_initialized():
        dist.all_reduce(flat, group=ps.get_tensor_and_data_parallel_group(
            with_context_parallel=True))
        flat /= ps.get_data_parallel_world_size(with_context_parallel=True)
    offset = 0
    for layer, rep in zip(layers, replicas):
        full = []
        for grad in (rep.grad1, rep.grad2):
            full.append(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()
            grad.zero_()
        _add_to_owners(layer, rep.ids, *full)


def _add_to_owners(layer, ids: list[int], grad1: torch.Tensor, grad2: torch.Tensor) -> None:
    weights = local_expert_weights(layer.experts)
    first, count = layer.local_expert_indices[0], layer.num_local_experts
    for slot, expert in enumerate(ids):
        if not first <= expert < first + count:
            continue
        rows_1, view_2 = _shard_view(grad1[slot], grad2[slot], layer.config.gated_linear_unit)
        for name, piece in (("linear_fc1", torch.cat(rows_1, dim=0)), ("linear_fc2", view_2)):
            param = weights[(expert - first, name)]
            target = param.main_grad if hasattr(param, "main_grad") else param.grad
            if target is None:
                param.grad = piece.to(param.dtype).clone()
            else:
                target.add_(piece.to(target.dtype))
