"""The flywheel run configuration: one YAML file, validated before any work starts.

Each stage owns its config model (in its own package); this module composes them. Unknown keys and
bad values fail with the field's path, e.g. `train.rank: Input should be greater than 0`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flywheel.data.clips import ClipConfig
from flywheel.data.ingest import IngestConfig
from flywheel.errors import ConfigError
from flywheel.generate.config import GenerateConfig
from flywheel.label.config import IdmConfig, LabelConfig
from flywheel.quality.config import FilterConfig
from flywheel.refresh.config import RefreshConfig, UsefulnessConfig
from flywheel.train.config import TrainConfig


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: str = Field("tiny", description="tiny | tiny-pusht | cosmos-predict2.5-2b | cosmos-predict2.5-2b-random | a local diffusers dir")
    safety: Literal["auto", "guardrail", "opt-out"] = "auto"
    seed: int = Field(0, ge=0, description="seed of the random-weight presets")
    device: str | None = Field(None, description="torch device; None = cuda if available else cpu")


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    split: Literal["val", "test", "train"] = "val"
    max_clips: int = Field(4, gt=0)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    min_psnr_gain_db: float = Field(0.0, ge=0, description="adapter must beat the base model's PSNR by more than this")
    max_psnr_drop_vs_champion_db: float = Field(
        0.5, ge=0, description="adapter may trail the domain's current champion by at most this PSNR")


class LabelStageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    idm: IdmConfig = Field(default_factory=IdmConfig, description="the domain's inverse dynamics model")
    window: LabelConfig = Field(default_factory=LabelConfig, description="sliding-window labelling")


class RefreshStageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: RefreshConfig = Field(default_factory=RefreshConfig)
    usefulness: UsefulnessConfig = Field(default_factory=UsefulnessConfig)
    usefulness_report: bool = Field(True, description="train the IDM on real vs real+synthetic and gate on it")


class FlywheelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    home: str | None = Field(None, description="flywheel home; default $FLYWHEEL_HOME or ./.flywheel")
    domain: str = Field("default", pattern=r"^[a-z0-9][a-z0-9_-]*$")
    iteration: int | None = Field(None, ge=1, description="flywheel iteration number; None = the domain's next")
    model: ModelConfig = Field(default_factory=ModelConfig)
    ingest: IngestConfig
    clips: ClipConfig = Field(default_factory=ClipConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    label: LabelStageConfig = Field(default_factory=LabelStageConfig)
    quality: FilterConfig = Field(default_factory=FilterConfig)
    refresh: RefreshStageConfig = Field(default_factory=RefreshStageConfig)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `flywheel config --show-defaults` lists the keys)"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> FlywheelConfig:
    """Read and validate a YAML config (or only `overrides` when no file is given)."""
    data: dict = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model, ingest, clips, train, ...)")
    data = deep_merge(data, overrides or {})
    try:
        return FlywheelConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
