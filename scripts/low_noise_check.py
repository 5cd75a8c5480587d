"""Does a trained denoiser use its input at the smallest sampling noise level? On one held-out phantom
(case 100, which no demo cohort holds) at the model's grid: the MSE inside the head of the model's x0
estimate at t = 39 of 1000 (the last step of a 25-step trailing schedule) against the MSE of simply
returning x_t / sqrt(alpha_bar). A denoiser that ignores x_t (a mask-to-mean regressor) loses.

    python scripts/low_noise_check.py --model weights/phantom-demo [--model OTHER ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from diffusion_glioma.data.layouts import discover_cases
from diffusion_glioma.data.phantom import write_cohort
from diffusion_glioma.data.preprocess import prepare_case
from diffusion_glioma.pipeline import load_pipeline


def estimate_against_input(weights: str, case_folder: Path, t: int = 39) -> tuple[float, float]:
    pipe = load_pipeline(weights)
    case = prepare_case(discover_cases(case_folder)[0], pipe.grid)
    unet, scheduler = pipe.unet, pipe.scheduler
    x0 = unet.encode(torch.from_numpy(case.image).float()[None])
    labels = torch.from_numpy(case.labels.astype(np.int64))[None]
    step = torch.tensor([t])
    noisy = scheduler.add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)), step)
    alpha, sigma = scheduler.alphas_cumprod[step].sqrt(), (1 - scheduler.alphas_cumprod[step]).sqrt()
    with torch.no_grad():
        out = unet(noisy, step, unet.condition(labels), torch.tensor([1])).sample
    estimate = {"sample": out, "epsilon": (noisy - sigma * out) / alpha,
                "v_prediction": alpha * noisy - sigma * out}[scheduler.config.prediction_type]
    inside = torch.from_numpy(case.labels > 0)
    volume = lambda z: unet.decode(z)[0][:, inside]  # noqa: E731  (volumes, not wavelet coefficients)
    truth = volume(x0)
    return float(((volume(estimate) - truth) ** 2).mean()), float(((volume(noisy / alpha) - truth) ** 2).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        write_cohort(folder, n_adult=1, n_pediatric=0, spacing=3.0, first_index=100, progress=False)
        print("| model | MSE of the x0 estimate at t = 39 | MSE of returning the input | estimate wins |")
        print("|---|---|---|---|")
        for model in args.model:
            error, baseline = estimate_against_input(model, Path(folder))
            print(f"| {model} | {error:.5f} | {baseline:.5f} | {'yes' if error < baseline else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
