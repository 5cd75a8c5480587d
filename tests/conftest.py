"""Shared fixtures. Every file a test reads is written by the tests themselves; nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from diffusion_glioma.config import DataConfig, PreprocessConfig
from diffusion_glioma.data.phantom import write_cohort

SMALL = PreprocessConfig(shape=(24, 24, 24), spacing=(8.0, 8.0, 8.0))
TINY_DATA = SMALL.model_copy(update={"shape": (16, 16, 16), "spacing": (12.0, 12.0, 12.0)})


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Three adult and two pediatric phantoms at 3 mm (about 6 s, once per test session)."""
    root = tmp_path_factory.mktemp("phantom")
    write_cohort(root, n_adult=3, n_pediatric=2, spacing=3.0, seed=7, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_cache(phantom_dir, tmp_path_factory) -> Path:
    """The phantoms prepared at 16^3, 12 mm: the training cache of the tiny models (read, never written,
    by the tests that train on it)."""
    from diffusion_glioma.data.cache import prepare_dataset

    cache = tmp_path_factory.mktemp("cache")
    prepare_dataset(phantom_dir, cache, DataConfig(preprocess=TINY_DATA), progress=False)
    return cache


@pytest.fixture
def small_config() -> DataConfig:
    return DataConfig(preprocess=SMALL)


@pytest.fixture
def group_umask():
    """A lab's umask (0002: the group may read and write) for the test's own files, whatever the CI's: a
    file left 0600 then differs from one written by open(), under 022 or 002 alike (not under 077)."""
    old = os.umask(0o002)
    yield
    os.umask(old)
