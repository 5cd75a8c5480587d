"""Typed configuration: YAML files validated by pydantic, where an unknown key or a wrong type is an error.

Each stage owns its config model (the data config lives here because every stage reads data); this
module only loads and validates.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .modalities import canonical_modality

ModelT = TypeVar("ModelT", bound=BaseModel)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PreprocessConfig(StrictModel):
    """How raw cases become model-space arrays (see docs/data_format.md)."""

    modalities: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f")
    shape: tuple[int, int, int] = (96, 112, 96)
    spacing: tuple[float, float, float] = Field((2.0, 2.0, 2.0), description="model voxel size in mm")
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    foreground_fraction: float = Field(0.1, gt=0, lt=1, description="head = |voxel - background| above this "
                                       "fraction of the robust maximum, in any modality")
    affine_tolerance: float = Field(1e-3, gt=0, description="largest affine difference (mm) between a case's files")

    @field_validator("modalities")
    @classmethod
    def _known_modalities(cls, value):
        names = tuple(canonical_modality(m) for m in value)
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"modalities must be distinct and non-empty, got {list(value)}")
        return names

    @field_validator("shape")
    @classmethod
    def _positive_shape(cls, value):
        if min(value) < 8:
            raise ValueError(f"every shape axis must be at least 8 voxels, got {list(value)}")
        return value

    @field_validator("spacing")
    @classmethod
    def _positive_spacing(cls, value):
        if min(value) <= 0:
            raise ValueError(f"spacing must be positive, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _percentiles_ordered(self):
        low, high = self.clip_percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"clip_percentiles must satisfy 0 <= low < high <= 100, got {[low, high]}")
        return self


class DataConfig(StrictModel):
    """Which raw data to read and how to prepare it."""

    layout: str = "auto"
    labels: str | dict[int, int] | None = None
    disease: str | None = None
    preprocess: PreprocessConfig = PreprocessConfig()


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def parse_config(model: type[ModelT], data: dict, source: str | Path = "config") -> ModelT:
    """Validate `data` against `model`; errors name the file and every bad key in one line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{where}: {message}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def load_config(model: type[ModelT], path: str | Path) -> ModelT:
    return parse_config(model, load_yaml(path), path)
