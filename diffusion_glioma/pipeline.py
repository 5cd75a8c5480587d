"""MaskToMRIPipeline: masks in, multi-contrast volumes out. The pipeline only runs the loop; the
maths lives in the scheduler, which can be swapped at inference (`use_sampler`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler)
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .errors import DataError, first_line
from .models.cgan import CGANGenerator
from .models.unet3d import DenoiserUNet3D

# Sampler name -> (scheduler class, extra config). DPM-Solver++ has no get_velocity, so training
# always uses DDPMScheduler and sampling swaps with from_config. "trailing" spacing starts reduced-step
# sampling at the last training step (pure noise), where "leading" would start at t = T - T/steps.
# No sampler clips or thresholds on its own: the pipeline projects every x0 estimate onto the data
# before the step (`MaskToMRIPipeline.project_prediction`), in image space, which a clip of wavelet
# coefficients cannot do and diffusers' dynamic thresholding (a quantile, refused by torch above 16 M
# voxels) does not.
SAMPLERS = {
    "ddpm": (DDPMScheduler, {"timestep_spacing": "trailing", "clip_sample": False}),
    "ddim": (DDIMScheduler, {"timestep_spacing": "trailing", "clip_sample": False}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                            "timestep_spacing": "trailing"}),
}


def make_scheduler(name: str, config) -> object:
    """A sampler from a training scheduler's config (for use with `MaskToMRIPipeline`, which projects
    the x0 estimate the sampler steps from)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    cls, extra = SAMPLERS[name]
    return cls.from_config(config, **extra, thresholding=False)


def training_scheduler(prediction_type: str = "v_prediction", num_train_timesteps: int = 1000,
                       value_range: float = 1.0) -> DDPMScheduler:
    """Cosine noise schedule; `clip_sample` keeps x0 estimates in the data range (`value_range`:
    1 for volumes in [-1, 1], the model's `value_range` for wavelet coefficients)."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                         prediction_type=prediction_type, clip_sample=True, clip_sample_range=value_range)


def alpha_bar_at(scheduler, t, like: torch.Tensor) -> torch.Tensor:
    """The schedule's alpha_bar at timestep t (an int, or one per volume), shaped to broadcast against `like`."""
    t = torch.as_tensor(t).long()
    alpha_bar = scheduler.alphas_cumprod.to(t.device)[t].to(like.device, torch.float32)  # t stays where it is
    return alpha_bar.reshape(-1, *[1] * (like.ndim - 1))


def skip_coefficients(alpha_bar: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM's preconditioning (Karras et al. 2022) in this schedule's coordinates: (skip, out) with
    x0 = skip * x_t + out * F. EDM's x = x_t / alpha and sigma = sqrt(1 - alpha_bar) / alpha give
    c_skip = sd^2 / (sigma^2 + sd^2) on x and c_out = sigma sd / sqrt(sigma^2 + sd^2). At sd = 1 this
    is v-prediction (skip = alpha, out = -sqrt(1 - alpha_bar), F = -v); a smaller sd hands more of
    the middle noise levels to the network's own estimate while keeping the skip at low noise."""
    sigma2 = (1 - alpha_bar) / alpha_bar
    skip = sigma_data**2 / ((sigma2 + sigma_data**2) * alpha_bar.sqrt())
    out = sigma2.sqrt() * sigma_data / (sigma2 + sigma_data**2).sqrt()
    return skip, out


@dataclass
class MRIPipelineOutput(BaseOutput):
    """`volumes` on the model grid; for masks given as files, `geometry[i]` writes volume i back onto
    its mask's grid (`diffusion_glioma.data.preprocess.write_on_source`)."""

    volumes: torch.Tensor  # (b, modalities, x, y, z) in [-1, 1]
    geometry: list | None = None


class _MaskConditionedPipeline(DiffusionPipeline):
    """What every mask-to-MRI pipeline shares: its modalities and classes, and masks from files."""

    @property
    def _model(self):
        raise NotImplementedError

    @property
    def modalities(self) -> list[str]:
        return list(self._model.config.modalities)

    @property
    def disease_classes(self) -> list[str]:
        return list(self._model.config.disease_classes)

    @property
    def grid(self):
        """The model grid it was trained on (`preprocess` in model_index.json) as a PreprocessConfig."""
        from .config import PreprocessConfig

        return PreprocessConfig(**{k: v for k, v in (self.config.preprocess or {}).items()
                                   if k in PreprocessConfig.model_fields})

    def class_index(self, disease: str | int) -> int:
        if isinstance(disease, int):
            if not 0 <= disease < len(self.disease_classes):
                raise ValueError(f"disease index {disease} out of range for classes {self.disease_classes}")
            return disease
        if disease not in self.disease_classes:
            raise ValueError(f"disease {disease!r} is not one of the model's classes {self.disease_classes}")
        return self.disease_classes.index(disease)

    def _prepare_masks(self, labels, disease):
        """Masks (tensor on the model grid, or files) and per-mask class indices, on the device."""
        geometry = None
        if isinstance(labels, (list, tuple, str, Path)):
            labels, geometry = self.masks_from_files([labels] if isinstance(labels, (str, Path)) else list(labels))
        if labels.ndim != 4:
            raise ValueError(f"labels must be (batch, x, y, z), got shape {tuple(labels.shape)}")
        device = self._execution_device
        diseases = disease if isinstance(disease, (list, tuple)) else [disease] * labels.shape[0]
        class_labels = torch.tensor([self.class_index(d) for d in diseases], device=device)
        return labels.to(device), class_labels, geometry

    def masks_from_files(self, paths: list[str | Path]) -> tuple[torch.Tensor, list]:
        """Label maps in the common scheme (head = 1) as NIfTI files -> model-grid masks and geometry."""
        from .data.preprocess import check_tumour_inside, plan_geometry, to_model
        from .data.layouts import Case
        from .io import load_volume
        from .labels import BACKGROUND, HEAD, get_scheme

        grid = self.grid
        masks, records = [], []
        for path in paths:
            seg = load_volume(path, kind="label")
            common = get_scheme("common").to_common(seg.array, path)
            if not (common == HEAD).any():
                raise DataError(f"{path}: no head label (1); masks given to the pipeline must be in the common scheme")
            record = plan_geometry(seg.affine, seg.shape, common != BACKGROUND, grid.shape, grid.spacing,
                                   seg.qform_code, seg.sform_code)
            check_tumour_inside(common, record, Case(Path(path).name, {}, Path(path), "common", "", ""))
            masks.append(torch.from_numpy(to_model(common.astype("uint8"), record, label=True).astype("int64")))
            records.append(record)
        return torch.stack(masks), records



class MaskToMRIPipeline(_MaskConditionedPipeline):
    """Sample multi-contrast volumes conditioned on label maps in the common scheme.

    `preprocess` records the model grid (shape, spacing, modalities, intensity clipping) that the
    model was trained on, so that `generate` can put any mask on it.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: DenoiserUNet3D, scheduler, preprocess: dict | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(preprocess=preprocess)

    @property
    def _model(self):
        return self.unet

    @property
    def max_steps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def use_sampler(self, name: str) -> "MaskToMRIPipeline":
        self.scheduler = make_scheduler(name, self.scheduler.config)
        return self

    def x0_estimate(self, prediction: torch.Tensor, t, sample: torch.Tensor) -> torch.Tensor:
        """The network's output at timestep t (an int, or one per volume) as an estimate of x0, in
        whichever parametrisation it was trained (the scheduler's prediction_type, and for x0 the
        model's EDM skip if it has one). Uses the schedule's public alphas (DDPM, DDIM and
        DPM-Solver++ share them at integer timesteps)."""
        alpha_bar = alpha_bar_at(self.scheduler, t, sample)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        kind = self.scheduler.config.prediction_type
        if kind == "sample":
            sigma_data = self.unet.config.get("skip_sigma_data")
            if sigma_data is None:
                return prediction
            skip, out = skip_coefficients(alpha_bar, sigma_data)
            return skip * sample + out * prediction
        if kind == "epsilon":
            return (sample - s * prediction) / a
        if kind == "v_prediction":
            return a * sample - s * prediction
        raise ValueError(f"unknown prediction_type {kind!r}")

    def project_prediction(self, prediction: torch.Tensor, t, sample: torch.Tensor,
                           labels: torch.Tensor) -> torch.Tensor:
        """The network's x0 estimate projected onto what a volume with these masks can be
        (`DenoiserUNet3D.project_to_data`: a clip in image space, the known background), given back
        in the scheduler's parametrisation, so that any sampler steps from a possible volume.
        Without it, epsilon prediction on the capped cosine schedule amplifies the network's error
        about 2e4-fold at the first step."""
        x0 = self.unet.project_to_data(self.x0_estimate(prediction, t, sample), labels)
        alpha_bar = alpha_bar_at(self.scheduler, t, sample)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        kind = self.scheduler.config.prediction_type
        if kind == "sample":
            return x0
        if kind == "epsilon":
            return (sample - a * x0) / s
        return (a * sample - x0) / s  # v_prediction (x0_estimate refused anything else)

    @torch.no_grad()
    def __call__(self, labels: torch.Tensor | list, disease: str | int | list = 0, *, guidance_scale: float = 1.0,
                 num_inference_steps: int = 50, generator: torch.Generator | list | None = None,
                 progress: bool = True) -> MRIPipelineOutput:
        """
        Args:
            labels: (b, x, y, z) integer masks in the common scheme on the model grid, or a list of
                NIfTI paths of such masks on any grid (see `masks_from_files`).
            disease: one class (name or index) for all, or one per mask.
            guidance_scale: classifier-free guidance; 1 is plain conditional sampling.
            num_inference_steps: solver steps (1 to the training steps).
            generator: torch.Generator, or one per mask: then each volume depends only on its own
                generator, not on what else is in the batch.
        """
        limit = self.max_steps
        if not 1 <= num_inference_steps <= limit:
            raise ValueError(f"num_inference_steps must be between 1 and {limit}, got {num_inference_steps}")
        labels, class_labels, geometry = self._prepare_masks(labels, disease)
        device = labels.device
        b = labels.shape[0]
        if any(s % self.unet.downsampling_factor for s in labels.shape[1:]):
            raise ValueError(f"mask grid {tuple(labels.shape[1:])} must be divisible by "
                             f"{self.unet.downsampling_factor} for this model")
        mask = self.unet.condition(labels)  # once, not at every step
        shape = self.unet.sample_shape(b, tuple(labels.shape[1:]))
        if isinstance(generator, list) and len(generator) != b:
            raise ValueError(f"{len(generator)} generators for {b} masks")
        # The solver's state stays fp32 whatever the network computes in: bf16 steps would accumulate
        # rounding over the trajectory.
        sample = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        sample = sample * self.scheduler.init_noise_sigma

        guided = guidance_scale != 1.0
        if guided:
            mask = torch.cat([mask, mask])
            class_labels = torch.cat([torch.zeros_like(class_labels), class_labels])
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps) if progress else self.scheduler.timesteps:
            model_input = torch.cat([sample, sample]) if guided else sample
            model_input = self.scheduler.scale_model_input(model_input, t)
            prediction = self.unet(model_input, t, mask, class_labels).sample.float()
            if guided:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            prediction = self.project_prediction(prediction, t, sample, labels)
            sample = self.scheduler.step(prediction, t, sample, generator=generator).prev_sample
        volumes = self.unet.decode(sample.float()).clamp(-1.0, 1.0)
        volumes = torch.where(labels[:, None] == 0, torch.full_like(volumes, -1.0), volumes)
        return MRIPipelineOutput(volumes=volumes, geometry=geometry)


class CGANPipeline(_MaskConditionedPipeline):
    """The cGAN baseline behind the same interface: one generator pass per volume (no sampler;
    `guidance_scale` and `num_inference_steps` are accepted and ignored)."""

    def __init__(self, generator: CGANGenerator, preprocess: dict | None = None):
        super().__init__()
        self.register_modules(generator=generator)
        self.register_to_config(preprocess=preprocess)

    @property
    def _model(self):
        return self.generator

    max_steps = None

    def use_sampler(self, name: str) -> "CGANPipeline":
        return self

    @torch.no_grad()
    def __call__(self, labels: torch.Tensor | list, disease: str | int | list = 0, *, guidance_scale: float = 1.0,
                 num_inference_steps: int = 1, generator: torch.Generator | list | None = None,
                 progress: bool = False) -> MRIPipelineOutput:
        labels, class_labels, geometry = self._prepare_masks(labels, disease)
        if isinstance(generator, list) and len(generator) != labels.shape[0]:
            raise ValueError(f"{len(generator)} generators for {labels.shape[0]} masks")
        noise = randn_tensor((labels.shape[0], self.generator.config.noise_dim), generator=generator,
                             device=labels.device, dtype=self.generator.dtype)
        volumes = self.generator(noise, labels, class_labels, generator=generator).float().clamp(-1.0, 1.0)
        return MRIPipelineOutput(volumes=volumes, geometry=geometry)


def load_pipeline(source: str | Path, revision: str | None = None) -> MaskToMRIPipeline | CGANPipeline:
    """A pipeline from a local folder or a hub id ("org/name", downloaded at `revision`), of the kind
    its `model_index.json` names, with one-line errors."""
    from .hub import HubError, fetch_model

    try:
        folder = fetch_model(source, revision).path
    except HubError as exc:
        raise DataError(str(exc)) from None
    try:
        index = folder / "model_index.json"
        kind = json.loads(index.read_text()).get("_class_name") if index.is_file() else "MaskToMRIPipeline"
        pipe = (CGANPipeline if kind == "CGANPipeline" else MaskToMRIPipeline).from_pretrained(str(folder))
    except (OSError, ValueError) as exc:  # missing files, bad config
        reason = first_line(exc)
        raise DataError(f"{source}: cannot load the model ({reason})") from None
    model = pipe._model
    if model.dtype != torch.float32:  # the demo weights ship as fp16; sampling on a CPU wants fp32
        torch.nn.Module.to(model, torch.float32)  # plain cast; diffusers' `to` warns about keep-in-fp32 lists
    return pipe
