"""Imports run down the layers of docs/DESIGN.md only: a module imports its own layer or lower.

Every `import` and `from ... import` of a project module counts, at module level or inside a
function (a lazy import is still an import). The order is written once, here.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("compat", ("megatron_ec.compat", "megatron_ec.textfile")),  # adapters to the outside world
    ("parallel", ("megatron_ec.parallel",)),
    ("moe", ("megatron_ec.moe",)),
    ("models", ("megatron_ec.models",)),
    ("data", ("megatron_ec.data",)),
    ("checkpoint_convert", ("checkpoint_convert",)),
    ("training", ("megatron_ec.training",)),
    ("eval/analysis", ("megatron_ec.eval", "megatron_ec.analysis")),
    ("CLIs", ("megatron_ec.finetune", "megatron_ec.recipe", "megatron_ec.evaluate",
              "megatron_ec.analyze", "megatron_ec.torchrun", "checkpoint_convert.__main__")),
]
"""Lowest first; a CLI prefix wins over its package's (`checkpoint_convert.__main__`)."""

PACKAGES = ("megatron_ec", "checkpoint_convert")


def layer_of(module: str) -> int | None:
    """Index in LAYERS of a dotted module name (the longest matching prefix); None = no layer."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in a file, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            # `from megatron_ec.moe import state` imports megatron_ec.moe.state
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in source_files()
                if layer_of(module_name(p)) is None and p.name != "__init__.py"]
    assert unplaced == [], f"add these modules to a layer in tests/test_layers.py: {unplaced}"


def test_no_module_imports_a_layer_above_its_own():
    violations = {}
    for path in source_files():
        own = layer_of(module_name(path))
        if own is None:
            continue
        for line, target in imported_modules(path):
            theirs = layer_of(target)
            where = f"{path.relative_to(REPO)}:{line}"
            if theirs is not None and theirs > own and where not in violations:
                violations[where] = (f"{where} ({LAYERS[own][0]}) imports {target} "
                                     f"({LAYERS[theirs][0]})")
    assert not violations, "imports up the layers:\n" + "\n".join(violations.values())


def test_the_walk_sees_lazy_imports():
    """The checker itself: a function-level import is found, and placed in its layer."""
    sample = REPO / "megatron_ec" / "moe" / "spec.py"
    assert (layer_of("megatron_ec.moe.spec"), layer_of("checkpoint_convert.__main__")) == (2, 8)
    assert any(name.startswith("megatron.core.transformer.moe")
               for _, name in imported_modules(sample))  # imported inside _is_moe_mlp
