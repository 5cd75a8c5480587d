"""The diffusion recipe samples instead of regressing. A tiny model trained on a toy cohort whose
conditional distribution is bimodal (one mask; the left half of the head bright and the right dark,
or the other way round, each half the time) must draw both modes in roughly equal shares, where a
mask-to-mean regressor draws a grey head; and at the smallest sampling noise level its x0 estimate
must beat returning its input. The old recipe (x0-prediction over the whole grid, raw wavelet bands,
the mask as block means) is trained too, and the second test must find it worse than its input."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import ndimage

from diffusion_glioma.config import DataConfig, PreprocessConfig
from diffusion_glioma.data.cache import prepare_dataset
from diffusion_glioma.evaluation.denoiser import low_noise_errors
from diffusion_glioma.pipeline import MaskToMRIPipeline
from diffusion_glioma.training import diffusion as loop
from diffusion_glioma.training.config import load_train_config
from tests.helpers import write_nifti

SHAPE = (16, 16, 16)
MODALITIES = ("t1n", "t1c", "t2w", "t2f")
WAVELET = {"wavelet": True, "wavelet_mask": "haar"}
# The recipes under test, as (diffusion settings, model overrides, fine texture sd): the package's
# default (the research configs'), in pixel space; the demo weights' recipe (configs/demo.yaml: x0 with
# EDM's skip at sigma_data 0.25 and log-normal levels) in wavelet space, as the demo weights are, on a
# toy with a fine texture the mask does not fix (interior anatomy's stand-in, carried by the detail
# bands); and the recipe before issue 24 on that same toy. In wavelet space the default's estimate at
# t = 39 equals its input to 1 % at this budget (0.00256 against 0.00258), too close for a test, so
# the default is held to both tests in pixel space, where the bimodal test is reliable.
RECIPES = {
    "default": ({}, {}, 0.0),
    "demo": ({"prediction_type": "sample", "skip_sigma_data": 0.25, "noise_levels": "lognormal",
              "lognormal_mean": -0.5}, WAVELET, 0.1),
    "old": ({"prediction_type": "sample", "loss_in_head": False, "normalise_wavelet_bands": False},
            {"wavelet": True, "wavelet_mask": "mean"}, 0.1),
}
BEATS_ITS_INPUT = {"default": True, "demo": True, "old": False}


def fine_pattern() -> np.ndarray:
    """A voxel checkerboard: the finest pattern a grid carries (in Haar space, all in one detail band)."""
    return (-1.0) ** np.indices(SHAPE).sum(0)


def _toy_cohort(folder: Path, texture: float, n: int = 16, modes: str = "halves") -> Path:
    """`modes`: "halves" (the mode is which half of the head is bright) or "fine" (a uniform head
    carrying the fine pattern with one sign or the other: the mode sits where a model that ignores its
    noisy input at low noise draws the mean, flat)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    head = np.sqrt((grid ** 2).sum(0)) < 0.85
    tumour = np.sqrt(((grid - np.array([0.0, 0.3, 0.0])[:, None, None, None]) ** 2).sum(0)) < 0.3
    seg = np.where(tumour & head, 2, 0).astype(np.int16)  # BraTS 2021 oedema
    affine = np.diag([12.0, 12.0, 12.0, 1.0])
    left = grid[0] < 0
    rng = np.random.default_rng(0)
    for i in range(n):
        mode = i % 2  # half the cases each way
        bright = left if mode == 0 else ~left
        fine = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 0.7)  # a texture of its own for every case
        base = np.where(bright, 0.9, 0.3) if modes == "halves" else 0.6 + (0.15 if mode == 0 else -0.15) * fine_pattern()
        image = np.where(head, base + 0.02 * rng.standard_normal(SHAPE) + texture * fine / fine.std(), 0.0)
        case = folder / f"BraTS2021_{i:05d}"
        for m in MODALITIES:
            write_nifti(case / f"{case.name}_{ {'t1n': 't1', 't1c': 't1ce', 't2w': 't2', 't2f': 'flair'}[m]}.nii.gz",
                        image, affine)
        write_nifti(case / f"{case.name}_seg.nii.gz", seg, affine, dtype=np.int16)
    return folder


def train_toy_model(root: Path, recipe: str, steps: int = 500, learning_rate: float = 2e-3,
                    recipes: dict = RECIPES, modes: str = "halves") -> tuple[MaskToMRIPipeline, dict]:
    """A tiny model trained with `recipes[recipe]` on its toy cohort under `root`; (pipeline, first case)."""
    from diffusion_glioma.data.dataset import CachedCases

    settings, model, texture = recipes[recipe]
    cohort, cache = _toy_cohort(root / "raw", texture, modes=modes), root / "cache"
    prepare_dataset(cohort, cache, DataConfig(preprocess=PreprocessConfig(shape=SHAPE, spacing=(12.0,) * 3)),
                    progress=False)
    config = {
        "output_dir": str(root / "run"), "seed": 0, "data": {"cache": str(cache)},
        "model": {"preset": "tiny", "overrides": {"base_channels": 16, "norm_groups": 8, **model}},
        "optim": {"steps": steps, "batch_size": 8, "learning_rate": learning_rate, "warmup_steps": 20,
                  "lr_schedule": "cosine"},
        "diffusion": {"class_dropout": 0.0, **settings},
        "ema": {"decay": 0.99},
        "validation": {"every": 100000, "num_inference_steps": 2},
        "checkpoints": {"every": 100000},
        "log_every": 50,
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    pipe = MaskToMRIPipeline.from_pretrained(loop.train(load_train_config(path)))
    return pipe, CachedCases(cache, diseases=list(pipe.disease_classes))[0]


def left_minus_right(volumes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The first modality's mean left of the head's midline minus right of it, per volume: the toy's mode
    (about +-1.2 in the data range; a grey head, the mean, near 0)."""
    head = labels > 0
    left = np.zeros(SHAPE, dtype=bool)
    left[: SHAPE[0] // 2] = True
    return np.array([v[0][head & left].mean() - v[0][head & ~left].mean() for v in volumes])


def fine_sign(volumes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The first modality's projection on the fine pattern inside the head, per volume: the fine toy's
    mode (about +-0.77 in the model's range without texture, +-0.42 with texture 0.1, as each case's
    head is stretched to [-1, 1]; the flat mean, 0)."""
    head, pattern = labels > 0, fine_pattern()
    return np.array([(v[0][head] * pattern[head]).mean() for v in volumes])


@pytest.fixture(scope="module", params=list(RECIPES))
def toy_model(tmp_path_factory, request) -> tuple[MaskToMRIPipeline, dict, str]:
    return *train_toy_model(tmp_path_factory.mktemp(f"bimodal_{request.param}"), request.param), request.param


def test_a_bimodal_conditional_is_sampled_in_both_modes(toy_model):
    pipe, item, recipe = toy_model
    if recipe != "default":
        # In wavelet space at this budget the demo recipe drew 9 of 24 draws bright-left on one textured
        # toy and 24 of 24 on this one, and the old recipe both modes: this test cannot rank them there.
        pytest.skip(f"{recipe}: the bimodal test is not reliable in wavelet space at 500 steps (docs/training.md)")
    labels = item["labels"][None].long().repeat(24, 1, 1, 1)
    pipe.use_sampler("ddim")
    volumes = pipe(labels, "glioblastoma", num_inference_steps=25, generator=torch.Generator().manual_seed(1),
                   progress=False).volumes.numpy()
    contrast_true = abs(left_minus_right(item["image"].float().numpy()[None], item["labels"].numpy())[0])
    contrast = left_minus_right(volumes, item["labels"].numpy())
    decided = np.abs(contrast) > 0.5 * contrast_true  # a grey head (the mean) decides nothing
    bright_left = int((contrast > 0)[decided].sum())
    assert decided.mean() >= 0.75, contrast.round(2)
    assert 5 <= bright_left <= decided.sum() - 5, contrast.round(2)  # both modes, neither rare


def test_at_the_smallest_noise_level_the_estimate_beats_its_input(toy_model):
    """And the old recipe's does not: it redraws the mask's mean texture instead of correcting its input
    (measured 0.034 against 0.0055; the demo recipe 0.0023 against 0.0026)."""
    pipe, item, recipe = toy_model
    error, returning_the_input = low_noise_errors(pipe, item["image"].float().numpy(), item["labels"].numpy())
    assert (error < returning_the_input) == BEATS_ITS_INPUT[recipe], (recipe, error, returning_the_input)
