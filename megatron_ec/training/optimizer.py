"""One small optimizer interface, two backends: torch AdamW on CPU, Megatron's optimizer on GPU.

Both start after `finalize_grads()` has reduced the step's gradients into each parameter's
`main_grad` (Megatron DDP) and do: global gradient norm over every TP/EP shard, clipping, AdamW.

- `TorchAdamW` (CPU, fp32; the Megatron optimizer does not run on CPU, see MCORE_ON_CPU.md): copies
  `main_grad` into `.grad`, computes the norm with `global_grad_norm()` below, clips and steps a
  `torch.optim.AdamW`. Its state is saved as Megatron sharded tensors aligned with the parameter
  shards (`sharded_adamw_state`), so it loads at any TP/EP/ETP layout and data-parallel size.
- `MegatronAdam` (GPU): `megatron.core.optimizer.get_megatron_optimizer` with the distributed
  optimizer, fp32 master weights for bf16/fp8 models, Megatron's own norm and clipping; its state
  is Megatron's own `sharded_state_dict` (reshardable). Thin and NOT exercised on this project's
  CPU-only machines.

Both write `train_state/optimizer/` (a torch_dist checkpoint). Checkpoints of earlier versions
hold `train_state/optimizer_rankNNNNN.pt` (torch's per-rank state dict) instead; `TorchAdamW`
still loads those, at the layout they were saved at only.

Global norm without double counting: a parameter is replicated over the data-parallel ranks (the
gradients are identical after the all-reduce), and a parameter that is not tensor-parallel (norms,
router, biases of row-parallel layers) is replicated over TP too. Each rank therefore sums the
squares of its unique shards only - tensor-parallel shards everywhere, replicated parameters on TP
rank 0 - then dense squares are summed over the tensor-parallel group and expert squares over the
expert-tensor x expert-model-parallel group, exactly as Megatron's `get_grad_norm_fp32` does with
its grad-stats groups.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Protocol

import torch
import torch.distributed as dist

from megatron_ec.parallel import collective_device
from megatron_ec.training.config import TrainConfig


class Optimizer(Protocol):
    """What the loop needs from an optimizer."""

    def set_lr(self, lr: float) -> None: ...

    def step(self) -> float:
        """Clip and apply the finalized gradients; return the global gradient norm (pre-clip)."""

    def save(self, directory: Path, model) -> None:
        """Write the optimizer state under `directory` (collective: every rank calls it)."""

    def load(self, directory: Path, model) -> None:
        """Read what `save` wrote, at any parallel layout (collective)."""


def _is_expert(param: torch.nn.Parameter) -> bool:
    # Megatron marks routed-expert parameters allreduce=False (reduced over expert-DP instead).
    return not getattr(param, "allreduce", True)


def _is_unique_shard(param: torch.nn.Parameter, tp_rank: int, etp_rank: int) -> bool:
    if getattr(param, "tensor_model_parallel", False):
        return True
    return (etp_rank if _is_expert(param) else tp_rank) == 0


def global_grad_norm(params: Iterable[torch.nn.Parameter],
                     grad_of=lambda p: p.main_grad) -> float:
    """L2 norm of the full model's gradient, identical on every rank.

    Args:
        params: this rank's parameters (all of them; duplicates are filtered here).
        grad_of: where the gradient lives (`main_grad` after Megatron DDP, or `.grad`).
    """
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    etp_rank = ps.get_expert_tensor_parallel_rank()
    dense_group = ps.get_tensor_model_parallel_group()
    # On the collective's device (the gradients' device under NCCL): no CPU tensor meets CUDA.
    device = collective_device(dense_group)
    squares = torch.zeros(2, dtype=torch.float64, device=device)  # [dense, expert]
    for param in params:
        grad = grad_of(param)
        if grad is None or not _is_unique_shard(param, tp_rank, etp_rank):
            continue
        squares[int(_is_expert(param))] += grad.detach().double().pow(2).sum().to(device)
    dense, expert = squares[:1].clone(), squares[1:].clone()
    dist.all_reduce(dense, group=dense_group)
    dist.all_reduce(expert, group=ps.get_expert_tensor_and_model_parallel_group())
    return math.sqrt(float((dense + expert).item()))  # the step's one host read of the norm


@torch.no_grad()
def clip_grads(params: Iterable[torch.nn.Parameter], max_norm: float, norm: float) -> None:
    """Scale every `.grad` by max_norm / (norm + 1e-6) when that is below 1 (Megatron's rule);
    `max_norm` 0 disables clipping."""
    if max_norm <= 0 or not math.isfinite(norm):
        return
    coeff = max_norm / (norm + 1e-6)
    if coeff < 1.0:
        for param in params:
            if param.grad is not None:
                param.grad.mul_(coeff)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Megatron's convention: no decay for biases and 1-D parameters (norms)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class TorchAdamW:
    """torch AdamW over Megatron-DDP gradients (CPU, fp32 parameters)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.clip_grad = cfg.clip_grad
        groups = _param_groups(model, cfg.weight_decay)
        # Frozen parameters (a method's set_trainable) ride along in a group of their own that
        # never updates (their grad stays None: AdamW skips them, weight decay included), so that
        # the saved state covers every shard of a sharded tensor whose other shards train (ESFT:
        # one stacked key for all experts of a layer); their moments are zero placeholders.
        self.frozen = [p for p in model.parameters() if not p.requires_grad]
        if self.frozen:
            groups.append({"params": self.frozen, "weight_decay": 0.0})
        # "loop" (foreach=False) is bitwise reproducible regardless of grouping; "foreach" runs
        # each update term over all tensors of a group at once (fewer, larger kernels).
        self.inner = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
            foreach=cfg.optimizer_impl == "foreach",
        )

    def set_lr(self, lr: float) -> None:
        for group in self.inner.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def step(self) -> float:
        for param in self.params:
            param.grad = param.main_grad.to(param.dtype)
        norm = global_grad_norm(self.params, grad_of=lambda p: p.grad)
        clip_grads(self.params, self.clip_grad, norm)
        self.inner.step()
        for param in self.params:
            param.grad = None
        return norm

    def save(self, directory: Path, model) -> None:
        from megatron.core import dist_checkpointing

        target = Path(directory) / OPTIMIZER_DIR
        target.mkdir(parents=True, exist_ok=True)
        self._frozen_placeholders()
        dist_checkpointing.save(sharded_adamw_state(self.inner, model.sharded_state_dict()),
                                str(target))

    def _frozen_placeholders(self) -> None:
        """Zero moments for the frozen parameters, at the trainable ones' step count."""
        steps = [self.inner.state[p]["step"] for p in self.params if p in self.inner.state]
        if not self.frozen or not steps:
            return
        for param in self.frozen:
            state = self.inner.state.get(param)
            if state is None:
                self.inner.state[param] = state = {
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}
            state["step"] = steps[0].clone()

    def load(self, directory: Path, model) -> None:
        from megatron.core import dist_checkpointing

        source = Path(directory) / OPTIMIZER_DIR
        if not source.is_dir():
            self._load_per_rank(Path(directory))
            return
        _init_adamw_state(self.inner)  # placeholders that give the sharded dict its shapes
        request = sharded_adamw_state(self.inner, model.sharded_state_dict())
        state = dist_checkpointing.load(request, str(source))
        step = state["state"].pop(COMMON_STEP)
        for param_state in state["state"].values():
            param_state["step"] = torch.tensor(float(step))
        self.inner.load_state_dict(state)

    def _load_per_rank(self, directory: Path) -> None:
        """The format of earlier versions: this rank's torch state dict (same layout only)."""
        path = directory / _rank_file()
        if not path.is_file():
            raise ValueError(f"{path}: missing; the checkpoint was saved with fewer ranks")
        self.inner.load_state_dict(torch.load(path, weights_only=False))


OPTIMIZER_DIR = "optimizer"
COMMON_STEP = "common_step"


def has_per_rank_state(directory: Path) -> bool:
    """True for a train state of earlier versions: per-rank optimizer files, not reshardable."""
    directory = Path(directory)
    return not (directory / OPTIMIZER_DIR).is_dir() and any(directory.glob("optimizer_rank*.pt"))


def sharded_adamw_state(optimizer: torch.optim.Optimizer, model_sharded_state: dict) -> dict:
    """A torch AdamW state dict as Megatron sharded tensors aligned with the parameter shards.

    This is Megatron-Core's recipe for a non-distributed optimizer (`FP32Optimizer.
    sharded_state_dict`), built from the same helpers: each state tensor of parameter P
    (`exp_avg`, `exp_avg_sq`) is saved under `optimizer.state.<name>.<P's sharded key>` with P's
    sharding - TP/EP/ETP slices, global expert ids, the gated fc1 factory, data-parallel replica
    ids - so it reshards exactly like the weights. The step count, the same for every parameter,
    is saved once as `state.common_step`; the param groups' hyperparameters are common and their
    parameter lists stay local (each rank has its own).

    Args:
        optimizer: the torch optimizer (its state must exist: after a step, or placeholders).
        model_sharded_state: `model.sharded_state_dict()` of the model it optimizes.
    """
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    params = [param for group in optimizer.param_groups for param in group["params"]]
    state = optimizer.state_dict()
    steps = {float(param_state["step"]) for param_state in state["state"].values()}
    assert len(steps) == 1, f"expected one step count for all parameters, got {sorted(steps)}"
    optim_state_to_sharding_state(state, get_param_id_to_sharded_param_map(model_sharded_state,
                                                                           params),
                                  exclude_keys=("step",))
    state["state"][COMMON_STEP] = torch.tensor(steps.pop())
    return state


def _init_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """Zero moments and step for every parameter, as AdamW's first step would create them."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            optimizer.state[param] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }


def _rank_file() -> str:
    return f"optimizer_rank{dist.get_rank():05d}.pt"


class MegatronAdam:
    """Megatron-Core's (distributed) Adam with fp32 master weights. GPU only; untested here."""

    def __init__(self, ddp_model, cfg: TrainConfig):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        bf16 = cfg.precision in ("bf16", "fp8")
        config = OptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=cfg.lr * cfg.min_lr_ratio,
            weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps, clip_grad=cfg.clip_grad,
            bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=True,
        )
        self.inner = get_megatron_optimizer(config, [ddp_model])

    def set_lr(self, lr: float) -> None:
        for group in self.inner.param_groups:
            group["lr"] = lr

    def step(self) -> float:
        _, grad_norm, _ = self.inner.step()  # (success, norm, zeros); norm None if skipped
        return float("nan") if grad_norm is None else float(grad_norm)

    # Megatron's reshardable format: one sharded tensor per parameter state in model space
    # (TP/EP/DP may change between save and load), without the chained optimizer's per-index
    # key prefix (the dense/expert split need not match between layouts). Chosen explicitly, as
    # Megatron-LM's checkpointing does, so a change of MCore's defaults cannot silently make
    # checkpoints layout-bound.
    SHARDING = {"distrib_optim_sharding_type": "fully_sharded_model_space",
                "chained_optim_avoid_prefix": True}

    def save(self, directory: Path, model) -> None:
        from megatron.core import dist_checkpointing

        target = Path(directory) / OPTIMIZER_DIR
        target.mkdir(parents=True, exist_ok=True)
        state = self.inner.sharded_state_dict(model.sharded_state_dict(), metadata=self.SHARDING)
        dist_checkpointing.save(state, str(target))

    def load(self, directory: Path, model) -> None:
        from megatron.core import dist_checkpointing

        state = self.inner.sharded_state_dict(model.sharded_state_dict(), is_loading=True,
                                              metadata=self.SHARDING)
        source = str(Path(directory) / OPTIMIZER_DIR)
        self.inner.load_state_dict(dist_checkpointing.load(state, source))


def build_optimizer(ddp_model, cfg: TrainConfig) -> Optimizer:
    """Megatron's optimizer on GPU, torch AdamW on CPU."""
    if torch.cuda.is_available():
        return MegatronAdam(ddp_model, cfg)
    from megatron_ec.training.distributed import unwrap

    return TorchAdamW(unwrap(ddp_model), cfg)
