"""Wavelet-space models: the transform, training, saving, sampling and writing back."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion_glioma.generate import GenerateOptions, generate_dataset
from diffusion_glioma.models.unet3d import DenoiserUNet3D, build_denoiser
from diffusion_glioma.models.wavelet import haar3d, inverse_haar3d
from diffusion_glioma.pipeline import MaskToMRIPipeline, load_pipeline, training_scheduler


def test_round_trip_is_exact_on_odd_shapes_after_padding():
    volume = torch.randn(2, 3, 15, 22, 9, dtype=torch.float64)
    padded = F.pad(volume, (0, 1, 0, 0, 0, 1))  # to even sizes, as the model grid does
    coefficients = haar3d(padded)
    assert coefficients.shape == (2, 24, 8, 11, 5)
    torch.testing.assert_close(inverse_haar3d(coefficients), padded, rtol=0, atol=1e-12)
    # Orthonormal: the energy is kept, so noise has unit variance in both spaces.
    torch.testing.assert_close(coefficients.square().sum(), padded.square().sum())
    with pytest.raises(ValueError, match="even sizes"):
        haar3d(volume)


def test_coefficients_equal_ptwt():
    ptwt = pytest.importorskip("ptwt")
    volume = torch.randn(1, 2, 8, 6, 4, dtype=torch.float64)
    ours = haar3d(volume).reshape(1, 2, 8, 4, 3, 2)
    theirs = ptwt.wavedec3(volume.flatten(0, 1), "haar", level=1)
    low, details = theirs[0], theirs[1]
    from diffusion_glioma.models.wavelet import BANDS

    for k, band in enumerate(BANDS):
        reference = low if band == "aaa" else details[band]
        torch.testing.assert_close(ours[0, :, k], reference, msg=band)


def test_a_saved_wavelet_pipeline_reloads_and_samples_on_the_volume_grid(tmp_path):
    unet = build_denoiser("tiny", wavelet=True, wavelet_mask="haar")
    assert unet.conv_in.in_channels == 4 * 8 + 7 * 8 and unet.conv_out.out_channels == 32
    MaskToMRIPipeline(unet, training_scheduler(value_range=unet.value_range),
                      preprocess={"shape": [16] * 3}).save_pretrained(tmp_path)
    pipe = load_pipeline(tmp_path)
    assert pipe.unet.config.wavelet and pipe.unet.config.wavelet_mask == "haar"
    assert pipe.scheduler.config.clip_sample_range == pytest.approx(2 * 2 ** 0.5)
    labels = torch.ones(1, 16, 16, 16, dtype=torch.long)
    labels[:, :4] = 0
    for sampler in ("ddim", "dpm++"):
        out = pipe.use_sampler(sampler)(labels, "glioblastoma", num_inference_steps=3,
                                        generator=torch.Generator().manual_seed(0), progress=False).volumes
        assert out.shape == (1, 4, 16, 16, 16) and (out[:, :, :4] == -1).all()
    with pytest.raises(ValueError, match="divisible by 4"):
        pipe(torch.ones(1, 16, 16, 18, dtype=torch.long), num_inference_steps=2)


def test_generate_with_a_wavelet_model_writes_on_the_mask_grid(phantom_dir, tmp_path):
    unet = build_denoiser("tiny", wavelet=True)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)
    MaskToMRIPipeline(unet, training_scheduler(value_range=unet.value_range),
                      preprocess={"modalities": ["t1n", "t1c", "t2w", "t2f"], "shape": [16, 16, 16],
                                  "spacing": [12.0, 12.0, 12.0]}).save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    generate_dataset(tmp_path / "model", phantom_dir, out, GenerateOptions(limit=1, steps=2), progress=False)
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    seg = nib.load(record["source_mask"])
    for name, rel in record["files"].items():
        img = nib.load(str(out / rel))
        assert img.shape == seg.shape and np.array_equal(img.affine, seg.affine), name


def test_a_tiny_wavelet_model_learns(tmp_path):
    """Overfit one volume in wavelet space (x0 prediction, the quickest target to fit): the loss on
    fixed held-out noise falls well below where it started."""
    torch.manual_seed(0)
    model = DenoiserUNet3D(base_channels=16, channel_multipliers=(1, 2), attention_levels=(False, False),
                           norm_groups=8, wavelet=True)
    scheduler = training_scheduler("sample", value_range=model.value_range)
    labels = torch.ones(1, 16, 16, 16, dtype=torch.uint8)
    labels[:, 5:10, 5:10, 5:10] = 4
    volume = torch.where(labels[:, None] == 4, 0.8, -0.2).expand(1, 4, 16, 16, 16).float()
    x0 = model.encode(volume)
    eval_noise = torch.randn((5, *x0.shape[1:]), generator=torch.Generator().manual_seed(99))
    eval_t = torch.tensor([100, 300, 500, 700, 900])

    def held_out_loss() -> float:
        with torch.no_grad():
            x = x0.expand(5, -1, -1, -1, -1)
            prediction = model(scheduler.add_noise(x, eval_noise, eval_t), eval_t, labels.expand(5, -1, -1, -1)).sample
            return F.mse_loss(prediction, x).item()

    before = held_out_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(80):
        generator = torch.Generator().manual_seed(step)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (1,), generator=generator)
        prediction = model(scheduler.add_noise(x0, noise, t), t, labels).sample
        F.mse_loss(prediction, x0).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = held_out_loss()
    assert after < 0.25 * before, (before, after)
