"""YAML configs as typed dataclasses: load, apply ``key=value`` overrides, validate, save.

A config class is a (nested) dataclass. Loading checks every key and type and raises ``ConfigError`` naming
the file and the dotted key. Fields may declare aliases (``field(metadata={'aliases': ['schedular']})``), so
the original ALBEF spelling of a key is accepted too. Overrides (``optimizer.lr=2e-4 batch_size=32``) are
parsed as YAML scalars and validated like the file.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats: ``1e-4`` is a number (PyYAML's YAML 1.1 reads it as a string; the
    original ALBEF configs were read with ruamel, a YAML 1.2 parser)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(stream):
    return yaml.load(stream, Loader=_Loader)


def _aliases(f: dataclasses.Field) -> List[str]:
    return list(f.metadata.get("aliases", ()))


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp, value: Any, where: str) -> Any:
    """Check ``value`` against type ``tp`` (converting int -> float and dict -> dataclass)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, List, Sequence):
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp}")


def from_dict(cls: Type[T], data: Dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ``ConfigError``.

    ``where`` prefixes error messages: ``'<file>: key'``.
    """
    hints = typing.get_type_hints(cls)
    names: Dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if f.init:
            names[f.name] = f.name
            for a in _aliases(f):
                names[a] = f.name
    kwargs: Dict[str, Any] = {}
    sep = "." if not where.endswith(":") else " "
    for key, value in data.items():
        if key not in names:
            known = sorted(n for n in names)
            raise ConfigError(f"{where}{sep}{key}: unknown key (known keys here: {', '.join(known)})")
        name = names[key]
        if name in kwargs:
            raise ConfigError(f"{where}{sep}{key}: given twice (as {name!r} and an alias)")
        kwargs[name] = _convert(hints[name], value, f"{where}{sep}{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from e
    except ValueError as e:  # a __post_init__ check
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}{'' if where.endswith(':') else ':'} {e}") from e


def parse_overrides(overrides: Sequence[str]) -> Dict[str, Any]:
    """``['optimizer.lr=2e-4', 'batch_size=32']`` -> nested dict with YAML-parsed values."""
    out: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _canonical_keys(cls, data: Dict[str, Any]) -> Dict[str, Any]:
    """Rename aliases to field names (recursively), so overrides merge with the file's spelling."""
    if not dataclasses.is_dataclass(cls) or not isinstance(data, dict):
        return data
    hints = typing.get_type_hints(cls)
    alias = {a: f.name for f in dataclasses.fields(cls) for a in _aliases(f)}
    out = {}
    for k, v in data.items():
        name = alias.get(k, k)
        tp = hints.get(name)
        sub = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] if tp is not None else []
        if tp is not None and dataclasses.is_dataclass(tp):
            sub = [tp]
        out[name] = _canonical_keys(sub[0], v) if sub and isinstance(v, dict) else v
        if name != k and name in data:
            raise ConfigError(f"key {k!r} and its alias {name!r} are both given")
    return out


def load_config(cls: Type[T], path: Optional[str], overrides: Sequence[str] = ()) -> T:
    """Read YAML ``path`` (or start from defaults when None), apply overrides, validate into ``cls``."""
    data: Dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        if not os.path.exists(path):
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as f:
            try:
                data = yaml_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
    data = _canonical_keys(cls, data)
    if overrides:
        data = _merge(data, _canonical_keys(cls, parse_overrides(overrides)))
        source += " (with overrides)"
    return from_dict(cls, data, f"{source}:")


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def defaults_of(cls) -> Dict[str, Any]:
    """The default value of every field of config class ``cls`` that has one (nested dataclasses as dicts)."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def save_config(cfg: Any, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
