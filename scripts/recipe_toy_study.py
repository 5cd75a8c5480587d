"""The toy of tests/test_sampling_recipe.py, trained with several recipes at equal steps. For each it
prints the mode of 12 draws per sampler (the left-minus-right contrast; a grey head, near 0, is the
mean) and the x0 estimate's error at t = 39 beside returning the input (docs/training.md).

    python scripts/recipe_toy_study.py STEPS LR NAMES [MODES [DRAWS]]
    python scripts/recipe_toy_study.py 800 3e-3 v_snr5,v_nosnr            # pixel space, no texture
    python scripts/recipe_toy_study.py 500 2e-3 default,demo,old          # the test's recipes and toys
    python scripts/recipe_toy_study.py 500 2e-3 default,demo,old fine 24  # the mode in the finest detail

MODES: halves (the test's toy: which half of the head is bright) or fine (a uniform head carrying a
voxel checkerboard of either sign; the mode printed is the projection on it, the flat mean near 0).
DRAWS: draws per sampler (default 12).

NAMES: v_snr5, v_nosnr, eps_snr5, old_x0 (pixel space, the plain toy), or default, demo, old (the
recipes, model spaces and textures of tests/test_sampling_recipe.py's RECIPES).
"""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tests.test_sampling_recipe as toy  # noqa: E402  (the toy cohort and recipes are the test's)
from diffusion_glioma.evaluation.denoiser import low_noise_errors  # noqa: E402

# The plain toy's variants (pixel space, no texture), beside the test's RECIPES.
PIXEL_VARIANTS = {"v_snr5": ({"snr_gamma": 5.0}, {}, 0.0), "v_nosnr": ({}, {}, 0.0),
                  "eps_snr5": ({"prediction_type": "epsilon", "snr_gamma": 5.0}, {}, 0.0),
                  "old_x0": ({"prediction_type": "sample", "loss_in_head": False}, {}, 0.0)}


def main() -> None:
    steps, lr, names = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3].split(",")
    modes = sys.argv[4] if len(sys.argv) > 4 else "halves"
    draws = int(sys.argv[5]) if len(sys.argv) > 5 else 12
    mode_of = toy.left_minus_right if modes == "halves" else toy.fine_sign
    root = Path(tempfile.mkdtemp(prefix="recipe_toy_"))
    recipes = {**PIXEL_VARIANTS, **toy.RECIPES}
    for name in names:
        pipe, item = toy.train_toy_model(root / name, name, steps, lr, recipes, modes)
        labels = item["labels"].numpy()
        for sampler, sampling_steps in (("ddim", 25), ("ddpm", 100)):
            volumes = pipe.use_sampler(sampler)(torch.from_numpy(labels)[None].long().repeat(draws, 1, 1, 1), "glioblastoma",
                                                num_inference_steps=sampling_steps, progress=False,
                                                generator=torch.Generator().manual_seed(1)).volumes.numpy()
            print(name, sampler, mode_of(volumes, labels).round(2).tolist(), flush=True)
        truth = item["image"].float().numpy()
        error, returned_input = low_noise_errors(pipe, truth, labels)
        print(name, f"truth's mode {mode_of(truth[None], labels)[0]:.2f}; x0 estimate at t = 39: "
              f"{error:.5f}, returning the input: {returned_input:.5f}", flush=True)


if __name__ == "__main__":
    main()
