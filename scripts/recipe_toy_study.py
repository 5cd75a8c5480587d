"""The bimodal toy of tests/test_sampling_recipe.py, trained with several recipes at equal steps; prints
each recipe's left-minus-right contrast of 12 draws per sampler (a grey head, near 0, is the mean).

    python scripts/recipe_toy_study.py STEPS LR v_snr5,v_nosnr,eps_snr5,old_x0
"""
import sys
from pathlib import Path

import numpy as np
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tests.test_sampling_recipe as T  # noqa: E402  (the toy cohort is the test's)
import yaml
from diffusion_glioma.config import DataConfig, PreprocessConfig
from diffusion_glioma.data.cache import prepare_dataset
from diffusion_glioma.pipeline import MaskToMRIPipeline
from diffusion_glioma.training.config import load_train_config
from diffusion_glioma.data.dataset import CachedCases
def main():
    import tempfile
    root = Path(tempfile.mkdtemp(prefix="recipe_toy_"))
    cohort = T._toy_cohort(root / "raw"); cache = root / "cache"
    prepare_dataset(cohort, cache, DataConfig(preprocess=PreprocessConfig(shape=T.SHAPE, spacing=(12.0,)*3)), progress=False)
    variants = {"v_snr5": {}, "v_nosnr": {"snr_gamma": None}, "eps_snr5": {"prediction_type": "epsilon"}, "old_x0": {"prediction_type": "sample", "snr_gamma": None, "loss_in_head": False}}
    steps = int(sys.argv[1]); lr = float(sys.argv[2])
    for name in sys.argv[3].split(","):
        d = variants[name]
        config = {"output_dir": str(root / name), "seed": 0, "data": {"cache": str(cache)},
            "model": {"preset": "tiny", "overrides": {"base_channels": 16, "norm_groups": 8}},
            "optim": {"steps": steps, "batch_size": 8, "learning_rate": lr, "warmup_steps": 20, "lr_schedule": "cosine"},
            "diffusion": {"class_dropout": 0.0, **d}, "ema": {"decay": 0.99},
            "validation": {"every": 100000, "num_inference_steps": 2}, "checkpoints": {"every": 100000}, "log_every": 50}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(config))
        cfg = load_train_config(root / f"{name}.yaml")
        import diffusion_glioma.training.diffusion as L
        pipe = MaskToMRIPipeline.from_pretrained(L.train(cfg))
        item = CachedCases(cache, diseases=list(pipe.disease_classes))[0]
        labels = item["labels"][None].long().repeat(12, 1, 1, 1)
        head = item["labels"].numpy() > 0
        left = np.zeros(T.SHAPE, bool); left[:8] = True
        for sampler in ("ddim", "ddpm"):
            pipe.use_sampler(sampler)
            vol = pipe(labels, "glioblastoma", num_inference_steps=25 if sampler=="ddim" else 100, generator=torch.Generator().manual_seed(1), progress=False).volumes.numpy()
            c = np.array([v[0][head & left].mean() - v[0][head & ~left].mean() for v in vol])
            print(name, sampler, c.round(2), flush=True)
        truth = item["image"].float().numpy()
        print("truth", truth[0][head & left].mean() - truth[0][head & ~left].mean())

if __name__ == '__main__':
    main()
