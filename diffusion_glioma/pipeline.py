"""MaskToMRIPipeline: masks in, multi-contrast volumes out. The pipeline only runs the loop; the
maths lives in the scheduler, which can be swapped at inference (`use_sampler`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler)
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .errors import DataError
from .models.unet3d import DenoiserUNet3D

# Sampler name -> (scheduler class, extra config). DPM-Solver++ has no get_velocity, so training
# always uses DDPMScheduler and sampling swaps with from_config.
SAMPLERS = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def make_scheduler(name: str, config) -> object:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    cls, extra = SAMPLERS[name]
    return cls.from_config(config, **extra)


def training_scheduler(prediction_type: str = "epsilon", num_train_timesteps: int = 1000) -> DDPMScheduler:
    """Cosine noise schedule; `clip_sample` keeps x0 estimates in the data range [-1, 1]."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                         prediction_type=prediction_type, clip_sample=True, clip_sample_range=1.0)


@dataclass
class MRIPipelineOutput(BaseOutput):
    volumes: torch.Tensor  # (b, modalities, x, y, z) in [-1, 1]


class MaskToMRIPipeline(DiffusionPipeline):
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
    def modalities(self) -> list[str]:
        return list(self.unet.config.modalities)

    @property
    def disease_classes(self) -> list[str]:
        return list(self.unet.config.disease_classes)

    def use_sampler(self, name: str) -> "MaskToMRIPipeline":
        self.scheduler = make_scheduler(name, self.scheduler.config)
        return self

    def class_index(self, disease: str | int) -> int:
        if isinstance(disease, int):
            if not 0 <= disease < len(self.disease_classes):
                raise ValueError(f"disease index {disease} out of range for classes {self.disease_classes}")
            return disease
        if disease not in self.disease_classes:
            raise ValueError(f"disease {disease!r} is not one of the model's classes {self.disease_classes}")
        return self.disease_classes.index(disease)

    @torch.no_grad()
    def __call__(self, labels: torch.Tensor, disease: str | int | list = 0, *, guidance_scale: float = 1.0,
                 num_inference_steps: int = 50, generator: torch.Generator | list | None = None,
                 progress: bool = True) -> MRIPipelineOutput:
        """
        Args:
            labels: (b, x, y, z) integer masks in the common scheme, on the model grid.
            disease: one class (name or index) for all, or one per mask.
            guidance_scale: classifier-free guidance; 1 is plain conditional sampling.
            num_inference_steps: solver steps (1 to the training steps).
            generator: torch.Generator, or one per mask: then each volume depends only on its own
                generator, not on what else is in the batch.
        """
        if labels.ndim != 4:
            raise ValueError(f"labels must be (batch, x, y, z), got shape {tuple(labels.shape)}")
        limit = self.scheduler.config.num_train_timesteps
        if not 1 <= num_inference_steps <= limit:
            raise ValueError(f"num_inference_steps must be between 1 and {limit}, got {num_inference_steps}")
        device = self._execution_device
        b = labels.shape[0]
        diseases = disease if isinstance(disease, (list, tuple)) else [disease] * b
        class_labels = torch.tensor([self.class_index(d) for d in diseases], device=device)
        mask = self.unet.one_hot(labels.to(device))
        shape = (b, len(self.modalities), *labels.shape[1:])
        if isinstance(generator, list) and len(generator) != b:
            raise ValueError(f"{len(generator)} generators for {b} masks")
        sample = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        sample = sample * self.scheduler.init_noise_sigma

        guided = guidance_scale != 1.0
        if guided:
            mask = torch.cat([mask, mask])
            class_labels = torch.cat([torch.zeros_like(class_labels), class_labels])
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps) if progress else self.scheduler.timesteps:
            model_input = torch.cat([sample, sample]) if guided else sample
            model_input = self.scheduler.scale_model_input(model_input, t)
            prediction = self.unet(model_input, t, mask, class_labels).sample
            if guided:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            sample = self.scheduler.step(prediction, t, sample, generator=generator).prev_sample
        volumes = sample.float().clamp(-1.0, 1.0)
        volumes = torch.where(labels.to(device)[:, None] == 0, torch.full_like(volumes, -1.0), volumes)
        return MRIPipelineOutput(volumes=volumes)


def load_pipeline(source: str | Path) -> MaskToMRIPipeline:
    """A pipeline from a local folder or a hub id ("org/name"), with one-line errors."""
    text = str(source)
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and not Path(text).exists()
    if not looks_like_hub_id and not Path(text).is_dir():
        raise DataError(f"{source}: model folder not found")
    try:
        return MaskToMRIPipeline.from_pretrained(text)
    except (OSError, ValueError) as exc:  # missing files, offline hub, bad config
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{source}: cannot load the model ({reason})") from None
