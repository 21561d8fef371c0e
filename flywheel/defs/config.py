"""Launchpad config: one Dagster `Config` class per stage, generated from the stage's pydantic model.

The core config models (flywheel.data.ingest.IngestConfig, flywheel.train.config.TrainConfig, ...) are the
single source of truth: the Dagster classes have the same fields, types, descriptions and defaults (the
defaults of the embedded `default_config.yaml`, so a Launchpad run and `flywheel iterate` agree), and
`to_core()` validates with the core model itself, so an invalid value (rank 0, 18 frames, unknown key)
fails as the step starts, before any GPU work, with the field named. A stage whose core config is not in
this build yet gets a permissive config that is validated once the stage exists.
"""

from __future__ import annotations

import functools
import importlib
import types
import typing
from pathlib import Path
from typing import Any

import dagster as dg
import pydantic
import yaml
from pydantic import BaseModel

DEFAULT_CONFIG_FILE = Path(__file__).resolve().parents[1] / "default_config.yaml"

# config section -> where its core model lives ("module:Class"); the FlywheelConfig field is the fallback.
CORE_CONFIGS = {
    "model": "flywheel.config:ModelConfig",
    "ingest": "flywheel.data.ingest:IngestConfig",
    "clips": "flywheel.data.clips:ClipConfig",
    "train": "flywheel.train.config:TrainConfig",
    "evaluate": "flywheel.config:EvaluateConfig",
    "generate": "flywheel.generate.config:GenerateConfig",
    "label": None,
    "quality": None,
    "refresh": None,
}


class StageConfigError(ValueError):
    """A Launchpad / run config value the stage's own config model rejects."""


def core_config_class(section: str) -> type[BaseModel] | None:
    """The pydantic model of a config section, or None when that stage is not in this build yet."""
    where = CORE_CONFIGS.get(section)
    if where:
        module, name = where.split(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            pass
    try:
        from flywheel.config import FlywheelConfig
    except ImportError:
        return None
    field = FlywheelConfig.model_fields.get(section)
    ann = field.annotation if field else None
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


@functools.cache
def default_sections() -> dict[str, dict]:
    """The embedded default config, by section (what `flywheel iterate` runs with no config file)."""
    data = yaml.safe_load(DEFAULT_CONFIG_FILE.read_text()) if DEFAULT_CONFIG_FILE.is_file() else {}
    return {k: v for k, v in (data or {}).items() if isinstance(v, dict)}


def format_error(err: pydantic.ValidationError, where: str) -> str:
    lines = [f"{where}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


class StageSettings(dg.Config):
    """Base of the generated classes: `to_core()` builds (and so validates) the core config."""

    @classmethod
    def core_class(cls) -> type[BaseModel] | None:
        return getattr(cls, "_core_class", None)

    @classmethod
    def launchpad_only(cls) -> frozenset[str]:
        return getattr(cls, "_launchpad_only", frozenset())

    def core_values(self) -> dict[str, Any]:
        data = self.model_dump()
        return {k: v for k, v in data.items() if k not in self.launchpad_only()}

    def to_core(self, section: str | None = None, **overrides) -> BaseModel:
        core = self.core_class() or core_config_class(section or getattr(self, "_section", ""))
        if core is None:
            raise StageConfigError(f"config section {getattr(self, '_section', '?')!r}: this stage is not available "
                                   "in this build yet")
        values = {**self.core_values(), **overrides}
        try:
            return core.model_validate(values)
        except pydantic.ValidationError as e:
            raise StageConfigError(format_error(e, f"{getattr(self, '_section', core.__name__)} config")) from None


class PermissiveStageSettings(dg.PermissiveConfig, StageSettings):
    """For a stage whose core config is not in this build yet: any keys, validated by the stage later."""

    def core_values(self) -> dict[str, Any]:
        data = dict(self.model_dump())
        data.update(self.model_extra or {})
        return {k: v for k, v in data.items() if k not in self.launchpad_only()}


def _dagster_annotation(ann: Any, name: str) -> Any:
    """A Dagster-config-compatible version of a pydantic annotation (paths as str, dict keys as str)."""
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if ann is Path:
        return str
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return settings_class(ann, name, section=name)
    if origin in (typing.Union, types.UnionType):
        # Dagster config has enums for a bare Literal but not for one inside a union (e.g. Literal[...] | None):
        # there it becomes a str, still checked by the core model in to_core().
        converted = tuple(str if typing.get_origin(a) is typing.Literal else _dagster_annotation(a, name) for a in args)
        return functools.reduce(lambda a, b: a | b, converted) if origin is types.UnionType else typing.Union[converted]
    if origin is list:
        return list[_dagster_annotation(args[0], name)] if args else list
    if origin is dict:
        return dict[str, _dagster_annotation(args[1], name)] if args else dict
    if origin is tuple:
        return list[_dagster_annotation(args[0], name)] if args else list
    return ann


def _expressible(ann: Any, name: str) -> Any:
    """`ann` if Dagster config can express it, else Any (the core model still validates the value)."""
    probe = pydantic.create_model(f"Probe_{name}", __base__=dg.Config, **{name: (ann, ...)})
    try:
        probe.to_config_schema()
    except Exception:
        return Any
    return ann


def _dagster_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _dagster_default(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_dagster_default(v) for v in value]
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def settings_class(
    core: type[BaseModel] | None,
    name: str,
    section: str,
    defaults: dict | None = None,
    launchpad_only: dict[str, tuple[Any, Any, str]] | None = None,
) -> type[StageSettings]:
    """A Dagster Config class mirroring `core` (fields, types, descriptions; defaults overridden by `defaults`).

    `launchpad_only` adds fields the stage config does not have (gate thresholds, which adapter to use):
    name -> (annotation, default, description); they are left out of `to_core()`.
    """
    launchpad_only = launchpad_only or {}
    fields: dict[str, Any] = {}
    if core is not None:
        defaults = defaults or {}
        for fname, f in core.model_fields.items():
            if fname in defaults:
                default = defaults[fname]
            elif f.is_required():
                default = ""  # required in the core model: filled by the asset (e.g. ingest.source from the domain)
            else:
                default = f.get_default(call_default_factory=True)
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                # a nested section (e.g. label.idm): its own class, with the embedded defaults down to its fields
                nested = _dagster_default(default) if isinstance(default, (dict, BaseModel)) else {}
                ann = settings_class(f.annotation, f"{name}_{fname}", section=fname, defaults=nested)
                default = ann()
            else:
                ann = _expressible(_dagster_annotation(f.annotation, f"{name}_{fname}"), fname)
                default = _dagster_default(default)
            fields[fname] = (ann, pydantic.Field(default=default, description=f.description))
    for fname, (ann, default, description) in launchpad_only.items():
        fields[fname] = (ann, pydantic.Field(default=default, description=description))
    base = StageSettings if core is not None else PermissiveStageSettings
    cls = pydantic.create_model(name, __base__=base, **fields)
    cls._core_class = core
    cls._section = section
    cls._launchpad_only = frozenset(launchpad_only)
    cls.__doc__ = (f"Launchpad config of the `{section}` stage (mirrors {core.__module__}.{core.__name__})"
                   if core is not None else f"Launchpad config of the `{section}` stage (any keys; validated by the stage)")
    try:
        cls.to_config_schema()
    except Exception as e:  # a field type Dagster config cannot express: fall back rather than break loading
        raise TypeError(f"cannot express {section} config as Dagster config: {e}") from e
    return cls


def stage_settings(section: str, name: str, launchpad_only: dict[str, tuple[Any, Any, str]] | None = None,
                   defaults: dict | None = None):
    """The Dagster Config class of a stage section, defaults from the embedded default config (then `defaults`)."""
    core = core_config_class(section)
    defaults = {**default_sections().get(section, {}), **(defaults or {})}
    return settings_class(core, name, section, defaults, launchpad_only)
