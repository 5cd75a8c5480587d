"""The GAN baselines' Accelerate loop: the same run folder, data order, checkpoints, resume, logs
and validation figures as the diffusion loop (`training/common.py`), with alternating
discriminator and generator steps (binary cross-entropy, Adam with beta1 0.5).

- `gan.kind: bce`: the proposal's cGAN (one logit per volume, BCE only).
- `gan.kind: pix2pix`: a spectral-norm PatchGAN (a logit per patch) and an L1 term toward the real
  volume inside the head, weighted by `gan.l1_weight`.
- `finetune:` adapts a trained GAN pipeline to new data (few-shot, cross-disease): the source's
  generator and discriminator, disease classes extended as for the diffusion model, the first
  `freeze_discriminator_layers` discriminator blocks frozen (FreezeD) and an L2-SP penalty pulling
  the generator toward the source (`ewc_weight`); lower learning rates go in `gan:`.

    accelerate launch scripts/train.py --config configs/cgan.yaml
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..data.cache import read_index
from ..data.dataset import CachedCases
from ..figures import FigureRow, write_slices_figure
from ..hub import fetch_model
from ..io import chmod_like_open, write_json
from ..models.cgan import DISCRIMINATORS, CGANGenerator
from ..pipeline import CGANPipeline, load_pipeline
from .common import (TrainingError, checkpoints, collate, ema_copy, resume_and_loader, source_drift, start_run,
                     start_trackers, step_bookkeeping, step_generator, stop_if_diverged, trained_classes,
                     training_facts, with_classes)
from .config import TrainConfig

DISCRIMINATOR_FOLDER = "discriminator"  # inside the pipeline folder: what few-shot adaptation starts from


def build_gan(config: TrainConfig, cache_index: dict):
    """(generator, discriminator, source generator weights or None): fresh networks sized to the
    cache's grid, or the fine-tuning source's with its classes extended and FreezeD applied."""
    gan = config.gan
    modalities, shape = tuple(cache_index["modalities"]), tuple(cache_index["preprocess"]["shape"])
    classes = tuple(config.model.disease_classes)
    discriminator_class = DISCRIMINATORS[gan.kind]
    if config.finetune is None:
        generator_net = CGANGenerator(modalities=modalities, disease_classes=classes, volume_shape=shape,
                                      noise_dim=gan.noise_dim, base_channels=gan.base_channels, levels=gan.levels)
        discriminator = discriminator_class(modalities=modalities, disease_classes=classes, volume_shape=shape,
                                            base_channels=gan.base_channels, levels=gan.levels, dropout=gan.dropout)
        return generator_net, discriminator, None
    source = config.finetune.source
    pipe = load_pipeline(source)
    if not isinstance(pipe, CGANPipeline):
        raise TrainingError(f"{source}: a diffusion pipeline; a GAN fine-tunes from a GAN pipeline folder")
    saved = fetch_model(source).path / DISCRIMINATOR_FOLDER  # a hub model: its downloaded snapshot
    if not (saved / "config.json").is_file():
        raise TrainingError(f"{saved}: no discriminator beside the source generator; GAN fine-tuning needs the "
                            "pipeline folder of a GAN training run")
    kind = json.loads((saved / "config.json").read_text()).get("_class_name")
    if kind != discriminator_class.__name__:
        raise TrainingError(f"{saved}: a {kind}, but gan.kind {gan.kind!r} trains a {discriminator_class.__name__}")
    discriminator = discriminator_class.from_pretrained(str(saved))
    generator_net = pipe.generator
    if tuple(generator_net.config.modalities) != modalities or tuple(generator_net.config.volume_shape) != shape:
        raise TrainingError(f"{config.data.cache}: data of modalities {list(modalities)} on {list(shape)}, but the "
                            f"source makes {list(generator_net.config.modalities)} on "
                            f"{list(generator_net.config.volume_shape)}; prepare the data with its settings")
    old = list(generator_net.config.disease_classes)
    wanted = old + [d for d in classes if d not in old]
    trained = trained_classes(source, old)
    generator_net, discriminator = with_classes(generator_net, wanted, trained), with_classes(discriminator, wanted, trained)
    frozen = config.finetune.freeze_discriminator_layers
    if frozen > len(discriminator.blocks):
        raise TrainingError(f"finetune.freeze_discriminator_layers {frozen}: the discriminator has "
                            f"{len(discriminator.blocks)} blocks")
    for block in discriminator.blocks[:frozen]:
        block.requires_grad_(False)
    return generator_net, discriminator, {k: v.detach().clone() for k, v in generator_net.state_dict().items()}


def train_cgan(config: TrainConfig, *, resume: bool = False) -> Path:
    gan = config.gan
    output_dir = Path(config.output_dir)
    accelerator = start_run(config, resume)
    existing = checkpoints(output_dir / "checkpoints")

    # 1. Data and the two networks, sized to the cache's grid.
    index = read_index(config.data.cache)
    modalities = tuple(index["modalities"])
    generator_net, discriminator, source_weights = build_gan(config, index)
    dataset = CachedCases(config.data.cache, diseases=list(generator_net.config.disease_classes),
                          only_diseases=config.data.only_diseases, limit=config.data.limit_cases,
                          case_ids=config.data.case_ids)
    opt_g = torch.optim.Adam(generator_net.parameters(), lr=gan.generator_lr, betas=gan.betas)
    opt_d = torch.optim.Adam([p for p in discriminator.parameters() if p.requires_grad], lr=gan.discriminator_lr,
                             betas=gan.betas)
    ema = EMAModel(generator_net.parameters(), decay=config.ema.decay, use_ema_warmup=config.ema.warmup,
                   model_cls=CGANGenerator, model_config=generator_net.config) if config.ema.enabled else None
    generator_net, discriminator, opt_g, opt_d = accelerator.prepare(generator_net, discriminator, opt_g, opt_d)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    if source_weights is not None:
        source_weights = {k: v.to(accelerator.device) for k, v in source_weights.items()}

    step, loader, clock = resume_and_loader(accelerator, config, dataset, existing if resume else [])
    unwrapped = accelerator.unwrap_model(generator_net)
    start_trackers(accelerator, config, "train_cgan")
    (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    validation_batch = collate([dataset[i] for i in range(min(2, len(dataset)))])
    real_target = 1.0 - gan.label_smoothing

    # 2. Alternate: discriminator on real and generated, then generator against the discriminator.
    progress = tqdm(total=config.optim.steps, initial=step, desc="train cgan", unit="step",
                    disable=not accelerator.is_local_main_process)
    for batch in loader:
        rng = step_generator(accelerator.device, config.seed, step, accelerator.process_index)
        real, labels, diseases = batch["image"].float(), batch["labels"], batch["disease"]
        noise = torch.randn(real.shape[0], gan.noise_dim, generator=rng, device=real.device)
        fake = generator_net(noise, labels, diseases, generator=rng)

        d_real = discriminator(real, labels, diseases)
        d_fake = discriminator(fake.detach(), labels, diseases)
        loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.full_like(d_real, real_target))
                  + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        opt_d.zero_grad(set_to_none=True)
        accelerator.backward(loss_d)
        opt_d.step()

        d_on_fake = discriminator(fake, labels, diseases)
        loss_adversarial = F.binary_cross_entropy_with_logits(d_on_fake, torch.ones_like(d_on_fake))
        loss_g = loss_adversarial
        l1 = None
        if gan.kind == "pix2pix":  # the reconstruction term, inside the head (outside is fixed at -1)
            head = (labels > 0)[:, None].expand_as(fake)
            l1 = (fake - real).abs()[head].mean()
            loss_g = loss_g + gan.l1_weight * l1
        if source_weights is not None and config.finetune.ewc_weight > 0:
            loss_g = loss_g + config.finetune.ewc_weight * source_drift(generator_net, source_weights)
        opt_g.zero_grad(set_to_none=True)
        accelerator.backward(loss_g)
        opt_g.step()
        stop_if_diverged(accelerator, {"discriminator loss": loss_d, "generator loss": loss_g}, step, output_dir)
        if ema is not None:
            ema.step(unwrapped.parameters())
        step += 1
        progress.update(1)

        if step_bookkeeping(accelerator, config, step, output_dir, progress, lambda: {
            "loss_d": float(loss_d.detach()), "loss_g": float(loss_g.detach()),
            "loss_adversarial": float(loss_adversarial.detach()),
            **({"l1": float(l1.detach())} if l1 is not None else {}),
            **({"source_drift": float(source_drift(generator_net, source_weights).detach())}
               if source_weights is not None else {}),
            "d_real": float(torch.sigmoid(d_real.detach()).mean()),
            "d_fake": float(torch.sigmoid(d_fake.detach()).mean()),
            "sample_diversity": sample_diversity(unwrapped, validation_batch, gan.diversity_samples, accelerator.device),
            "steps_per_second": step / max(clock.seconds(), 1e-9)},
            lambda path: validation_figure(ema_copy(unwrapped, ema), validation_batch, dataset.diseases, modalities,
                                           path, config.seed), postfix=("loss_d", "loss_g"), clock=clock):
            break
    progress.close()

    # 3. The pipeline folder: the EMA generator, usable by `generate --model`.
    folder = output_dir / "pipeline"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        CGANPipeline(ema_copy(unwrapped, ema), preprocess=index["preprocess"]).save_pretrained(str(folder))
        unwrapped.save_pretrained(str(folder / "generator_online"))
        accelerator.unwrap_model(discriminator).save_pretrained(str(folder / DISCRIMINATOR_FOLDER))
        chmod_like_open(folder)
        write_json(folder / "training.json", training_facts(config, index, dataset, step))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return folder


@torch.no_grad()
def sample_diversity(generator_net: CGANGenerator, batch: dict, samples: int, device) -> float:
    """Mean absolute difference between samples of one mask for different noise, inside the head.
    Falling towards 0 while the losses look fine is the sign of mode collapse."""
    was_training = generator_net.training
    generator_net.eval()
    labels = batch["labels"][:1].to(device).expand(samples, -1, -1, -1)
    diseases = batch["disease"][:1].to(device).expand(samples)
    rng = torch.Generator(device=device).manual_seed(1234)
    noise = torch.randn(samples, generator_net.config.noise_dim, generator=rng, device=device)
    volumes = generator_net(noise, labels, diseases, generator=rng)
    head = labels[0] > 0
    pairs = [(volumes[i] - volumes[j]).abs()[:, head].mean() for i in range(samples) for j in range(i + 1, samples)]
    generator_net.train(was_training)
    return float(torch.stack(pairs).mean())


@torch.no_grad()
def validation_figure(generator_net: CGANGenerator, batch: dict, diseases: list[str], modalities, path: Path,
                       seed: int) -> None:
    pipe = CGANPipeline(generator_net)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(batch["case_id"]))]
    volumes = pipe(batch["labels"], [int(d) for d in batch["disease"]], generator=generators).volumes.cpu().numpy()
    rows = [FigureRow(f"{cid} ({diseases[int(d)]})", {m: v[c] for c, m in enumerate(modalities)}, lab, (-1.0, 1.0))
            for cid, d, v, lab in zip(batch["case_id"], batch["disease"], volumes, batch["labels"].numpy())]
    write_slices_figure(path, rows, list(modalities), title=f"cGAN (EMA generator) at {path.stem}")
