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


def _nested(cfg: Any) -> list[str]:
    """Names of the fields of ``cfg`` that are configurations themselves."""
    return [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]


def with_overrides(cfg: T, **overrides) -> T:
    """Replace fields; a key that is not a field of ``cfg`` goes to the nested configuration
    that has it, at any depth (e.g. ``backbone`` → ``cfg.model.backbone``, ``code_norm`` →
    ``cfg.model.generator.code_norm``)."""
    own = {f.name for f in dataclasses.fields(cfg)}
    direct = {k: v for k, v in overrides.items() if k in own}
    for key in set(overrides) - own:
        holder = next((name for name in _nested(cfg) if key in setting_names(getattr(cfg, name))), None)
        if holder is None:
            raise ValueError(f"{type(cfg).__name__} has no setting {key!r}")
        direct[holder] = with_overrides(direct.get(holder, getattr(cfg, holder)), **{key: overrides[key]})
    return dataclasses.replace(cfg, **direct)


def setting_names(cfg: Any) -> set[str]:
    """The names `with_overrides` accepts for ``cfg``: its own fields and those of its nested
    configurations, at any depth."""
    names = {f.name for f in dataclasses.fields(cfg)}
    for name in _nested(cfg):
        names |= setting_names(getattr(cfg, name))
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
