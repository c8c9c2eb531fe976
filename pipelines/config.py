"""Frozen dataclass configs from YAML recipes and ``key.sub=value`` overrides, strictly checked.

Unknown keys and values of the wrong type are rejected with one line naming the dotted key, so
a typo fails before Ray starts. Values from the command line are parsed as YAML scalars
(``0.03``, ``true``, ``[120, 160]``, ``null``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, described in one line naming the key."""


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " or ".join(repr(value) for value in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in get_args(annotation))
    if origin in (tuple, list):
        return f"a list of {_type_name(get_args(annotation)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(get_args(annotation)[0])} to {_type_name(get_args(annotation)[1])}"
    return getattr(annotation, "__name__", str(annotation))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` as an instance of ``annotation``, or ConfigError naming ``key``."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        if value in get_args(annotation):
            return value
        raise ConfigError(f"{key}={value!r} is invalid: expected {_type_name(annotation)}")
    if origin in (Union, types.UnionType):
        arguments = get_args(annotation)
        if value is None and type(None) in arguments:
            return None
        for argument in arguments:
            if argument is type(None):
                continue
            try:
                return _coerce(value, argument, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} is invalid: expected {_type_name(annotation)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is invalid: expected {_type_name(annotation)}")
        element = get_args(annotation)[0]
        return tuple(_coerce(item, element, f"{key}[{index}]") for index, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} is invalid: expected {_type_name(annotation)}")
        key_type, value_type = get_args(annotation)
        return {
            _coerce(name, key_type, key): _coerce(item, value_type, f"{key}.{name}") for name, item in value.items()
        }
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {annotation.__name__} fields, got {value!r}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" (no sign after e, no dot) as a string
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}={value!r} is invalid: expected {_type_name(annotation)}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping; missing keys keep their defaults.

    Raises:
        ConfigError: an unknown key or a value of the wrong type.
    """
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {}
    for name, value in data.items():
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key {prefix}{name} (known keys here: {known})")
        values[name] = _coerce(value, hints[name], f"{prefix}{name}")
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict (tuples as lists), suitable for YAML, JSON and MLflow params."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {field.name: plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    return plain(config)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a nested mapping (a new mapping is returned).

    Raises:
        ConfigError: an override without ``=`` or one that descends into a non-mapping.
    """
    result = yaml.safe_load(yaml.safe_dump(data)) or {}
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return result


def _yaml_problem(error: yaml.YAMLError) -> str:
    """The parser's complaint in one line, with where it is (``line L, column C``)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{' '.join(problem.split())}"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; ConfigError when it is unreadable or not a mapping."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(error)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections")
    return data
