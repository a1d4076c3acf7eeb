"""Megatron-Core 0.19 on a CPU-only machine with the gloo backend.

Megatron-Core assumes CUDA in a handful of places. Each function below fixes exactly one of them
(the numbering follows `docs/CPU_COMPAT.md`) and is only applied when CUDA is unavailable. Every
patch first checks that the symbol it replaces still exists and raises `CompatError` if an MCore
upgrade moved it, so a silent no-op is impossible. `apply_cpu_compat()` is idempotent.

Nothing outside `megatron_ec.compat` patches Megatron-Core.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Callable

import torch
import torch.distributed as dist

_APPLIED: list[str] = []


class CompatError(RuntimeError):
    """A patched Megatron-Core symbol is missing: the installed MCore is not the one we adapt."""


def _require(module_name: str, attr: str):
    """Import `module_name` and return it, failing loudly if `attr` is missing."""
    module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise CompatError(
            f"megatron_ec.compat: {module_name}.{attr} no longer exists; this megatron-core version "
            "is not supported (pin megatron-core==0.19.2 or update megatron_ec/compat)."
        )
    return module


# 1 and 1b. The RNG tracker and activation recompute read CUDA generator states.
def patch_rng_tracker() -> None:
    """Keep Megatron's model-parallel RNG streams on the CPU generator."""
    rnd = _require("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker")
    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state", "initialize_rng_tracker"):
        _require(rnd.__name__, name)

    class CpuRNGStatesTracker(rnd.CudaRNGStatesTracker):
        """`CudaRNGStatesTracker` whose named states are CPU generator states."""

        def add(self, name, seed):
            if seed in self.seeds_ or name in self.states_:
                raise ValueError(f"RNG state {name!r} or seed {seed} already registered")
            self._is_initialized = True
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=rnd._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise KeyError(f"RNG state {name!r} is not registered")
            outer_state, outer_name = torch.get_rng_state(), self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    rnd.CudaRNGStatesTracker = CpuRNGStatesTracker
    rnd._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    rnd._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    rnd.initialize_rng_tracker(force_reset=True)


# 2. About thirty call sites place tensors on `torch.cuda.current_device()`.
def patch_current_device() -> None:
    """Make `torch.cuda.current_device()` name the CPU."""
    _require("torch.cuda", "current_device")
    torch.cuda.current_device = lambda: torch.device("cpu")


class _NullStream:
    """Stands in for `torch.cuda.Stream`/`Event`: every operation is immediate on the CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *args, **kwargs):
        pass


# 3. The alltoall dispatcher, Megatron DDP and dist_checkpointing use CUDA streams and events.
def patch_cuda_streams() -> None:
    """Replace CUDA streams, events and synchronize with immediate no-ops."""
    for attr in ("Stream", "Event", "current_stream", "stream", "synchronize"):
        _require("torch.cuda", attr)
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullStream
    torch.cuda.current_stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *args, **kwargs: None


# 4. The unfused softmax builds its default causal mask with device="cuda".
def patch_default_causal_mask() -> None:
    """Build the default causal and sliding-window masks on the CPU."""
    softmax = _require("megatron.core.fusions.fused_softmax", "get_default_causal_mask")
    utils = _require("megatron.core.transformer.utils", "get_sliding_window_causal_mask")

    def causal_mask(sq: int) -> torch.Tensor:
        return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)

    def sliding_window_mask(sq: int, skv: int, window_size) -> torch.Tensor:
        visible = torch.ones(sq, skv, dtype=torch.bool)
        visible = visible.triu(diagonal=skv - sq - window_size[0])
        return ~visible.tril(diagonal=skv - sq + window_size[1])

    for module in (softmax, utils):
        module.get_default_causal_mask = causal_mask
    utils.get_sliding_window_causal_mask = sliding_window_mask
    if hasattr(softmax, "get_sliding_window_causal_mask"):
        softmax.get_sliding_window_causal_mask = sliding_window_mask


# 5. On CPU the alltoall dispatcher would pass split sizes as tensors; gloo wants lists.
def patch_split_sizes_to_numpy() -> None:
    """Let `maybe_move_tensor_to_cpu(..., as_numpy=True)` convert CPU tensors too."""
    moe_utils = _require("megatron.core.transformer.moe.moe_utils", "maybe_move_tensor_to_cpu")
    dispatcher = _require(
        "megatron.core.transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu"
    )
    original: Callable = moe_utils.maybe_move_tensor_to_cpu
    if getattr(original, "_megatron_ec_patched", False):
        return

    def move_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    move_to_cpu._megatron_ec_patched = True
    moe_utils.maybe_move_tensor_to_cpu = move_to_cpu
    dispatcher.maybe_move_tensor_to_cpu = move_to_cpu


# 6. Gloo has no uneven all_gather / reduce_scatter (alltoall dispatcher with TP>1 and EP>1).
def patch_uneven_collectives() -> None:
    """Implement the uneven branches of the sequence-parallel gather/scatter with even gloo ops."""
    mappings = _require("megatron.core.tensor_parallel.mappings", "_gather_along_first_dim")
    _require(mappings.__name__, "_reduce_scatter_along_first_dim")
    even_gather = mappings._gather_along_first_dim
    even_scatter = mappings._reduce_scatter_along_first_dim
    if getattr(even_gather, "_megatron_ec_patched", False):
        return

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return even_gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        padded = input_.new_zeros((max(sizes),) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((len(sizes) * max(sizes),) + tuple(input_.shape[1:]))
        dist.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        pieces = gathered.split(max(sizes), dim=0)
        return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)], dim=0)

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return even_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total.split([int(s) for s in input_split_sizes], dim=0)[group.rank()].contiguous()

    gather._megatron_ec_patched = True
    mappings._gather_along_first_dim = gather
    mappings._reduce_scatter_along_first_dim = reduce_scatter


CPU_PATCHES: tuple[Callable[[], None], ...] = (
    patch_rng_tracker,
    patch_current_device,
    patch_cuda_streams,
    patch_default_causal_mask,
    patch_split_sizes_to_numpy,
    patch_uneven_collectives,
)


def apply_cpu_compat(force: bool = False) -> list[str]:
    """Apply every CPU/gloo patch once when CUDA is unavailable.

    Args:
        force: apply even if CUDA is available (tests only).

    Returns:
        The names of the patches in effect.
    """
    if _APPLIED or (torch.cuda.is_available() and not force):
        return list(_APPLIED)
    for patch in CPU_PATCHES:
        patch()
        _APPLIED.append(patch.__name__)
    return list(_APPLIED)

