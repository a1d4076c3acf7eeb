"""Build nested config dataclasses from YAML and `dotted.key=value` overrides, strictly.

A config is a tree of dataclasses (one per section). `build()` turns a plain dict (from YAML) into
that tree and rejects what a typo would otherwise hide:
- an unknown key is an error that names the closest valid key (difflib);
- every value is checked against its field's annotation (`int`, `float`, `str`, `bool`,
  `X | None`, `tuple[...]`, `list[...]`, `Sequence[...]`, `dict[...]`, nested dataclasses);
- a missing required field is an error naming it.

Overrides (`train.lr=3e-4`) are parsed as YAML scalars, except that a field typed `str` keeps the
text as written (so `output.dir=007` stays "007"). PyYAML reads `1e-5` (no dot) as a string; a
numeric string is accepted where a float is expected.

A section may be a tagged union on its `name` key: its dataclass then has a classmethod
`config_variant(name) -> dataclass` (and `config_variants() -> {name: dataclass}`), and `build()`
makes the variant `name` selects (the `method` section: one config class per method). A key of
another variant is an error naming the variants it belongs to.

Every error is a `ConfigError` (a `ValueError`) with a one-line, fix-it message.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from megatron_ec.textfile import TextFileError, read_text


class ConfigError(ValueError):
    """A user error in a config file or override; the message is one line."""


@dataclasses.dataclass(frozen=True)
class _Raw:
    """An override value as typed on the command line, resolved against the field's type."""

    text: str


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with a one-line error for a missing or malformed file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file; fix the --config path")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file; pass the YAML config file, not a directory")
    try:
        text = read_text(path)
        data = yaml.safe_load(text)
    except TextFileError as err:
        raise ConfigError(str(err)) from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror}); fix its permissions") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{_yaml_location(path, text, err)}: {_yaml_problem(err)}; "
                          "fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, not "
                          f"{type(data).__name__}")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    if getattr(err, "problem", None):
        return err.problem
    if isinstance(err, yaml.reader.ReaderError):  # "unacceptable character #x0007: ..."
        return str(err).splitlines()[0]
    return "malformed YAML"


def _yaml_location(path: Path, text: str, err: yaml.YAMLError) -> str:
    """`path:line` of a YAML error (a parser mark, or the character position of a reader error)."""
    mark = getattr(err, "problem_mark", None)
    if mark is not None:
        return f"{path}:{mark.line + 1}"
    position = getattr(err, "position", None)  # yaml.reader.ReaderError: a non-printable character
    if isinstance(position, int):
        return f"{path}:{text.count(chr(10), 0, position) + 1}"
    return str(path)


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config tree (sections and leaves; every variant's keys)."""
    keys = []
    for name, hint in _variant_hints(cls).items():
        key = f"{prefix}{name}"
        keys.append(key)
        inner = _dataclass_in(hint)
        if inner is not None:
            keys += valid_keys(inner, key + ".")
    return keys


def _variants(cls: type) -> dict[str, type]:
    """{name: dataclass} of a tagged-union section; {"": cls} for a plain one."""
    return cls.config_variants() if hasattr(cls, "config_variants") else {"": cls}


def _variant_hints(cls: type) -> dict[str, Any]:
    """Field annotations of every variant of `cls`, in first-seen order."""
    hints: dict[str, Any] = {}
    for variant in _variants(cls).values():
        for name, hint in _hints(variant).items():
            hints.setdefault(name, hint)
    return hints


def _select_variant(cls: type, data: dict, path: str) -> type:
    """The dataclass a tagged-union section's `name` selects (`cls` itself for a plain one)."""
    if not hasattr(cls, "config_variant"):
        return cls
    default = next(f.default for f in dataclasses.fields(cls) if f.name == "name")
    name = _convert(data.get("name", default), str, f"{path}name")
    try:
        return cls.config_variant(name)
    except ValueError as err:
        raise ConfigError(_one_line(err)) from None


def _foreign_key_message(base: type, variant: type, key: str, path: str) -> str | None:
    """"a.b does not apply to a.name=x; ..." when `key` belongs to other variants of `base`."""
    if not hasattr(base, "config_variants"):
        return None
    owners = [name for name, other in base.config_variants().items()
              if key in {f.name for f in dataclasses.fields(other)}]
    if not owners:
        return None
    current = next(name for name, other in base.config_variants().items() if other is variant)
    return (f"{path}{key} does not apply to {path}name={current}; it is a key of "
            f"{path}name={' or '.join(owners)}")


def apply_overrides(data: dict, overrides: list[str], cls: type | None = None) -> dict:
    """Merge `dotted.key=value` strings into a nested dict (a copy); values resolved in `build`.

    Args:
        data: the config as loaded from YAML.
        overrides: command-line overrides.
        cls: the config class, for a did-you-mean hint on unknown keys; None = no check here.
    """
    merged = _deep_copy(data)
    allowed = valid_keys(cls) if cls is not None else None
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. train.lr=1e-4")
        if allowed is not None and key not in allowed:
            raise ConfigError(unknown_key_message(key, allowed))
        node = merged
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = _Raw(text)
    return merged


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge: sections merge key by key, values in `update` win."""
    out = _deep_copy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def build(cls: type, data: Any, path: str = "") -> Any:
    """Instantiate the dataclass tree `cls` from `data`, checking keys and types.

    Args:
        cls: a dataclass whose fields may be dataclasses themselves.
        data: a mapping (a section of the YAML), or an instance of `cls` (returned as is).
        path: dotted prefix of this section, for messages.
    """
    if isinstance(data, cls):
        return data
    where = path.rstrip(".") or "the config"
    if isinstance(data, _Raw):
        raise ConfigError(f"{where} is a section; set its keys, e.g. {path}<key>=value")
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {data!r}")
    base, cls = cls, _select_variant(cls, data, path)
    hints = _hints(cls)
    unknown = [k for k in data if k not in hints]
    if unknown:
        foreign = _foreign_key_message(base, cls, unknown[0], path)
        raise ConfigError(foreign or unknown_key_message(f"{path}{unknown[0]}",
                                                         valid_keys(base, path)))
    values = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        key = f"{path}{field.name}"
        if field.name in data:
            values[field.name] = _convert(data[field.name], hints[field.name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            inner = _dataclass_in(hints[field.name])
            if inner is not None and _all_optional(inner):
                values[field.name] = inner()
            else:
                raise ConfigError(f"{key} is required; set it in the config or as {key}=...")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        message = _one_line(err)
        if not message.startswith(f"{where}.") and not message.startswith(f"{where}:"):
            message = f"{where}: {message}"
        raise ConfigError(message) from None


def to_dict(obj: Any) -> Any:
    """A config tree back to plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def unknown_key_message(key: str, allowed: list[str]) -> str:
    """"unknown config key ...; did you mean ...?", else the valid keys of the nearest enclosing
    section that has any. Tried in turn: a close key of the same section; for an unknown section,
    the closest section name at the first unknown level (`trian.lr` -> `train.lr`); the same leaf
    in another section (`seq_length` -> `data.seq_length`)."""
    parts = key.split(".")

    def children(prefix: str) -> list[str]:
        return [k[len(prefix):] for k in allowed
                if k.startswith(prefix) and "." not in k[len(prefix):]]

    def close(word: str, words: list[str], cutoff: float = 0.6) -> str | None:
        found = difflib.get_close_matches(word, words, n=1, cutoff=cutoff)
        return found[0] if found else None

    known = len(parts) - 1  # the nearest enclosing section that has keys
    while known and not children("".join(f"{p}." for p in parts[:known])):
        known -= 1
    section = "".join(f"{p}." for p in parts[:known])
    names = children(section)
    guess = None
    match = close(parts[known], names)
    if match is not None:
        candidate = section + ".".join([match, *parts[known + 1:]])
        guess = candidate if candidate in allowed else None
    if guess is None:  # the right leaf in the wrong section
        by_leaf: dict[str, str] = {}
        for k in allowed:  # the first listed key with that leaf
            if not (section and k.startswith(section) and "." not in k[len(section):]):
                by_leaf.setdefault(k.rsplit(".", 1)[-1], k)
        leaf = close(parts[-1], list(by_leaf), cutoff=0.75)
        guess = by_leaf[leaf] if leaf is not None and by_leaf[leaf] != key else None
    if guess is not None:
        return f"unknown config key '{key}'; did you mean '{guess}'?"
    where = f"valid keys of {section.rstrip('.')}" if section else "valid sections"
    return f"unknown config key '{key}'; {where}: {', '.join(section + n for n in names)}"


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (directly or as `X | None`), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint) if _is_union(hint) else ():
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _all_optional(cls: type) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls) if f.init)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _convert(value: Any, hint: Any, key: str) -> Any:
    """`value` checked (and lightly coerced) against the annotation `hint`."""
    if isinstance(value, _Raw):
        value = value.text if _accepts_plain_str(hint) else _parse_scalar(value.text, key)
    if hint is Any:
        return value
    if _is_union(hint):
        return _convert_union(value, hint, key)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin is not None:
        return _convert_generic(value, origin, typing.get_args(hint), key)
    return _convert_scalar(value, hint, key)


def _convert_union(value: Any, hint: Any, key: str) -> Any:
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key} must be set, got null")
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(value, arg, key)
        except ConfigError as err:
            errors.append(err)
    names = " or ".join(_type_name(a) for a in args if a is not type(None))
    raise ConfigError(f"{key} must be {names}, got {value!r}")


def _convert_generic(value: Any, origin: Any, args: tuple, key: str) -> Any:
    if origin in (list, tuple, collections.abc.Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        item_hint = args[0] if args else Any
        items = [_convert(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        key_hint, value_hint = args if args else (Any, Any)
        return {_convert(k, key_hint, f"{key} key"): _convert(v, value_hint, f"{key}.{k}")
                for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {origin}")  # our own bug, said plainly


def _convert_scalar(value: Any, hint: Any, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _is_int_text(value):
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{key} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def _parse_scalar(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {key}={text!r}: not a valid YAML value") from None


def _accepts_plain_str(hint: Any) -> bool:
    if hint is str:
        return True
    if _is_union(hint):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args == [str]
    return False


def _is_int_text(text: str) -> bool:
    return text.strip().lstrip("+-").isdigit()


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _deep_copy(data: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def field_docs(cls: type) -> dict[str, str]:
    """{field: its attribute docstring} of a dataclass (the string literal under the field)."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's docstring wins over its base's
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr)
                    and isinstance(getattr(following, "value", None), ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def describe_keys(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf of a config tree, in declaration order.

    A key of a tagged-union section that only some variants have says which, e.g.
    "(method.name: bias, condenser)".
    """
    rows = []
    variants = _variants(cls)
    seen: set[str] = set()
    for variant in variants.values():
        docs, hints = field_docs(variant), _hints(variant)
        for field in dataclasses.fields(variant):
            if not field.init or field.name in seen:
                continue
            seen.add(field.name)
            key = f"{prefix}{field.name}"
            inner = _dataclass_in(hints[field.name])
            if inner is not None:
                rows += describe_keys(inner, key + ".")
                continue
            rows.append((key, _default_text(field), docs.get(field.name, "") +
                         _owners_note(variants, field.name, prefix)))
    return rows


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return repr(field.default_factory())
    return "(required)"


def _owners_note(variants: dict[str, type], name: str, prefix: str) -> str:
    owners = [v for v, c in variants.items() if name in {f.name for f in dataclasses.fields(c)}]
    if len(owners) == len(variants):
        return ""
    return f" ({prefix}name: {', '.join(owners)})"
