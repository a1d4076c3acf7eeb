"""The method seam: the registry parses `method:`, nothing else compares method names, and method
state written before the seam (flat `MethodState` dicts, routing files of format /1) still loads."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from megatron_ec.moe.methods import make_method, method_names
from megatron_ec.moe.methods.saved import (
    ROUTING_FILE,
    load_method,
    method_record,
    read_routing_file,
    save_method,
    write_routing_file,
)
from megatron_ec.training.config import FinetuneConfig
from megatron_ec.training.config_tree import ConfigError, apply_overrides, build

REPO = Path(__file__).resolve().parents[1]
REGISTRY = REPO / "megatron_ec" / "moe" / "methods" / "registry.py"
BASE = {"model": {"checkpoint": "ckpt"}, "data": {"train": "train.jsonl"},
        "output": {"dir": "out"}}

# What `MethodState.save` wrote before the seam (every key of every method, flat).
LEGACY_CONDENSER = {"name": "condenser", "aux_loss": False, "condenser_mode": "reference",
                    "gamma": 5e-05, "direction": "sparsify", "usage_signal": "hard",
                    "num_condensers": [1, 2], "condensers": {"1": [3], "2": [0, 5]},
                    "force_condensers": True}
LEGACY_SFT = {"name": "sft", "aux_loss": True, "condenser_mode": "paper", "gamma": 0.0001,
              "direction": "sparsify", "usage_signal": "soft", "num_condensers": 2,
              "condensers": {}, "force_condensers": True}


def _strings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for element in node.elts for s in _strings(element)]
    return []


def name_comparisons(path: Path, names: set[str], root: Path = REPO) -> list[str]:
    """`x == "sft"`, `"bias" != x`, `x in ("bias", "condenser")`, ... in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            hits = {s for operand in operands for s in _strings(operand)} & names
            if hits:
                found.append(f"{path.relative_to(root)}:{node.lineno} compares {sorted(hits)}")
    return found


def test_no_method_name_is_compared_outside_the_registry():
    names = set(method_names())
    files = [p for package in ("megatron_ec", "checkpoint_convert")
             for p in sorted((REPO / package).rglob("*.py")) if p != REGISTRY]
    found = [hit for path in files for hit in name_comparisons(path, names)]
    assert found == [], "ask the method object instead:\n" + "\n".join(found)


def test_the_name_check_sees_comparisons(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('a = m.name == "bias"\nb = n in ("sft", "x")\nc = "condenser" != n\n')
    hits = name_comparisons(sample, set(method_names()), root=tmp_path)
    assert [hit.split(" compares ")[1] for hit in hits] == ["['bias']", "['sft']", "['condenser']"]


def _method_section(**method):
    return build(FinetuneConfig, {**BASE, "method": method}).method


def test_the_registry_picks_the_config_class_by_name():
    assert type(_method_section()).__name__ == "SFTConfig"
    condenser = _method_section(name="condenser", gamma=5e-5, num_condensers=[1, 0])
    assert type(condenser).__name__ == "CondenserConfig" and condenser.num_condensers == [1, 0]
    with pytest.raises(ConfigError,
                       match="method.name='nosuch': use one of sft, bias, condenser, densemixer, esft"):
        _method_section(name="nosuch")


@pytest.mark.parametrize("name, key, owners", [
    ("sft", "gamma", "bias or condenser"),
    ("bias", "aux_loss", "sft"),
    ("bias", "num_condensers", "condenser"),
])
def test_a_key_of_another_method_is_a_one_line_error(name, key, owners):
    message = (f"method.{key} does not apply to method.name={name}; "
               f"it is a key of method.name={owners}")
    with pytest.raises(ConfigError, match=message):
        build(FinetuneConfig, apply_overrides(BASE, [f"method.name={name}", f"method.{key}=1"],
                                              FinetuneConfig))


def test_config_is_frozen_and_decisions_are_separate(tmp_path):
    method = make_method("condenser", num_condensers=2)
    with pytest.raises(AttributeError):
        method.config.gamma = 1.0
    method.decisions.condensers[1] = [0, 3]
    save_method(tmp_path, method)
    record = json.loads((tmp_path / "method_state.json").read_text())
    assert record["config"]["condensers"] == {} and record["condensers"] == {"1": [0, 3]}
    assert load_method(tmp_path) == method


def test_a_method_state_written_before_the_seam_still_loads(tmp_path):
    (tmp_path / "method_state.json").write_text(json.dumps(LEGACY_CONDENSER, indent=2))
    method = load_method(tmp_path)
    assert method == make_method("condenser", condenser_mode="reference", gamma=5e-5,
                                 usage_signal="hard", num_condensers=[1, 2],
                                 decisions={"condensers": {1: [3], 2: [0, 5]}})
    (tmp_path / "method_state.json").write_text(json.dumps(LEGACY_SFT))
    assert load_method(tmp_path) == make_method("sft", aux_loss=True)


def test_a_routing_file_of_format_1_still_loads(tmp_path):
    biases = {1: torch.tensor([0.5, -0.25, 1e-3]), 2: torch.tensor([0.0, 1.0, -1.0])}
    legacy = {"format": "megatron_ec_routing/1", "method_state": LEGACY_CONDENSER,
              "selection_bias": {str(k): v.tolist() for k, v in biases.items()}}
    (tmp_path / ROUTING_FILE).write_text(json.dumps(legacy))
    method, read = read_routing_file(tmp_path)
    assert method.decisions.condensers == {1: [3], 2: [0, 5]}
    assert all(torch.equal(read[k], biases[k]) for k in biases)
    write_routing_file(tmp_path, method, read)  # and the current format round-trips
    again, read_again = read_routing_file(tmp_path)
    assert again == method and all(torch.equal(read_again[k], biases[k]) for k in biases)
    written = json.loads((tmp_path / ROUTING_FILE).read_text())
    assert written["format"] == "megatron_ec_routing/2"
    assert written["method_state"] == method_record(method)
