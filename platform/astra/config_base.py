"""The configuration machinery every config of the project shares: frozen pydantic models that reject
unknown keys, presets, YAML files and dotted ``key=value`` overrides, and validation messages that name
the field to fix (with a "did you mean" for a misspelled key). The Astra model's own configs and
presets are in ``astra.config``; the jobs' configs build on both.
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A user configuration problem; the message names the field or setting to fix."""


class FrozenModel(BaseModel):
    """Base of every config model: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _fields_at(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model that ``loc`` points into, for "did you mean" hints."""
    cls: Any = model_cls
    for part in loc[:-1]:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return []
        ann = cls.model_fields[part].annotation
        # Optional[Model] / Model | None: the model member of the union
        cls = next(
            (t for t in (ann, *typing.get_args(ann)) if isinstance(t, type) and issubclass(t, BaseModel)),
            None,
        )
    return list(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []


def _format_validation_error(err: ValidationError, model_cls: type[BaseModel] | None = None) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden" and model_cls is not None:
            # a typo'd key: name the nearest real field at the same place
            fields = _fields_at(model_cls, e["loc"])
            near = difflib.get_close_matches(str(e["loc"][-1]), fields, n=1)
            if near:
                msg += f"; did you mean '{'.'.join([*map(str, e['loc'][:-1]), near[0]])}'?"
            elif fields:  # nothing close: say what the section has
                msg += f"; the fields here are {', '.join(fields)}"
        lines.append(f"{loc}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["a.b=3", "c=[1,2]"]`` -> ``{"a": {"b": 3}, "c": [1, 2]}``; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}': empty key segment")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is set both as a value and as a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return tree


def validate_config(
    data: dict[str, Any] | None, model_cls: type[BaseModel], presets: dict[str, dict[str, Any]]
) -> Any:
    """Validate a plain dict (which may name a ``preset`` of ``presets``) into ``model_cls``."""
    data = dict(data or {})
    preset = data.pop("preset", None)
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"preset: unknown preset '{preset}'; choose one of {sorted(presets)}")
        data = deep_merge(presets[preset], data)
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, model_cls)) from None


def load_config_tree(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds (ConfigError for a missing file or a non-mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config: {path} must hold a mapping at the top level")
    return loaded


def read_config(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...],
    preset: str | None,
    model_cls: type[BaseModel],
    presets: dict[str, dict[str, Any]],
) -> Any:
    """Load a config: preset (argument or ``preset:`` key in the file) <- YAML file <- dotted overrides."""
    data = load_config_tree(path) if path is not None else {}
    if preset is not None:
        data = {**data, "preset": preset}
    data = deep_merge(data, parse_overrides(list(overrides)))
    return validate_config(data, model_cls, presets)


def derive(config: BaseModel, overrides: dict[str, Any] | list[str] | tuple[str, ...]) -> Any:
    """``config`` with ``overrides`` (a nested dict, or dotted ``key=value`` strings) applied and the
    result validated as a whole; raises ConfigError naming the field, like ``load_config``."""
    tree = parse_overrides(list(overrides)) if isinstance(overrides, (list, tuple)) else overrides
    return validate_config(deep_merge(config.model_dump(), tree), type(config), presets={})
