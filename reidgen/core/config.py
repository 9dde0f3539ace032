"""Configurations as frozen-or-plain dataclasses, saved as JSON in checkpoints and run folders.

One home for the three things every configuration needs: to JSON, back from JSON (nested
dataclasses and tuples restored, unknown keys refused so a stale checkpoint fails loudly), and
named presets with field overrides that find their way into nested configurations.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from typing import Any, TypeVar

from reidgen.core.errors import ReidgenError

T = TypeVar("T")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-able values (nested dataclasses become dicts, tuples lists)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Inverse of `config_to_dict`; missing keys take their defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            value = config_from_dict(kind, value)
        elif typing.get_origin(kind) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def with_overrides(cfg: T, **overrides) -> T:
    """Replace fields; a key that is not a field of ``cfg`` goes to the nested configuration
    that has it (e.g. ``backbone`` → ``cfg.model.backbone``)."""
    own = {f.name for f in dataclasses.fields(cfg)}
    direct = {k: v for k, v in overrides.items() if k in own}
    for key in set(overrides) - own:
        nested = [f.name for f in dataclasses.fields(cfg)
                  if dataclasses.is_dataclass(getattr(cfg, f.name))
                  and key in {g.name for g in dataclasses.fields(getattr(cfg, f.name))}]
        if not nested:
            raise ValueError(f"{type(cfg).__name__} has no setting {key!r}")
        inner = direct.get(nested[0], getattr(cfg, nested[0]))
        direct[nested[0]] = dataclasses.replace(inner, **{key: overrides[key]})
    return dataclasses.replace(cfg, **direct)


def setting_names(cfg: Any) -> set[str]:
    """The names `with_overrides` accepts for ``cfg``: its own fields and those of its nested
    configurations (one level, as `with_overrides` resolves them)."""
    names = set()
    for f in dataclasses.fields(cfg):
        names.add(f.name)
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            names |= {g.name for g in dataclasses.fields(value)}
    return names


def parse_settings(pairs: list[str], names: set[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (``--set``) as overrides. A value is read as JSON when it is JSON
    (numbers, true/false, null, lists, which become tuples), else taken as a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ReidgenError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set id_cross=1.0")
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ReidgenError(f"--set {pair!r}: no setting named {key!r}{hint} (the run's config.json lists them)")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def from_preset(presets: dict[str, T], name: str, **overrides) -> T:
    if name not in presets:
        raise ReidgenError(f"unknown preset {name!r}; expected one of {', '.join(presets)}")
    return with_overrides(presets[name], **overrides)
