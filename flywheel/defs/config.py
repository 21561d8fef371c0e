"""The run config in the Launchpad: one Dagster `Config` class mirroring flywheel.config.FlywheelConfig.

The core config models are the single source of truth: the Dagster classes have the same sections, fields,
types, descriptions and defaults (FlywheelConfig's, i.e. `flywheel config`), and `to_core()` validates the
values with FlywheelConfig itself, so an invalid value (rank 0, 18 frames, an unknown key) fails as the run's
first step starts, before any GPU work, with the field named. The `flywheel` resource carries it (`run`):
every asset of a run reads the same config, as the CLI's runs do.
"""

from __future__ import annotations

import functools
import types
import typing
from pathlib import Path
from typing import Any

import dagster as dg
import pydantic
from pydantic import BaseModel

# FlywheelConfig fields the resource sets itself: the home is the resource's, the domain is the partition.
NOT_IN_LAUNCHPAD = ("home", "domain")


class RunSettings(dg.Config):
    """Base of the generated class: `to_core()` builds (and so validates) the core config."""

    def to_core(self, **fields: Any):
        from flywheel.config import Layer, validate_layers

        values = self.model_dump()
        return validate_layers([Layer.from_mapping(values, "the Launchpad (resources.flywheel.config.run)"),
                                Layer.from_mapping(fields, "the flywheel resource")])


def _dagster_annotation(ann: Any, name: str) -> Any:
    """A Dagster-config-compatible version of a pydantic annotation (paths as str, dict keys as str)."""
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if ann is Path:
        return str
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return settings_class(ann, name, {})
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


def settings_class(core: type[BaseModel], name: str, defaults: dict, exclude: tuple[str, ...] = ()) -> type:
    """A Dagster Config class mirroring `core` (fields, types, descriptions), with `defaults` as its defaults."""
    fields: dict[str, Any] = {}
    for fname, f in core.model_fields.items():
        if fname in exclude:
            continue
        default = defaults.get(fname)
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            ann = settings_class(f.annotation, f"{name}_{fname}", default or {})
            default = ann()
        else:
            ann = _expressible(_dagster_annotation(f.annotation, f"{name}_{fname}"), fname)
            default = _dagster_default(default)
        fields[fname] = (ann, pydantic.Field(default=default, description=f.description))
    cls = pydantic.create_model(name, __base__=RunSettings if not exclude and name == "RunSettings" else dg.Config,
                                **fields)
    cls.__doc__ = f"Launchpad mirror of {core.__module__}.{core.__name__}"
    return cls


@functools.cache
def run_settings_class() -> type[RunSettings]:
    """The Launchpad's `run` config: every section of FlywheelConfig, with its defaults."""
    from flywheel.config import FlywheelConfig

    defaults = FlywheelConfig().model_dump(mode="json")
    sections = settings_class(FlywheelConfig, "FlywheelRunSections", defaults, exclude=NOT_IN_LAUNCHPAD)
    cls = pydantic.create_model("RunSettings", __base__=(sections, RunSettings))
    cls.__doc__ = "The whole run's config (flywheel.config.FlywheelConfig without home and domain)"
    cls.to_config_schema()  # fails loudly here if a field type cannot be expressed as Dagster config
    return cls
