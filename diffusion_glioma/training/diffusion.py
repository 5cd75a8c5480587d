"""One Accelerate loop for the diffusion model: pretraining, and fine-tuning to another disease.

    accelerate launch scripts/train.py --config configs/pretrain_gbm.yaml
    diffusion-glioma train --config configs/finetune_peds.yaml --limit-cases 5

A run folder holds the resolved config, `checkpoints/checkpoint-<step>` (accelerate state: model,
optimizer, schedule, EMA, RNG), TensorBoard logs, validation figures, and at the end `pipeline/`,
a `MaskToMRIPipeline` folder with the EMA weights.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.cache import read_index
from ..data.dataset import CachedCases
from ..io import chmod_like_open, write_json
from ..models.unet3d import PRESETS, DenoiserUNet3D, build_denoiser
from ..pipeline import (MaskToMRIPipeline, alpha_bar_at, load_pipeline, make_scheduler, skip_coefficients,
                        training_scheduler)
from ..figures import FigureRow, write_slices_figure
from .common import (StepSampler, TrainingClock, TrainingError, budget_spent, check_ranks_agree, checkpoints, collate, ema_copy, load_checkpoint,
                     log_figure, rewind_log, save_checkpoint, source_drift, start_run, start_trackers, step_generator,
                     stop_if_diverged, trained_classes, training_facts, with_classes)
from .config import TrainConfig


def build_model(config: TrainConfig, cache_index: dict) -> tuple[DenoiserUNet3D, dict | None]:
    """A fresh model, or the fine-tuning source with its classes extended to the target's.

    Returns the model and, for fine-tuning, the source weights (for the L2-SP/EWC penalty).
    """
    modalities = tuple(cache_index["modalities"])
    if config.finetune is None:
        settings = {**PRESETS.get(config.model.preset, {}), **config.model.overrides}  # build_denoiser names a bad preset
        measured = {}
        if settings.get("wavelet") and config.diffusion.normalise_wavelet_bands and "wavelet_band_scale" not in settings:
            measured["wavelet_band_scale"] = wavelet_band_scale(
                config.data.cache, config.model.disease_classes, only_diseases=config.data.only_diseases,
                limit=config.data.limit_cases, case_ids=config.data.case_ids)
        model = build_denoiser(config.model.preset, modalities=modalities,
                               disease_classes=tuple(config.model.disease_classes),
                               skip_sigma_data=config.diffusion.skip_sigma_data, **config.model.overrides, **measured)
        return model, None
    source = load_pipeline(config.finetune.source)
    source_config = source.unet.config
    if tuple(source_config.modalities) != modalities:
        raise TrainingError(f"{config.data.cache}: the data has modalities {list(modalities)} but the source model "
                            f"{config.finetune.source} makes {list(source_config.modalities)}")
    source_prediction = source.scheduler.config.prediction_type
    if source_prediction != config.diffusion.prediction_type:
        raise TrainingError(f"{config.finetune.source}: the source model predicts {source_prediction!r}; set "
                            f"diffusion.prediction_type to it (the config says {config.diffusion.prediction_type!r})")
    source_skip = source_config.get("skip_sigma_data")
    if source_skip != config.diffusion.skip_sigma_data:
        raise TrainingError(f"{config.finetune.source}: the source model's EDM skip is skip_sigma_data={source_skip}; "
                            f"set diffusion.skip_sigma_data to it (the config says {config.diffusion.skip_sigma_data})")
    source_grid = (source.config.preprocess or {})
    data_grid = cache_index["preprocess"]
    for key in ("shape", "spacing"):
        if key in source_grid and list(source_grid[key]) != list(data_grid[key]):
            raise TrainingError(f"{config.data.cache}: data prepared with {key} {data_grid[key]} but the source "
                                f"model was trained with {source_grid[key]}; prepare the data with its settings")
    classes = list(source_config.disease_classes)
    new = [d for d in config.model.disease_classes if d not in classes]
    model = with_classes(source.unet, classes + new, trained_classes(config.finetune.source, classes))
    source_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if config.finetune.mode == "frozen_encoder":
        for module in (model.conv_in, model.down_levels, model.downsamplers):
            module.requires_grad_(False)
    return model, source_weights


def head_on_model_grid(labels: torch.Tensor, wavelet: bool) -> torch.Tensor:
    """(b, 1, ...) float mask of the head on the grid the model diffuses on: for a wavelet model every
    2x2x2 block that touches the head."""
    head = (labels > 0).float()[:, None]
    return F.max_pool3d(head, 2) if wavelet else head


def wavelet_band_scale(cache, disease_classes, cases: int = 16, *, only_diseases: list[str] | None = None,
                       limit: int | None = None, case_ids: list[str] | None = None) -> tuple[float, ...]:
    """The standard deviation of each Haar band over the heads of the first `cases` training cases: the
    cache's cases left by the run's own filters (`only_diseases`, `limit`, `case_ids`, as training
    reads them), so that a run on a few cases learns nothing, not even this, from the others. The
    cache's fixed order gives every process and a resumed run the same numbers."""
    from ..models.wavelet import haar3d

    dataset = CachedCases(cache, diseases=list(disease_classes), only_diseases=only_diseases, limit=limit,
                          case_ids=case_ids)
    sums, squares, count = torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64), 0
    for i in range(min(cases, len(dataset))):
        item = dataset[i]
        coefficients = haar3d(item["image"].float()[None])[0].double()  # (modalities * 8, x, y, z)
        head = head_on_model_grid(item["labels"][None], wavelet=True)[0, 0] > 0
        bands = coefficients.view(-1, 8, *coefficients.shape[1:])[:, :, head]  # (modality, band, voxels)
        sums += bands.sum(dim=(0, 2))
        squares += (bands**2).sum(dim=(0, 2))
        count += bands.shape[0] * bands.shape[2]
    variance = squares / count - (sums / count) ** 2
    return tuple(round(float(v), 5) for v in variance.clamp_min(1e-8).sqrt())


def diffusion_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor,
                     kind: str, skip_sigma_data: float | None = None) -> torch.Tensor:
    """What the network learns to output. With an EDM skip, F = (x0 - skip * x_t) / out: a uniform loss
    on F is EDM's loss weighting on x0."""
    if skip_sigma_data is not None:
        skip, out = skip_coefficients(alpha_bar_at(scheduler, t, x0), skip_sigma_data)
        return (x0 - skip * noisy) / out
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Run (or resume) training; returns the saved pipeline folder."""
    output_dir = Path(config.output_dir)
    accelerator = start_run(config, resume)
    existing = checkpoints(output_dir / "checkpoints")

    # 1. Data and model.
    index = read_index(config.data.cache)
    model, source_weights = build_model(config, index)
    dataset = CachedCases(config.data.cache, diseases=list(model.config.disease_classes),
                          only_diseases=config.data.only_diseases, limit=config.data.limit_cases,
                          case_ids=config.data.case_ids,
                          memory_cache_gb=config.data.memory_cache_gb)
    if config.optim.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    noise_scheduler = training_scheduler(config.diffusion.prediction_type, config.diffusion.num_train_timesteps,
                                         value_range=model.value_range)
    ema = EMAModel(model.parameters(), decay=config.ema.decay, use_ema_warmup=config.ema.warmup,
                   model_cls=DenoiserUNet3D, model_config=model.config) if config.ema.enabled else None

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.optim.learning_rate, weight_decay=config.optim.weight_decay)
    lr_scheduler = get_scheduler(config.optim.lr_schedule, optimizer,
                                 num_warmup_steps=config.optim.warmup_steps * accelerator.num_processes,
                                 num_training_steps=config.optim.steps * accelerator.num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    if source_weights is not None:
        source_weights = {k: v.to(accelerator.device) for k, v in source_weights.items()}

    # 2. Resume: weights, optimizer, schedule and EMA from the newest checkpoint; data order from the step.
    step, path = 0, None
    if resume and existing:
        step, path = existing[-1]
        load_checkpoint(accelerator, path)
        accelerator.print(f"resumed from {path} (step {step})", file=sys.stderr)
    if step >= config.optim.steps:
        accelerator.print(f"nothing to do: the run is at step {step} of {config.optim.steps}", file=sys.stderr)
        return _save_pipeline(accelerator, model, ema, noise_scheduler, index, dataset, config, output_dir, step)

    micro_per_step = config.optim.gradient_accumulation_steps
    samples_per_step = config.optim.batch_size * micro_per_step * accelerator.num_processes
    sampler = StepSampler(len(dataset), config.seed, start=step * samples_per_step,
                          count=(config.optim.steps - step) * samples_per_step)
    loader = accelerator.prepare_data_loader(DataLoader(
        dataset, batch_size=config.optim.batch_size, sampler=sampler, num_workers=config.data.num_workers,
        collate_fn=collate), device_placement=True)

    start_trackers(accelerator, config, "train")
    order_log = output_dir / "logs" / f"data_order_rank{accelerator.process_index}.jsonl"
    order_log.parent.mkdir(parents=True, exist_ok=True)
    metrics_log = output_dir / "logs" / "metrics.jsonl"
    rewind_log(order_log, "micro_step", step * micro_per_step)  # each rank its own
    if accelerator.is_main_process:
        rewind_log(metrics_log, "step", step)
    validation_batch = collate([dataset[i] for i in range(min(2, len(dataset)))])

    # 3. The loop.
    progress = tqdm(total=config.optim.steps, initial=step, desc="train", unit="step",
                    disable=not accelerator.is_local_main_process)
    micro_step = step * micro_per_step
    clock = TrainingClock(path)
    window_start, window_volumes = time.perf_counter(), 0
    # Losses stay on the device between log steps: reading one back every micro-step would make the
    # host wait for the GPU each time. A NaN anywhere in the window reaches the sum.
    window_loss, window_micro_steps = torch.zeros((), device=accelerator.device), 0
    unwrapped = accelerator.unwrap_model(model)
    for batch in loader:
        generator = step_generator(accelerator.device, config.seed, micro_step, accelerator.process_index)
        micro_step += 1
        with accelerator.accumulate(model):
            loss = _diffusion_loss(model, unwrapped, noise_scheduler, batch, generator, config, source_weights)
            accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(trainable, config.optim.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        window_loss += loss.detach()
        window_micro_steps += 1
        window_volumes += batch["image"].shape[0] * accelerator.num_processes
        with order_log.open("a") as f:
            f.write(json.dumps({"micro_step": micro_step, "cases": batch["case_id"]}) + "\n")
        if not accelerator.sync_gradients:
            continue

        # After each optimizer step.
        if ema is not None:
            ema.step(unwrapped.parameters())
        step += 1
        progress.update(1)
        out_of_time = budget_spent(accelerator, config, step, clock)
        last = step == config.optim.steps or out_of_time
        logging = step % config.log_every == 0 or last
        if logging or step % config.checkpoints.every == 0:
            # The mean loss of the window over every process; checked before any checkpoint is written.
            mean_loss = accelerator.reduce(window_loss / window_micro_steps, reduction="mean")
            stop_if_diverged(accelerator, {"loss": mean_loss}, step - 1, output_dir)
        if logging:
            elapsed = time.perf_counter() - window_start
            logs = {"loss": float(mean_loss), "lr": lr_scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                    "volumes_per_second": window_volumes / max(elapsed, 1e-9)}
            if source_weights is not None:  # how far fine-tuning has moved: the scale for ewc_weight
                with torch.no_grad():
                    logs["source_drift"] = float(source_drift(model, source_weights))
            accelerator.log(logs, step=step)
            if accelerator.is_main_process:
                with metrics_log.open("a") as f:
                    f.write(json.dumps({"step": step, **logs}) + "\n")
            progress.set_postfix(loss=f"{logs['loss']:.4f}")
            window_start, window_volumes = time.perf_counter(), 0
            window_loss, window_micro_steps = torch.zeros((), device=accelerator.device), 0
        if step % config.checkpoints.every == 0 or last:
            check_ranks_agree(accelerator, model, output_dir, step)
            save_checkpoint(accelerator, output_dir / "checkpoints", step, config.checkpoints.total_limit, clock)
        if step % config.validation.every == 0 or last:
            _validation_figure(accelerator, unwrapped, ema, noise_scheduler, validation_batch, config, step,
                               dataset.diseases)
        if out_of_time:
            break
    progress.close()
    folder = _save_pipeline(accelerator, model, ema, noise_scheduler, index, dataset, config, output_dir, step)
    accelerator.end_training()  # after the last barrier: it tears down the process group
    return folder


def _diffusion_loss(model, unwrapped, noise_scheduler, batch, generator, config: TrainConfig, source_weights):
    # The loader ships float16 images and uint8 labels; cast, transform and one-hot here, on the device.
    x0 = unwrapped.encode(batch["image"].float())
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = training_timesteps(noise_scheduler, b, generator, config, x0.device)
    drop = torch.rand(b, generator=generator, device=x0.device) < config.diffusion.class_dropout
    class_labels = torch.where(drop, torch.zeros_like(batch["disease"]), batch["disease"])
    noisy = noise_scheduler.add_noise(x0, noise, t)
    prediction = model(noisy, t, batch["labels"], class_labels).sample.float()
    target = diffusion_target(noise_scheduler, x0, noise, noisy, t, config.diffusion.prediction_type,
                              config.diffusion.skip_sigma_data).float()
    error = (prediction - target).abs() if config.diffusion.loss == "l1" else (prediction - target) ** 2
    if config.diffusion.loss_in_head:  # the background is the mask's: its loss only teaches a constant
        head = head_on_model_grid(batch["labels"], unwrapped.config.wavelet)
        per_case = (error * head).sum(dim=(1, 2, 3, 4)) / (head.sum(dim=(1, 2, 3, 4)) * error.shape[1]).clamp_min(1)
    else:
        per_case = error.mean(dim=(1, 2, 3, 4))
    loss = (per_case * snr_weight(noise_scheduler, t, config)).mean()
    if source_weights is not None and config.finetune.ewc_weight > 0:
        loss = loss + config.finetune.ewc_weight * source_drift(model, source_weights)
    return loss


def training_timesteps(noise_scheduler, b: int, generator, config: TrainConfig, device) -> torch.Tensor:
    """The noise level of each training volume: uniform over t, or EDM's log-normal sigma mapped to the
    nearest level of the discrete schedule. With v-prediction and a uniform loss this is EDM's
    preconditioning at sigma_data = 1 (c_skip = alpha, c_out = -sigma in these coordinates); only where
    the training signal goes changes."""
    steps = noise_scheduler.config.num_train_timesteps
    if config.diffusion.noise_levels == "uniform":
        return torch.randint(0, steps, (b,), generator=generator, device=device)
    alpha_bar = noise_scheduler.alphas_cumprod.double()
    log_sigma = (0.5 * ((1 - alpha_bar) / alpha_bar).log()).to(device)  # increasing in t
    drawn = config.diffusion.lognormal_mean + config.diffusion.lognormal_std * torch.randn(
        b, generator=generator, device=device, dtype=torch.float64)
    above = torch.searchsorted(log_sigma, drawn).clamp(1, steps - 1)
    nearer_below = (drawn - log_sigma[above - 1]) < (log_sigma[above] - drawn)
    return torch.where(nearer_below, above - 1, above)


def snr_weight(noise_scheduler, t: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """min-SNR-gamma (Hang et al. 2023), for every prediction target: each noise level weighs as an x0
    loss with its SNR capped at gamma, so the nearly clean levels that carry texture and edges are not
    drowned by the noisiest ones, nor the noisiest by the nearly clean ones."""
    gamma = config.diffusion.snr_gamma
    if gamma is None:
        return torch.ones_like(t, dtype=torch.float32)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, t).float()
    capped = snr.clamp(max=gamma)
    kind = config.diffusion.prediction_type
    return capped / snr if kind == "epsilon" else capped / (snr + 1) if kind == "v_prediction" else capped


def _ema_pipeline(model: DenoiserUNet3D, ema, scheduler, preprocess: dict | None) -> MaskToMRIPipeline:
    """A pipeline holding a copy of the model with the EMA weights (the training model is untouched)."""
    return MaskToMRIPipeline(ema_copy(model, ema), scheduler, preprocess=preprocess)


@torch.no_grad()
def _validation_figure(accelerator, model, ema, noise_scheduler, batch, config: TrainConfig, step: int,
                       diseases: list[str]) -> None:
    if not accelerator.is_main_process:
        return
    pipe = _ema_pipeline(model, ema, make_scheduler(config.validation.sampler, noise_scheduler.config), None)
    generator = torch.Generator().manual_seed(config.seed)
    out = pipe(batch["labels"], [int(d) for d in batch["disease"]], guidance_scale=config.validation.guidance_scale,
               num_inference_steps=config.validation.num_inference_steps, generator=generator, progress=False)
    modalities = list(model.config.modalities)
    rows = [FigureRow(f"{case_id} ({diseases[int(d)]})", {m: volume[c] for c, m in enumerate(modalities)}, labels,
                      value_range=(-1.0, 1.0))
            for case_id, d, volume, labels in zip(batch["case_id"], batch["disease"], out.volumes.float().cpu().numpy(),
                                                  batch["labels"].numpy())]
    figure = Path(config.output_dir) / "validation" / f"step-{step:07d}.png"
    write_slices_figure(figure, rows, modalities, title=f"EMA samples at step {step}")
    log_figure(accelerator, figure, step)


def _save_pipeline(accelerator, model, ema, noise_scheduler, index: dict, dataset: CachedCases,
                   config: TrainConfig, output_dir: Path, step: int) -> Path:
    """`pipeline/`: EMA weights as the model, the online weights under `unet_online/`, and what the
    run knew: grid and intensity settings, modalities, disease classes, label scheme, config."""
    folder = output_dir / "pipeline"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        pipe = _ema_pipeline(unwrapped, ema, noise_scheduler, index["preprocess"])
        pipe.save_pretrained(str(folder))
        unwrapped.save_pretrained(str(folder / "unet_online"))
        chmod_like_open(folder)
        write_json(folder / "training.json", training_facts(config, index, dataset, step))
    accelerator.wait_for_everyone()
    return folder
