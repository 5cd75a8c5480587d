"""The VAE baseline's Accelerate loop: the same run folder, data order, checkpoints, resume, logs,
EMA and validation figures as the other loops (`training/common.py`).

Loss: mean squared error per head voxel + beta x KL / voxels per volume. The pipeline folder holds
a `CGANPipeline` around the EMA decoder (sampling draws the latent from the prior), with the
encoder beside it (`encoder/`) for reconstruction and anomaly scores.

    diffusion-glioma train --config configs/vae.yaml
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..data.cache import read_index
from ..data.dataset import CachedCases
from ..io import chmod_like_open, write_json
from ..models.cgan import CGANGenerator
from ..models.vae import VAEEncoder, healthy_labels, kl_divergence
from ..pipeline import CGANPipeline
from .cgan import validation_figure
from .common import (checkpoints, collate, ema_copy, resume_and_loader, start_run, start_trackers, step_bookkeeping,
                     step_generator, stop_if_diverged, training_facts)
from .config import TrainConfig

ENCODER_FOLDER = "encoder"


def vae_loss(encoder, decoder, real: torch.Tensor, labels: torch.Tensor, diseases: torch.Tensor, beta: float,
             healthy_only: bool, rng: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """(loss, parts) of one batch: reconstruction inside the head (outside the tumour for the anomaly
    model) plus the KL term; the latent is drawn by the reparameterisation trick."""
    condition = healthy_labels(labels) if healthy_only else labels
    mean, log_variance = encoder(real, condition, diseases)
    z = mean + (0.5 * log_variance).exp() * torch.randn(mean.shape, generator=rng, device=mean.device)
    reconstruction = decoder(z, condition, diseases, generator=rng)
    counted = labels > 0 if not healthy_only else labels == 1  # head; for the anomaly model healthy head only
    error = ((reconstruction - real) ** 2).mean(dim=1)[counted].mean()
    kl = kl_divergence(mean, log_variance) / labels[0].numel()
    return error + beta * kl, {"reconstruction": error, "kl": kl}


def train_vae(config: TrainConfig, *, resume: bool = False) -> Path:
    vae = config.vae
    output_dir = Path(config.output_dir)
    accelerator = start_run(config, resume)
    existing = checkpoints(output_dir / "checkpoints")

    index = read_index(config.data.cache)
    modalities, shape = tuple(index["modalities"]), tuple(index["preprocess"]["shape"])
    classes = tuple(config.model.disease_classes)
    dataset = CachedCases(config.data.cache, diseases=list(classes), only_diseases=config.data.only_diseases,
                          limit=config.data.limit_cases, case_ids=config.data.case_ids)
    encoder = VAEEncoder(modalities=modalities, disease_classes=classes, volume_shape=shape,
                         latent_dim=vae.latent_dim, base_channels=vae.base_channels, levels=vae.levels)
    decoder = CGANGenerator(modalities=modalities, disease_classes=classes, volume_shape=shape,
                            noise_dim=vae.latent_dim, base_channels=vae.base_channels, levels=vae.levels)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *decoder.parameters()], lr=config.optim.learning_rate,
                                  weight_decay=config.optim.weight_decay)
    ema = EMAModel(decoder.parameters(), decay=config.ema.decay, use_ema_warmup=config.ema.warmup,
                   model_cls=CGANGenerator, model_config=decoder.config) if config.ema.enabled else None
    encoder, decoder, optimizer = accelerator.prepare(encoder, decoder, optimizer)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    step, loader, clock = resume_and_loader(accelerator, config, dataset, existing if resume else [])
    unwrapped = accelerator.unwrap_model(decoder)
    start_trackers(accelerator, config, "train_vae")
    (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    validation_batch = collate([dataset[i] for i in range(min(2, len(dataset)))])

    progress = tqdm(total=config.optim.steps, initial=step, desc="train vae", unit="step",
                    disable=not accelerator.is_local_main_process)
    for batch in loader:
        rng = step_generator(accelerator.device, config.seed, step, accelerator.process_index)
        loss, parts = vae_loss(encoder, decoder, batch["image"].float(), batch["labels"], batch["disease"], vae.beta,
                               vae.healthy_only, rng)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_([*encoder.parameters(), *decoder.parameters()], config.optim.max_grad_norm)
        optimizer.step()
        stop_if_diverged(accelerator, {"loss": loss}, step, output_dir)
        if ema is not None:
            ema.step(unwrapped.parameters())
        step += 1
        progress.update(1)
        if step_bookkeeping(accelerator, config, step, output_dir, progress, lambda: {
            "loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()},
            "steps_per_second": step / max(clock.seconds(), 1e-9)},
            lambda path: validation_figure(ema_copy(unwrapped, ema), validation_batch, dataset.diseases, modalities,
                                           path, config.seed), postfix=("loss",), clock=clock):
            break
    progress.close()

    folder = output_dir / "pipeline"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        CGANPipeline(ema_copy(unwrapped, ema), preprocess=index["preprocess"]).save_pretrained(str(folder))
        accelerator.unwrap_model(encoder).save_pretrained(str(folder / ENCODER_FOLDER))
        chmod_like_open(folder)
        write_json(folder / "training.json", {**training_facts(config, index, dataset, step), "kind": "vae",
                                              "healthy_only": vae.healthy_only})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return folder
