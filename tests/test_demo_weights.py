"""The shipped demo weights load, describe themselves, and sample."""

from pathlib import Path

import numpy as np
import torch
from huggingface_hub import ModelCard

from diffusion_glioma.evaluation.denoiser import held_out_phantom, low_noise_errors
from diffusion_glioma.generate import GenerateOptions, generate_dataset
from diffusion_glioma.pipeline import MaskToMRIPipeline, load_pipeline

DEMO = Path(__file__).resolve().parents[1] / "weights" / "phantom-demo"


def test_demo_weights_load_and_sample():
    pipe = load_pipeline(DEMO)
    assert isinstance(pipe, MaskToMRIPipeline) and pipe.unet.dtype == torch.float32
    assert pipe.modalities == ["t1n", "t1c", "t2w", "t2f"]
    assert pipe.disease_classes == ["none", "glioblastoma", "pediatric_diffuse_glioma"]
    assert pipe.config.preprocess["shape"] == [64, 80, 64] and pipe.config.preprocess["spacing"] == [3.0, 3.0, 3.0]
    assert pipe.unet.config.wavelet
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size < 25 * 2**20
    card = ModelCard.load(DEMO / "README.md")
    assert "phantom" in card.data.tags and "Trained on synthetic phantoms only" in card.text
    # An ellipsoidal head at the real grid with a tumour: oedema around enhancing tissue.
    r = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n) for n in (64, 80, 64)], indexing="ij"))
    labels = ((r / torch.tensor([0.75, 0.8, 0.7])[:, None, None, None]).pow(2).sum(0) < 1).long()[None]
    labels[:, 40:50, 44:54, 36:44] = 3
    labels[:, 42:48, 46:52, 38:42] = 4
    volumes = pipe.use_sampler("dpm++")(labels, "glioblastoma", num_inference_steps=8,
                                         generator=torch.Generator().manual_seed(0), progress=False).volumes
    assert volumes.shape == (1, 4, 64, 80, 64) and torch.isfinite(volumes).all()
    head = labels[0] > 0
    # A trained model, not noise: FLAIR is brighter in the oedema than in the rest of the head.
    flair = volumes[0, 3]
    assert flair[labels[0] == 3].mean() > flair[head & (labels[0] == 1)].mean()


def test_demo_weights_generate_from_phantom_masks(phantom_dir, tmp_path):
    records = generate_dataset(DEMO, phantom_dir, tmp_path / "out", GenerateOptions(limit=1, steps=5), progress=False)
    assert len(records) == 1 and (tmp_path / "out" / "samples.png").stat().st_size > 5000
    import nibabel as nib

    image = nib.load(str(tmp_path / "out" / records[0]["files"]["t1n"]))
    data = np.asarray(image.dataobj)
    assert data.max() > 0.3 and data.min() == 0.0
    # Anatomy, not noise: inside the head the sample follows the real phantom's grey/white/CSF pattern
    # (every phantom is the same template, warped), voxel by voxel.
    real = np.asarray(nib.load(str(next(phantom_dir.glob("BraTS-GLI-00000-000/*-t1n.nii.gz")))).dataobj, dtype=float)
    head = real > 0
    assert records[0]["case_id"] == "BraTS-GLI-00000-000"
    assert np.corrcoef(real[head], data[head])[0, 1] > 0.5


# Issue 24's two tests on the shipped model itself, where the old recipes' failures show (on the toy
# cohort of test_sampling_recipe.py the old recipe fails only the low-noise test). On this held-out case
# the weights before the recipe change (git 6c3b49a) score a two-draw ratio of 0.025, the x0 uniform-t
# weights (git 1a4e939) 0.29, the x0 log-normal weights without the skip (git 4c00c49) 0.55; their x0
# estimate at t = 39 is 9 times worse than returning the input (0.0135 against 0.0015), the shipped
# skip model's beats it (scripts/low_noise_check.py; docs/evaluation.md).
def two_draws_against_the_real_case(weights: Path, folder: Path) -> tuple[float, float]:
    """(two-draw ratio, correlation of a draw with the real case) on one held-out phantom, model grid."""
    from diffusion_glioma.evaluation.conditional import correlation_with_real, two_draw_ratio

    pipe = load_pipeline(weights)
    case = held_out_phantom(folder, pipe.grid)
    labels = torch.from_numpy(case.labels.astype(np.int64))[None].repeat(2, 1, 1, 1)
    draws = pipe.use_sampler("dpm++")(labels, "glioblastoma", num_inference_steps=10, progress=False,
                                      generator=[torch.Generator().manual_seed(k) for k in range(2)]).volumes.numpy()
    head = case.labels > 0
    return two_draw_ratio(draws[0], draws[1], case.image, head), correlation_with_real(draws[0], case.image, head)


def test_two_draws_of_a_held_out_mask_differ_like_samples(tmp_path):
    ratio, correlation = two_draws_against_the_real_case(DEMO, tmp_path / "heldout")
    assert ratio > 0.5, ratio  # a sampler about 1, a mask-to-mean regressor 0 (the old weights: 0.01)
    assert correlation > 0.4, correlation  # and each draw is the mask's anatomy, not noise (about 0)


def test_the_shipped_denoiser_improves_on_its_input_at_the_smallest_sampling_noise(tmp_path):
    pipe = load_pipeline(DEMO)
    case = held_out_phantom(tmp_path / "heldout", pipe.grid)
    for seed in (0, 1):  # two noise draws
        error, returned_input = low_noise_errors(pipe, case.image, case.labels, seed=seed)
        assert error < returned_input, (seed, error, returned_input)  # a regressor of x0 from the mask loses
