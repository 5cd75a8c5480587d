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

from diffusion_glioma.evaluation.denoiser import held_out_phantom, low_noise_errors
from diffusion_glioma.pipeline import load_pipeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True)
    args = parser.parse_args()
    print("| model | MSE of the x0 estimate at t = 39 | MSE of returning the input | estimate wins |")
    print("|---|---|---|---|")
    for model in args.model:
        pipe = load_pipeline(model)
        with tempfile.TemporaryDirectory() as folder:
            case = held_out_phantom(Path(folder), pipe.grid)
            error, baseline = low_noise_errors(pipe, case.image, case.labels)
        print(f"| {model} | {error:.5f} | {baseline:.5f} | {'yes' if error < baseline else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
