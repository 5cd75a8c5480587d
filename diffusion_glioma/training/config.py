"""The training config: one typed model for pretraining and fine-tuning (configs/*.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..config import StrictModel, load_yaml, parse_config


class DataSection(StrictModel):
    cache: Path = Field(description="prepared cache folder (made from `raw` first when `raw` is given)")
    raw: Path | None = Field(None, description="raw dataset folder to prepare into `cache` (resumable)")
    config: Path | None = Field(None, description="data config YAML used to prepare `raw`")
    only_diseases: list[str] | None = Field(None, description="train on cases of these diseases only")
    limit_cases: int | None = Field(None, ge=1, description="train on the first N cases only (few-shot runs)")
    case_ids: list[str] | None = Field(None, description="train on exactly these cases (studies that choose them)")
    num_workers: int = Field(0, ge=0)
    memory_cache_gb: float = Field(0.0, ge=0, description="keep cases in memory up to this many GB per process "
                                   "and per loader worker; 0 reads each case from the cache when it is needed")
    prepare_workers: int | None = Field(None, ge=1, description="processes preparing `raw` (default: every core)")


class ModelSection(StrictModel):
    preset: str = "small"
    disease_classes: list[str] = ["none", "glioblastoma", "pediatric_diffuse_glioma"]
    overrides: dict = Field(default_factory=dict, description="any DenoiserUNet3D argument, over the preset")

    # Checked with the rest of the config, before a run folder or its config.yaml is written.
    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        from ..models.unet3d import PRESETS

        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; choose one of {sorted(PRESETS)}")
        return value

    @field_validator("overrides")
    @classmethod
    def _known_arguments(cls, value: dict) -> dict:
        import inspect

        from ..models.unet3d import DenoiserUNet3D

        unknown = sorted(set(value) - set(inspect.signature(DenoiserUNet3D.__init__).parameters) - {"self"})
        if unknown:
            raise ValueError(f"{unknown} are not DenoiserUNet3D arguments (diffusion_glioma/models/unet3d.py)")
        given_by_the_data = sorted({"modalities", "disease_classes"} & set(value))
        if given_by_the_data:
            raise ValueError(f"{given_by_the_data} come from the data and model.disease_classes, not overrides")
        return value


class OptimSection(StrictModel):
    steps: int = Field(1000, ge=1, description="optimizer steps in total")
    max_minutes: float | None = Field(None, gt=0, description="stop once the run has trained this long, "
                                      "resumes included (checked at every log step; the checkpoint, figure and pipeline are "
                                      "written there): equal wall-clock comparisons. The learning-rate "
                                      "schedule still plans for `steps`")
    batch_size: int = Field(1, ge=1, description="volumes per process per micro-step")
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    lr_schedule: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "cosine"
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile the model (8% faster steps on an H100, "
                          "docs/benchmarks.md; the first steps take minutes to compile)")
    allow_tf32: bool = Field(True, description="TF32 matrix products and convolutions on Ampere and newer GPUs")


class DiffusionSection(StrictModel):
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"
    loss: Literal["l1", "l2"] = "l2"
    num_train_timesteps: int = Field(1000, ge=10)
    class_dropout: float = Field(0.1, ge=0, lt=1, description="probability of training a step unconditionally "
                                 "(class 0), which classifier-free guidance needs")
    snr_gamma: float | None = Field(None, gt=0, description="min-SNR-gamma loss weighting (Hang et al. 2023): "
                                    "the weight of each noise level as if predicting x0 with its SNR capped at "
                                    "gamma; None (the default, which sampled a bimodal toy in both modes where "
                                    "gamma 5 did not with DDIM: docs/training.md) weighs the target's loss "
                                    "uniformly over t")
    noise_levels: Literal["uniform", "lognormal"] = Field("uniform", description="how training draws its noise "
                                                         "level: uniform over t, or EDM's log-normal sigma "
                                                         "(Karras et al. 2022), which trains the low and middle "
                                                         "levels that make a sample clean more often")
    lognormal_mean: float = Field(-1.2, description="lognormal only: mean of log sigma, sigma = sqrt((1 - "
                                  "alpha_bar) / alpha_bar) (EDM's P_mean, tuned for data of sd 0.5; about -0.5 is its equivalent "
                                  "for unit-variance data such as normalised wavelet bands)")
    lognormal_std: float = Field(1.2, gt=0, description="lognormal only: sd of log sigma (EDM's P_std)")
    skip_sigma_data: float | None = Field(None, gt=0, description="x0-prediction only: EDM's preconditioning "
                                          "at this data sd (c_skip * x_t + c_out * F; the loss is on F, EDM's "
                                          "weighting), so that at low noise the network corrects its input "
                                          "instead of redrawing it; None: the network predicts x0 itself")
    loss_in_head: bool = Field(True, description="count the loss only inside the head (the mask fixes the "
                               "background, and the pipeline writes it)")
    normalise_wavelet_bands: bool = Field(True, description="a new wavelet model divides each Haar band by its "
                                          "standard deviation on the training data (measured at the start)")


class EmaSection(StrictModel):
    enabled: bool = True
    decay: float = Field(0.9999, gt=0, lt=1)
    warmup: bool = Field(True, description="diffusers' EMA warm-up: the decay grows with the step count")


class ValidationSection(StrictModel):
    every: int = Field(500, ge=1, description="steps between validation figures")
    sampler: Literal["ddpm", "ddim", "dpm++"] = "ddim"
    num_inference_steps: int = Field(25, ge=1)
    guidance_scale: float = Field(1.0, ge=0)


class CheckpointSection(StrictModel):
    every: int = Field(500, ge=1, description="steps between checkpoints")
    total_limit: int = Field(3, ge=1, description="checkpoints kept (the newest)")


class FinetuneSection(StrictModel):
    source: str = Field(description="pretrained pipeline folder (or hub id) to start from")
    mode: Literal["full", "frozen_encoder"] = "full"
    ewc_weight: float = Field(0.0, ge=0, description="weight of an L2 penalty toward the source weights "
                              "(EWC with a uniform Fisher, i.e. L2-SP; the generator's, for a GAN); 0 disables it")
    freeze_discriminator_layers: int = Field(0, ge=0, description="GAN only: the first N discriminator blocks keep "
                                             "the source weights (FreezeD, Mo et al. 2020)")


class GanSection(StrictModel):
    """The GAN baselines (its presence selects the GAN loop; `model.preset` is then unused)."""

    kind: Literal["bce", "pix2pix"] = Field("bce", description="bce: the proposal's cGAN (global discriminator, "
                                            "BCE only); pix2pix: spectral-norm PatchGAN + L1 toward the real volume")
    l1_weight: float = Field(100.0, ge=0, description="pix2pix only: weight of the L1 term (pix2pix's lambda)")

    noise_dim: int = Field(64, ge=1)
    base_channels: int = Field(32, ge=4)
    levels: int = Field(3, ge=1, le=5)
    dropout: float = Field(0.3, ge=0, lt=1, description="discriminator dropout")
    generator_lr: float = Field(2e-4, gt=0)
    discriminator_lr: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.5, 0.999)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="real targets are 1 - this")
    diversity_samples: int = Field(3, ge=2, description="samples of one mask whose spread is logged (mode collapse)")


class VaeSection(StrictModel):
    """The VAE baseline (its presence selects the VAE loop; `model.preset` is then unused)."""

    latent_dim: int = Field(64, ge=1)
    base_channels: int = Field(32, ge=4)
    levels: int = Field(3, ge=1, le=5)
    beta: float = Field(1.0, ge=0, description="weight of the KL term, which is divided by the voxels per volume "
                        "(the reconstruction term is the mean squared error per head voxel)")
    healthy_only: bool = Field(False, description="the anomaly model: conditioned on the head alone and trained on "
                               "healthy tissue only (tumour voxels excluded from the loss)")


class TrainConfig(StrictModel):
    output_dir: Path
    seed: int = 0
    data: DataSection
    model: ModelSection = ModelSection()
    optim: OptimSection = OptimSection()
    diffusion: DiffusionSection = DiffusionSection()
    ema: EmaSection = EmaSection()
    validation: ValidationSection = ValidationSection()
    checkpoints: CheckpointSection = CheckpointSection()
    log_every: int = Field(10, ge=1)
    tracker: Literal["auto", "tensorboard", "wandb", "none"] = Field(
        "auto", description="accelerate's tracker for losses, the full config and validation figures (auto: "
        "TensorBoard when installed); logs/metrics.jsonl is written whatever it is")
    finetune: FinetuneSection | None = None
    gan: GanSection | None = None
    vae: VaeSection | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.gan is not None and self.vae is not None:
            raise ValueError("give either a gan or a vae section, not both")
        if self.vae is not None and (self.finetune is not None or self.optim.gradient_accumulation_steps != 1):
            raise ValueError("the VAE loop supports neither finetune nor gradient accumulation")
        if self.data.config is not None and self.data.raw is None:
            raise ValueError("data.config is only used to prepare data.raw; give data.raw too")
        if self.model.disease_classes[:1] != ["none"]:
            raise ValueError("model.disease_classes must start with 'none'")
        if self.gan is not None and self.optim.gradient_accumulation_steps != 1:
            raise ValueError("the GAN loop does not support gradient accumulation")
        if self.gan is not None and self.finetune is not None and self.finetune.mode != "full":
            raise ValueError("finetune.mode frozen_encoder is for the diffusion model; a GAN freezes discriminator "
                             "blocks with finetune.freeze_discriminator_layers")
        if self.diffusion.skip_sigma_data is not None and self.diffusion.prediction_type != "sample":
            raise ValueError("diffusion.skip_sigma_data is a parametrisation of x0-prediction; set "
                             "diffusion.prediction_type: sample (v-prediction is the same skip at sigma_data 1)")
        if self.diffusion.skip_sigma_data is not None and self.diffusion.snr_gamma is not None:
            raise ValueError("diffusion.skip_sigma_data brings EDM's own loss weighting; leave snr_gamma unset")
        if self.gan is None and self.finetune is not None and self.finetune.freeze_discriminator_layers:
            raise ValueError("finetune.freeze_discriminator_layers needs a gan section")
        return self


def load_train_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Load a training YAML; `overrides` are dotted keys from the command line (`optim.steps`: 10)."""
    data = load_yaml(path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_config(TrainConfig, data, path)
