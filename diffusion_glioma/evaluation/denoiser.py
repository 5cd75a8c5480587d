"""Checks of a trained denoiser on a held-out phantom at its own grid, which a mask-to-mean regressor
fails: its x0 estimate at the smallest sampling noise level must beat returning its input.
scripts/low_noise_check.py prints it for any model (the shipped demo weights fail it: docs/evaluation.md);
tests/test_sampling_recipe.py holds the toy recipes to it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.layouts import discover_cases
from ..data.phantom import write_cohort
from ..data.preprocess import PreparedCase, prepare_case


def held_out_phantom(folder: str | Path, grid, index: int = 100, spacing: float = 3.0) -> PreparedCase:
    """Adult phantom number `index` (the demo cohorts are numbered from 0, so 100 was never trained on),
    written to `folder` and prepared on the model grid."""
    write_cohort(folder, n_adult=1, n_pediatric=0, spacing=spacing, first_index=index, progress=False)
    return prepare_case(discover_cases(folder)[0], grid)


@torch.no_grad()
def low_noise_errors(pipe, image: np.ndarray, labels: np.ndarray, t: int = 39, seed: int = 0,
                     disease: int = 1) -> tuple[float, float]:
    """(MSE of the model's x0 estimate, MSE of returning x_t / sqrt(alpha_bar)) inside the head, in image
    space, at timestep t (39 of 1000: the last step of a 25-step trailing schedule), for one volume
    (modalities, x, y, z) and its mask on the model grid."""
    unet, scheduler = pipe.unet, pipe.scheduler
    x0 = unet.encode(torch.as_tensor(image).float()[None])
    inside = torch.as_tensor(labels) > 0
    labels = torch.as_tensor(labels).long()[None]
    step = torch.tensor([t])
    noisy = scheduler.add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)), step)
    output = unet(noisy, step, unet.condition(labels), torch.tensor([disease])).sample
    estimate = pipe.x0_estimate(output, step, noisy)
    in_head = lambda z: unet.decode(z)[0][:, inside]  # noqa: E731  (volumes, not wavelet coefficients)
    truth = in_head(x0)
    returned_input = noisy / scheduler.alphas_cumprod[step].sqrt()
    return float(((in_head(estimate) - truth) ** 2).mean()), float(((in_head(returned_input) - truth) ** 2).mean())
