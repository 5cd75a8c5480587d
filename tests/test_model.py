import pytest
import torch

from diffusion_glioma.models.unet3d import PRESETS, DenoiserOutput, DenoiserUNet3D, build_denoiser
from diffusion_glioma.pipeline import MaskToMRIPipeline, skip_coefficients, training_scheduler


def test_output_shape_and_conditioning_matter():
    torch.manual_seed(0)
    model = build_denoiser("tiny")
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)  # zero-initialised output would hide everything
    x = torch.randn(2, 4, 16, 16, 16)
    labels = torch.randint(0, 7, (2, 16, 16, 16))
    out = model(x, torch.tensor([10, 900]), labels, torch.tensor([1, 2])).sample
    assert out.shape == x.shape
    assert not torch.allclose(out, model(x, torch.tensor([10, 900]), torch.zeros_like(labels), torch.tensor([1, 2])).sample)
    assert not torch.allclose(out, model(x, torch.tensor([10, 900]), labels, torch.tensor([0, 0])).sample)
    assert not torch.allclose(out, model(x, torch.tensor([500, 500]), labels, torch.tensor([1, 2])).sample)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = build_denoiser("tiny", attention_levels=(False, True))
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)
    x, labels = torch.randn(1, 4, 16, 16, 16), torch.randint(0, 7, (1, 16, 16, 16))
    model(x, 3, labels).sample.square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(x, 3, labels).sample.square().sum().backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_save_and_load_round_trip(tmp_path):
    model = build_denoiser("tiny", modalities=("t1c", "t2f"))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    again = DenoiserUNet3D.from_pretrained(tmp_path)
    assert again.config.modalities == ["t1c", "t2f"] or tuple(again.config.modalities) == ("t1c", "t2f")
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_constructor_checks_with_values():
    with pytest.raises(ValueError, match="one entry per level"):
        DenoiserUNet3D(channel_multipliers=(1, 2), attention_levels=(False,))
    with pytest.raises(ValueError, match="norm_groups=5"):
        DenoiserUNet3D(base_channels=8, channel_multipliers=(1, 2), attention_levels=(False, False), norm_groups=5)
    with pytest.raises(ValueError, match="start with 'none'"):
        DenoiserUNet3D(disease_classes=("glioblastoma",))
    with pytest.raises(ValueError, match="divisible by 2"):
        build_denoiser("tiny")(torch.zeros(1, 4, 15, 16, 16), 0, torch.zeros(1, 15, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown model preset"):
        build_denoiser("huge")


def test_medddpm_preset_is_the_published_network():
    """Med-DDPM's BraTS network: base 64, multipliers 1,1,2,3,4, two residual blocks, attention only
    in the middle block, 57.6 M parameters (ours has 7 mask channels in, theirs fewer)."""
    model = build_denoiser("medddpm")
    assert model.config.base_channels == 64 and tuple(model.config.channel_multipliers) == (1, 1, 2, 3, 4)
    assert model.config.layers_per_level == 2 and not any(model.config.attention_levels)
    attention = [name for name, m in model.named_modules() if type(m).__name__ == "Attention3D"]
    assert attention == ["mid_attention"]
    parameters = sum(p.numel() for p in model.parameters())
    assert abs(parameters / 57.6e6 - 1) < 0.02, parameters


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_on_the_flash_kernel_alone(preset):
    """Fused attention needs q/k/v with a contiguous head dimension; with the math kernel
    forbidden, a layout it refuses is an error instead of a silent slow path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build_denoiser(preset, **({"base_channels": 8, "norm_groups": 4} if preset in ("medddpm", "wavelet", "base")
                                      else {}))
    side = 2 * model.downsampling_factor
    sample = torch.randn(model.sample_shape(1, (side,) * 3))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.no_grad():
        out = model(sample, 5, torch.randint(0, 7, (1, side, side, side)))
    assert out.sample.shape == sample.shape


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_pipeline_samplers_are_reproducible(tmp_path, sampler):
    pipe = MaskToMRIPipeline(build_denoiser("tiny"), training_scheduler("v_prediction"), preprocess={"shape": [16] * 3})
    pipe.save_pretrained(tmp_path)
    pipe = MaskToMRIPipeline.from_pretrained(tmp_path).use_sampler(sampler)
    labels = torch.randint(0, 7, (1, 16, 16, 16))
    labels[:, :2] = 0
    run = lambda seed: pipe(labels, "glioblastoma", num_inference_steps=4, guidance_scale=2.0,  # noqa: E731
                            generator=torch.Generator().manual_seed(seed), progress=False).volumes
    a, b, c = run(1), run(1), run(2)
    assert a.shape == (1, 4, 16, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, :, :2] == -1).all() and a.abs().max() <= 1
    with pytest.raises(ValueError, match="between 1 and 1000"):
        pipe(labels, num_inference_steps=0)
    with pytest.raises(ValueError, match="not one of the model's classes"):
        pipe(labels, "meningioma", num_inference_steps=2)


def test_pipeline_takes_mask_files_and_writes_back(tmp_path):
    import nibabel as nib
    import numpy as np

    from diffusion_glioma.data.preprocess import write_on_source
    from tests.helpers import write_nifti

    labels = np.zeros((40, 36, 30), dtype=np.int16)
    labels[5:35, 5:31, 4:26] = 1
    labels[15:22, 12:20, 10:16] = 4
    affine = np.array([[-1.5, 0, 0, 40], [0, -1.5, 0, 30], [0, 0, 2.0, -20], [0, 0, 0, 1]])
    path = write_nifti(tmp_path / "mask.nii.gz", labels, affine, dtype=np.int16)
    pipe = MaskToMRIPipeline(build_denoiser("tiny"), training_scheduler(),
                             preprocess={"shape": [16, 16, 16], "spacing": [4.0, 4.0, 4.0]})
    out = pipe([path], "glioblastoma", num_inference_steps=2, progress=False)
    assert out.volumes.shape == (1, 4, 16, 16, 16) and len(out.geometry) == 1
    written = write_on_source(tmp_path / "t1n.nii.gz", out.volumes[0, 0].numpy(), out.geometry[0])
    img = nib.load(str(written))
    assert img.shape == labels.shape and np.allclose(img.affine, affine)
    with pytest.raises(Exception, match="no head label"):
        pipe([write_nifti(tmp_path / "bad.nii.gz", (labels == 4) * 4, affine, dtype=np.int16)], num_inference_steps=2)


class _Oracle(DenoiserUNet3D):
    """A perfect denoiser: it knows x0 and answers with the exact target of its prediction type.
    `error` adds a fixed bias to the noise it reports, like a network's small mistakes."""

    def set_truth(self, x0: torch.Tensor, scheduler, prediction_type: str, error: float = 0.0):
        self.truth, self.alphas, self.kind, self.error = x0, scheduler.alphas_cumprod, prediction_type, error

    def forward(self, sample, timestep, labels, class_labels=None, return_dict=True):
        a = self.alphas[int(timestep)].to(sample.dtype)
        eps = (sample - a.sqrt() * self.truth) / (1 - a).sqrt() + self.error
        x0 = (sample - (1 - a).sqrt() * eps) / a.sqrt()
        out = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.kind]
        if self.config.skip_sigma_data is not None:  # EDM's F, from which the pipeline rebuilds x0
            skip, scale = skip_coefficients(a, self.config.skip_sigma_data)
            out = (x0 - skip * sample) / scale
        return DenoiserOutput(sample=out)


@pytest.mark.parametrize("wavelet", [False, True])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
@pytest.mark.parametrize("prediction_type,skip_sigma_data", [("epsilon", None), ("v_prediction", None),
                                                             ("sample", None), ("sample", 0.5)])
def test_a_perfect_denoiser_recovers_the_volume(prediction_type, skip_sigma_data, sampler, wavelet):
    torch.manual_seed(0)
    oracle = _Oracle(**{**PRESETS["tiny"], "wavelet": wavelet, "skip_sigma_data": skip_sigma_data})
    labels = torch.ones(1, 16, 16, 16, dtype=torch.long)
    volume = (torch.rand(1, 4, 16, 16, 16) * 1.6 - 0.8)
    scheduler = training_scheduler(prediction_type, value_range=oracle.value_range)
    pipe = MaskToMRIPipeline(oracle, scheduler).use_sampler(sampler)
    oracle.set_truth(oracle.encode(volume), scheduler, prediction_type)
    for steps in (10, 25):
        out = pipe(labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(1), progress=False)
        torch.testing.assert_close(out.volumes, volume, atol=2e-3, rtol=0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_epsilon_errors_are_not_amplified_at_the_first_step(sampler):
    """At t = 999 of the capped cosine schedule x0 = (x - sigma eps) / alpha magnifies an error in eps
    about 2e4-fold. The pipeline projects every x0 estimate onto the data range before the sampler
    steps, so the first step of a network that is off by 0.01 stays near the noise it started from;
    without the projection it does not."""
    torch.manual_seed(0)
    pipe = MaskToMRIPipeline(DenoiserUNet3D(**PRESETS["tiny"]), training_scheduler("epsilon")).use_sampler(sampler)
    pipe.scheduler.set_timesteps(25)
    t = pipe.scheduler.timesteps[0]
    assert int(t) == 999  # trailing spacing starts from pure noise
    noise = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    slightly_wrong = noise + 0.01
    labels = torch.ones(1, 8, 8, 8, dtype=torch.long)
    step = lambda output: pipe.scheduler.step(output, t, noise, generator=torch.Generator().manual_seed(0)).prev_sample  # noqa: E731
    assert step(pipe.project_prediction(slightly_wrong, t, noise, labels)).abs().max() < 6
    pipe.scheduler.set_timesteps(25)
    assert step(slightly_wrong).abs().max() > 10  # the unprojected step, for contrast (about 16)
