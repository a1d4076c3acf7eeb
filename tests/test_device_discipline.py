"""Device discipline, checked by reading the code (no GPU needed): docs/DESIGN.md "GPU discipline".

1. Every tensor our library code creates says where it lives: a torch factory call
   (`torch.tensor`, `torch.zeros`, ...) in `megatron_ec/` or `checkpoint_convert/` carries a
   `device=` keyword, or is `*_like`/`Tensor.new_*` of an input (not flagged), or its function is
   in `ALLOWED` with the reason it may stay on the host.
2. No collective (`dist.all_reduce`, `all_gather`, `broadcast`, `reduce_scatter`, ...) gets a tensor
   that its function created on the host: NCCL refuses CPU tensors. This one has no allowlist.

The checker itself is tested on the three crash paths issue 13 found, as they were written, so a
reintroduced one fails here.
"""

from __future__ import annotations

import ast
import fnmatch
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("megatron_ec", "checkpoint_convert")

FACTORIES = {
    "tensor", "as_tensor", "scalar_tensor", "zeros", "ones", "empty", "full", "arange", "range",
    "linspace", "logspace", "eye", "rand", "randn", "randint", "randperm", "empty_strided",
    "tril_indices", "triu_indices", "sparse_coo_tensor",
}
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "send",
    "recv", "isend", "irecv",
}

ALLOWED: dict[str, str] = {
    # "path::function" (fnmatch pattern) -> why a host tensor is right there.
    "megatron_ec/data/*::*":
        "CPU data pipeline: batches are built on the host and moved by the loop "
        "(`.cuda(non_blocking=True)` in training/loop.py and training/validation.py)",
    "megatron_ec/compat/cpu_gloo.py::*":
        "the CPU/gloo shim: installed only on CPU machines, never on a GPU rank",
    "megatron_ec/models/attention.py::*.__init__":
        "module parameter built on the host (use_cpu_initialization=True) and moved with the "
        "model by `model.cuda()` in training.loop.build_model",
    "megatron_ec/training/optimizer.py::TorchAdamW.*":
        "torch AdamW (the CPU optimizer; GPU uses Megatron's) keeps `step` as a host scalar",
    "megatron_ec/training/optimizer.py::sharded_adamw_state":
        "the common AdamW step count, a host scalar saved once in the checkpoint",
    "megatron_ec/training/optimizer.py::_init_adamw_state":
        "torch AdamW's `step` is a host scalar (non-capturable AdamW); moments use zeros_like",
    "megatron_ec/moe/esft.py::expert_row_freeze":
        "index tensor kept on the host; every use moves it (`frozen_index.to(param.device)`)",
    "megatron_ec/moe/methods/saved.py::*":
        "host-side read of a routing file; `load_selection_biases` copies it into the router's "
        "buffer with `copy_` (crosses devices)",
    "megatron_ec/eval/generate.py::left_pad":
        "host-side prompt batch of the HF evaluation; both callers move it with "
        "`.to(device)` before `generate`",
    "megatron_ec/analysis/inputs.py::batches":
        "host-side token batch of the analyses; `capture.forward` moves it with `.to(device)`",
    "megatron_ec/analysis/activation.py::layer_counts":
        "host totals of the activation counts; each batch's counts are copied in with `.cpu()`",
    "checkpoint_convert/tensor_io.py::read_selection":
        "bytes read from a file land in host memory; `load._assign` adopts them only on a host "
        "parameter and otherwise copies them across devices with `copy_`",
    "checkpoint_convert/verify.py::random_tokens":
        "seeded host generator (reproducible on any machine); `megatron_logits` moves the "
        "tokens to the model's device, `hf_logits` runs the HF model on the host",
}


def _is_torch_call(node: ast.Call, names: set[str]) -> str | None:
    func = node.func
    if isinstance(func, ast.Attribute) and func.attr in names:
        base = func.value
        if isinstance(base, ast.Name) and base.id == "torch":
            return func.attr
    return None


def _is_collective(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Attribute) and func.attr in COLLECTIVES:
        base = func.value
        if isinstance(base, ast.Name) and base.id in ("dist", "torch_dist"):
            return func.attr
        if isinstance(base, ast.Attribute) and base.attr == "distributed":
            return func.attr
    return None


def _host_device(node: ast.Call) -> bool:
    """No device keyword, or an explicit CPU one."""
    for kw in node.keywords:
        if kw.arg == "device":
            value = kw.value
            if isinstance(value, ast.Constant) and value.value == "cpu":
                return True
            if (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
                    and value.func.attr == "device" and value.args
                    and isinstance(value.args[0], ast.Constant) and value.args[0].value == "cpu"):
                return True
            return False
    return True


def _moves_to_device(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("to", "cuda"))


class _Scanner(ast.NodeVisitor):
    """Collects (qualname, line, what) for factory calls and host tensors in collectives."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.factories: list[tuple[str, int, str]] = []
        self.collectives: list[tuple[str, int, str]] = []

    @property
    def qualname(self) -> str:
        return ".".join(self.stack) or "<module>"

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    def _visit_function(self, node) -> None:
        self.stack.append(node.name)
        self._check_collectives(node)
        self.generic_visit(node)
        self.stack.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _visit_function

    def visit_Call(self, node: ast.Call) -> None:
        name = _is_torch_call(node, FACTORIES)
        if name and _host_device(node):
            self.factories.append((self.qualname, node.lineno, f"torch.{name}"))
        self.generic_visit(node)

    def _check_collectives(self, func: ast.AST) -> None:
        """Best effort: names bound to a host factory call (or derived from one without a
        `.to()`/`.cuda()`) in this function, then handed to a collective."""
        host: set[str] = set()

        def is_host(expr: ast.AST) -> bool:
            if _moves_to_device(expr):
                return False
            for sub in ast.walk(expr):
                if isinstance(sub, ast.Call) and _is_torch_call(sub, FACTORIES) and _host_device(sub):
                    return True
                if isinstance(sub, ast.Name) and sub.id in host:
                    return True
            return False

        for node in ast.walk(func):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
                if is_host(node.value):
                    host |= names
                elif isinstance(node, ast.Assign):
                    host -= names
        for node in ast.walk(func):
            if isinstance(node, ast.Call):
                name = _is_collective(node)
                if name and node.args and is_host(node.args[0]):
                    self.collectives.append((self.qualname, node.lineno, f"dist.{name}"))


def scan_source(source: str) -> _Scanner:
    scanner = _Scanner()
    scanner.visit(ast.parse(source))
    return scanner


def _library_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))


def _allowed(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in ALLOWED)


def _scan_library():
    factories, collectives, used = [], [], set()
    for path in _library_files():
        rel = path.relative_to(ROOT).as_posix()
        scanner = scan_source(path.read_text())
        for qualname, line, what in scanner.factories:
            key = f"{rel}::{qualname}"
            patterns = [p for p in ALLOWED if fnmatch.fnmatchcase(key, p)]
            if patterns:
                used.update(patterns)
            else:
                factories.append(f"{rel}:{line} {what} in {qualname}")
        for qualname, line, what in scanner.collectives:
            collectives.append(f"{rel}:{line} {what} in {qualname}")
    return factories, collectives, used


def test_library_tensors_name_their_device():
    factories, _, _ = _scan_library()
    assert not factories, (
        "tensors created without device= (pass device=, build from an input with *_like / "
        "new_*, or add 'file::function' -> reason to ALLOWED):\n  " + "\n  ".join(factories))


def test_no_collective_gets_a_host_tensor():
    _, collectives, _ = _scan_library()
    assert not collectives, (
        "a collective gets a tensor created on the host (NCCL refuses CPU tensors; use "
        "megatron_ec.parallel.collective_device(group)):\n  " + "\n  ".join(collectives))


def test_every_allowlist_entry_is_used():
    _, _, used = _scan_library()
    stale = sorted(set(ALLOWED) - used)
    assert not stale, f"ALLOWED entries that match nothing any more (remove them): {stale}"


# The three crash paths of issue 13, as they were written: the checker must catch each.
CRASH_PATHS = {
    "training/loop.py::_dp_sum": '''
        def _dp_sum(values):
            from megatron.core import parallel_state as ps
            tensor = torch.tensor(values, dtype=torch.float64)
            dist.all_reduce(tensor, group=ps.get_data_parallel_group())
            return tensor.tolist()
    ''',
    "moe/router.py::ECRouter._accumulate": '''
        class ECRouter:
            def _accumulate(self, probs_TE, real_T, condensers):
                gates_TR = probs_TE[:, condensers]
                if real_T is not None:
                    gates_TR = gates_TR[real_T]
                self.gate_accum += torch.stack([gates_TR.sum(),
                                                torch.tensor(float(gates_TR.numel()))])
    ''',
    "training/optimizer.py::global_grad_norm": '''
        def global_grad_norm(params, grad_of):
            squares = torch.zeros(2, dtype=torch.float64)  # [dense, expert]
            for param in params:
                squares[int(_is_expert(param))] += grad_of(param).double().pow(2).sum()
            dense, expert = squares[:1].clone(), squares[1:].clone()
            dist.all_reduce(dense, group=ps.get_tensor_model_parallel_group())
            dist.all_reduce(expert, group=ps.get_expert_tensor_and_model_parallel_group())
            return math.sqrt(float(dense.item() + expert.item()))
    ''',
}


@pytest.mark.parametrize("where", sorted(CRASH_PATHS))
def test_checker_catches_the_issue_13_crash_paths(where):
    scanner = scan_source(textwrap.dedent(CRASH_PATHS[where]))
    assert scanner.factories, f"{where}: the device-less factory call was not flagged"
    key = "megatron_ec/" + where.split("::")[0] + "::" + where.split("::")[1]
    assert not _allowed(key), f"{where} must not be allowlisted"
    if "all_reduce" in CRASH_PATHS[where]:
        assert scanner.collectives, f"{where}: the host tensor in the all-reduce was not flagged"


def test_checker_accepts_device_aware_code():
    scanner = scan_source(textwrap.dedent('''
        def fine(values, like, group):
            device = collective_device(group)
            tensor = torch.tensor(values, dtype=torch.float64, device=device)
            dist.all_reduce(tensor, group=group)
            moved = torch.tensor(values).to(device)
            dist.all_reduce(moved, group=group)
            return torch.zeros_like(like), like.new_zeros(3)
    '''))
    assert [what for _, _, what in scanner.factories] == ["torch.tensor"]  # the one before .to()
    assert not scanner.collectives
