"""The method registry: name -> `Method` subclass. The only place that looks methods up by name."""

from __future__ import annotations

import dataclasses
import importlib

from megatron_ec.moe.methods.base import Decisions, Method, MethodConfig

BUILTIN_METHODS = ("sft", "bias", "condenser", "densemixer")
"""One entry per file `megatron_ec/moe/methods/<name>.py`; each registers itself on import."""

_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method under `cls.name` (its config's default `name`)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls.Config)}
    if not cls.name or cls.name in _METHODS:
        raise ValueError(f"method {cls.__name__}: missing or duplicate name {cls.name!r}")
    if defaults.get("name") != cls.name:
        raise ValueError(f"method {cls.__name__}: {cls.Config.__name__}.name must default to "
                         f"{cls.name!r}")
    _METHODS[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for module in BUILTIN_METHODS:
        importlib.import_module(f"megatron_ec.moe.methods.{module}")


def method_names() -> list[str]:
    """Registered method names: the built-ins in their order, then others as registered."""
    _load_builtins()
    return [*BUILTIN_METHODS, *(name for name in _METHODS if name not in BUILTIN_METHODS)]


def method_class(name: str) -> type[Method]:
    """The `Method` subclass registered as `name`; a ValueError lists the registered ones."""
    if name not in _METHODS:
        _load_builtins()
    if name not in _METHODS:
        raise ValueError(f"method.name={name!r}: use one of {', '.join(method_names())}")
    return _METHODS[name]


def build_method(config: MethodConfig, decisions: Decisions | None = None) -> Method:
    """The method object of a run: its config (the `method:` section) and decisions."""
    return method_class(config.name)(config, decisions)


def make_method(name: str, decisions: dict | None = None, **config) -> Method:
    """`build_method` from plain values, e.g. `make_method("bias", gamma=1e-3)`."""
    cls = method_class(name)
    return cls(cls.Config(name=name, **config), cls.Decisions.from_dict(decisions or {}))
