"""Plain (YAML) data -> dataclasses, checking every key and type: the one validator of all config sections.

A leaf module (standard library only), so the model config (models/factory.py) and the training config
(training/config.py) share it: an unknown key, a wrong type or a failed `__post_init__` check raises
`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

__all__ = ["ConfigError", "from_dict"]


class ConfigError(ValueError):
    """The training configuration is invalid; the message names the key (dotted path) or file."""


# ---------------------------------------------------------------------------------------------------------------
# Generic dict -> dataclass validation (unknown keys, types, missing fields), used for every nested section.


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from plain YAML data, recursing into nested dataclasses, checking keys and types."""
    where = path or "<top level>"
    if isinstance(data, cls):
        return data
    if hasattr(cls, "from_plain"):  # a section keyed by names rather than fields validates itself (`data:`)
        return cls.from_plain(data, path) if path else cls.from_plain(data)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    init_fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in init_fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), init_fields, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"unknown key '{_join(path, key)}'{hint}; allowed keys{' in ' + path if path else ''}: "
            f"{sorted(init_fields)}"
        )
    kwargs = {}
    for name, f in init_fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{_join(path, name)}'")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # Checks in __post_init__ start their message with the field name ("lr: must be > 0"): name the full key.
        message = str(exc)
        match = re.match(r"^(\w+): (.*)$", message, flags=re.S)
        if match and match.group(1) in init_fields:
            raise ConfigError(f"{_join(path, match.group(1))}: {match.group(2)}") from exc
        raise ConfigError(f"{where}: {message}") from exc


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check `value` against the annotation `hint`; return it converted (nested dataclasses, tuples, floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: must not be null (expected {_type_name(hint)})")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        # A mapping aimed at a dataclass member: report its own (more precise) error.
        nested = [e for e, a in zip(errors, (a for a in args if a is not type(None))) if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and nested:
            raise nested[0]
        raise ConfigError(f"{path}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise ConfigError(f"{path}: must be one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin in (list, tuple, dict) or hint in (list, tuple, dict):
        return _coerce_container(value, hint, origin or hint, args, path)
    if value is None:
        raise ConfigError(f"{path}: must not be null (expected {_type_name(hint)})")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Path:
        if isinstance(value, str | Path):
            return Path(value)
    elif isinstance(hint, type) and issubclass(hint, enum.Enum):
        for member in hint:
            if value in (member.value, member.name):
                return member
        raise ConfigError(f"{path}: must be one of {[m.value for m in hint]}, got {value!r}")
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return value
    else:
        return value
    raise ConfigError(f"{path}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")


def _coerce_container(value: Any, hint: Any, origin: type, args: tuple, path: str) -> Any:
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        value_hint = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, value_hint, _join(path, k)) for k, v in value.items()}
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
    if origin is list:
        item_hint = args[0] if args else Any
        return [_coerce(v, item_hint, f"{path}[{i}]") for i, v in enumerate(value)]
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if args and len(value) != len(args):
        raise ConfigError(f"{path}: expected a list of {len(args)} values, got {len(value)}: {list(value)!r}")
    return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
