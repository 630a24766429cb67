"""YAML -> typed dataclass configs, with dotted CLI overrides and helpful errors.

Every section is a dataclass; unknown keys are errors that name the full dotted key
and the closest valid one. Values are checked against the field's annotated type
(int, float, bool, str, list, dict, Optional[...], nested dataclasses).
"""
from __future__ import annotations

import dataclasses
import difflib
import keyword
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


# Keys that existed once: setting one is an error that says what replaced it.
REMOVED_KEYS = {
    "algos.vgr": "VGR is configured in the token_weights: section "
                 "(token_weights.source: vgr)",
    "algos.vgr.enabled": "use token_weights.source: vgr",
    "algos.vgr.last_k": "use token_weights.last_k_layers (0 = all layers)",
    "algos.vgr.smooth_sigma": "use token_weights.smooth_sigma",
    "algos.vgr.clip_min": "use token_weights.clip: [min, max]",
    "algos.vgr.clip_max": "use token_weights.clip: [min, max]",
}


def _removed(full: str, value: Any) -> str | None:
    """The replacement message for a removed key (for a removed section: for each key set in it)."""
    if full not in REMOVED_KEYS:
        return None
    if isinstance(value, dict) and value:
        parts = [f"'{full}.{k}' was removed: {REMOVED_KEYS.get(f'{full}.{k}', REMOVED_KEYS[full])}" for k in value]
        return "; ".join(parts)
    return f"'{full}' was removed: {REMOVED_KEYS[full]}"


def _closest(key: str, options) -> str:
    m = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{m[0]}'?" if m else f"; valid keys: {', '.join(sorted(options))}"


def _coerce(value: Any, tp: Any, where: str):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_t = args[0] if args else Any
        out = [_coerce(v, item_t, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):       # YAML 1.1 reads on/off/yes/no as booleans
            return "on" if value else "off"
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in (data or {}).items():
        full = f"{where}.{key}" if where else key
        if keyword.iskeyword(key):          # e.g. trainer.async -> TrainerConfig.async_
            key = key + "_"
        if key not in fields:
            removed = _removed(full, value)
            if removed:
                raise ConfigError(f"config key {removed}")
            raise ConfigError(f"unknown config key '{full}'{_closest(key, fields)}")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    return obj


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a section")
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw != "" else "")) 
    return out


def load_yaml(path) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    try:
        with open(p) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    base = data.pop("defaults", None)     # `defaults: other.yaml` inherits another file
    if base:
        merged = load_yaml(p.parent / base)
        _deep_update(merged, data)
        data = merged
    return data


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def load_config(cls, path=None, overrides: list[str] | None = None):
    data = load_yaml(path) if path else {}
    for key, value in parse_overrides(overrides or []):
        set_dotted(data, key, value)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        src = f"{path}: " if path else ""
        raise ConfigError(f"{src}{e}") from None
