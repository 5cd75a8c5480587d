"""Shared fixtures. Every file a test reads is written by the tests themselves; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusion_glioma.config import DataConfig, PreprocessConfig
from diffusion_glioma.data.phantom import write_cohort

SMALL = PreprocessConfig(shape=(24, 24, 24), spacing=(8.0, 8.0, 8.0))


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Three adult and two pediatric phantoms at 3 mm (about 6 s, once per test session)."""
    root = tmp_path_factory.mktemp("phantom")
    write_cohort(root, n_adult=3, n_pediatric=2, spacing=3.0, seed=7, progress=False)
    return root


@pytest.fixture
def small_config() -> DataConfig:
    return DataConfig(preprocess=SMALL)
