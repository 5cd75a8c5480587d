"""The toy of tests/test_sampling_recipe.py, trained with several recipes at equal steps. For each it
prints the left-minus-right contrast of 12 draws per sampler (a grey head, near 0, is the mean) and
the x0 estimate's error at t = 39 beside returning the input (docs/training.md).

    python scripts/recipe_toy_study.py STEPS LR NAMES
    python scripts/recipe_toy_study.py 800 3e-3 v_snr5,v_nosnr            # pixel space, no texture
    python scripts/recipe_toy_study.py 500 2e-3 default,demo,old          # the test's recipes and toys

NAMES: v_snr5, v_nosnr, eps_snr5, old_x0 (pixel space, the plain toy), or default, demo, old (the
recipes, model spaces and textures of tests/test_sampling_recipe.py's RECIPES).
"""
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tests.test_sampling_recipe as toy  # noqa: E402  (the toy cohort and recipes are the test's)
from diffusion_glioma.config import DataConfig, PreprocessConfig  # noqa: E402
from diffusion_glioma.data.cache import prepare_dataset  # noqa: E402
from diffusion_glioma.data.dataset import CachedCases  # noqa: E402
from diffusion_glioma.evaluation.denoiser import low_noise_errors  # noqa: E402
from diffusion_glioma.pipeline import MaskToMRIPipeline  # noqa: E402
from diffusion_glioma.training import diffusion as loop  # noqa: E402
from diffusion_glioma.training.config import load_train_config  # noqa: E402

PIXEL_VARIANTS = {"v_snr5": {"snr_gamma": 5.0}, "v_nosnr": {}, "eps_snr5": {"prediction_type": "epsilon", "snr_gamma": 5.0},
                  "old_x0": {"prediction_type": "sample", "loss_in_head": False}}


def main() -> None:
    steps, lr, names = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3].split(",")
    root = Path(tempfile.mkdtemp(prefix="recipe_toy_"))
    caches = {}
    for name in names:
        settings, model, texture = toy.RECIPES[name] if name in toy.RECIPES else (PIXEL_VARIANTS[name], {}, 0.0)
        if texture not in caches:
            cache = caches[texture] = root / f"cache_{texture}"
            prepare_dataset(toy._toy_cohort(root / f"raw_{texture}", texture), cache,
                            DataConfig(preprocess=PreprocessConfig(shape=toy.SHAPE, spacing=(12.0,) * 3)), progress=False)
        config = {"output_dir": str(root / name), "seed": 0, "data": {"cache": str(caches[texture])},
                  "model": {"preset": "tiny", "overrides": {"base_channels": 16, "norm_groups": 8, **model}},
                  "optim": {"steps": steps, "batch_size": 8, "learning_rate": lr, "warmup_steps": 20, "lr_schedule": "cosine"},
                  "diffusion": {"class_dropout": 0.0, **settings}, "ema": {"decay": 0.99},
                  "validation": {"every": 100000, "num_inference_steps": 2}, "checkpoints": {"every": 100000}, "log_every": 50}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(config))
        pipe = MaskToMRIPipeline.from_pretrained(loop.train(load_train_config(root / f"{name}.yaml")))
        item = CachedCases(caches[texture], diseases=list(pipe.disease_classes))[0]
        labels = item["labels"][None].long().repeat(12, 1, 1, 1)
        head = item["labels"].numpy() > 0
        left = np.zeros(toy.SHAPE, bool)
        left[: toy.SHAPE[0] // 2] = True
        for sampler, sampling_steps in (("ddim", 25), ("ddpm", 100)):
            volumes = pipe.use_sampler(sampler)(labels, "glioblastoma", num_inference_steps=sampling_steps, progress=False,
                                                generator=torch.Generator().manual_seed(1)).volumes.numpy()
            contrast = np.array([v[0][head & left].mean() - v[0][head & ~left].mean() for v in volumes])
            print(name, sampler, contrast.round(2), flush=True)
        truth = item["image"].float().numpy()
        error, returned_input = low_noise_errors(pipe, truth, item["labels"].numpy())
        print(name, f"truth contrast {truth[0][head & left].mean() - truth[0][head & ~left].mean():.2f}; x0 estimate "
              f"at t = 39: {error:.5f}, returning the input: {returned_input:.5f}", flush=True)


if __name__ == "__main__":
    main()
