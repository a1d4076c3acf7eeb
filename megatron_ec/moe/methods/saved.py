"""The on-disk method state: `method_state.json` in checkpoints, `megatron_ec_routing.json` in
exported HF directories. The converter, the trainer and the HF restore read and write only here.

A method record (format "megatron_ec_method/2") is one JSON object:

    {"format": "megatron_ec_method/2", "name": "condenser",
     "config": {...the method's config keys, as the user set them...},
     "condensers": {"1": [1, 3], "2": [0, 2]}}        # the run's decisions, at the top level

Files written before records had a format hold the flat dict of the former `MethodState`
(every key of every method, `condensers` = the chosen ones); they still load: keys the method
does not have are dropped, `condensers` becomes the run's decision.

The routing file (format "megatron_ec_routing/2", formerly /1 with a flat method state) holds the
record and each MoE layer's fp32 `selection_bias` (exact: a float32 printed as a Python float
round-trips bit for bit). Stock transformers ignores it; `megatron_ec.models.hf_restore` reads it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from megatron_ec.moe.methods.base import Method
from megatron_ec.moe.methods.registry import method_class
from megatron_ec.textfile import read_json

METHOD_STATE_FILE = "method_state.json"
RECORD_FORMAT = "megatron_ec_method/2"
ROUTING_FILE = "megatron_ec_routing.json"
ROUTING_FORMAT = "megatron_ec_routing/2"
ROUTING_FORMATS = ("megatron_ec_routing/1", ROUTING_FORMAT)
LEGACY_KEYS = ("name", "aux_loss", "condenser_mode", "gamma", "direction", "usage_signal",
               "num_condensers", "condensers", "force_condensers")
"""The keys of the flat method state written before "megatron_ec_method/2"."""
_RESERVED = ("format", "name", "config")


def method_record(method: Method) -> dict:
    """The JSON record of a method: name, config, and its decisions at the top level."""
    return {"format": RECORD_FORMAT, "name": method.name, "config": method.config.to_dict(),
            **method.decisions.to_dict()}


def method_from_record(data: dict) -> Method:
    """The method of a record, or of a flat pre-record method state."""
    if not isinstance(data, dict):
        raise ValueError(f"a method state must be a JSON object, got {type(data).__name__}")
    if "format" not in data:
        return _from_legacy(data)
    if data["format"] != RECORD_FORMAT:
        raise ValueError(f"method state format {data['format']!r}, expected {RECORD_FORMAT!r}")
    cls = method_class(data["name"])
    decided = {k: v for k, v in data.items() if k not in _RESERVED}
    config = cls.Config.from_dict({"name": data["name"], **data.get("config", {})})
    return cls(config, cls.Decisions.from_dict(decided))


def _from_legacy(flat: dict) -> Method:
    unknown = sorted(set(flat) - set(LEGACY_KEYS))
    if unknown:
        raise ValueError(f"method state: unknown keys {unknown}; known: {sorted(LEGACY_KEYS)}")
    cls = method_class(flat.get("name", "sft"))
    decision_keys = {f.name for f in dataclasses.fields(cls.Decisions)}
    config_keys = {f.name for f in dataclasses.fields(cls.Config)} - decision_keys
    config = cls.Config(**{k: v for k, v in flat.items() if k in config_keys})
    decided = {k: v for k, v in flat.items() if k in decision_keys}
    return cls(config, cls.Decisions.from_dict(decided))


def save_method(directory: str | Path, method: Method) -> None:
    """Write `method_state.json` into a checkpoint iteration directory."""
    path = Path(directory) / METHOD_STATE_FILE
    path.write_text(json.dumps(method_record(method), indent=2) + "\n")


def load_method(directory: str | Path) -> Method:
    """The method saved in a checkpoint iteration directory (any format)."""
    path = Path(directory) / METHOD_STATE_FILE
    try:
        data = read_json(path, "restore the file from the checkpoint")
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; is {directory} a megatron_ec checkpoint?") from None
    try:
        return method_from_record(data)
    except (TypeError, KeyError) as err:
        raise ValueError(f"{path}: unreadable method state ({err})") from None


def write_routing_file(out_dir: str | Path, method: Method,
                       biases: dict[int, torch.Tensor]) -> Path:
    """Write the method record and the per-layer fp32 selection biases to `ROUTING_FILE`."""
    data = {
        "format": ROUTING_FORMAT,
        "method_state": method_record(method),
        "selection_bias": {str(layer): [float(x) for x in bias.to(torch.float32).tolist()]
                           for layer, bias in sorted(biases.items())},
    }
    path = Path(out_dir) / ROUTING_FILE
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def read_routing_file(hf_dir: str | Path) -> tuple[Method, dict[int, torch.Tensor]] | None:
    """(method, {layer: fp32 bias}) from `hf_dir`, or None if it has no routing file."""
    path = Path(hf_dir) / ROUTING_FILE
    if not path.is_file():
        return None
    fix = "re-export the checkpoint with checkpoint_convert export"
    try:
        data = read_json(path, fix)
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror}); {fix}") from None
    try:
        if data.get("format") not in ROUTING_FORMATS:
            raise ValueError(f"format {data.get('format')!r}, expected one of "
                             f"{', '.join(ROUTING_FORMATS)}")
        method = method_from_record(data["method_state"])
        biases = {int(layer): torch.tensor(values, dtype=torch.float32)
                  for layer, values in data["selection_bias"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: unreadable routing state ({err}); {fix}") from None
    return method, biases
