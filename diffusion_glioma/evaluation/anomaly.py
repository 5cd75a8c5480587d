"""The VAE anomaly-score classifier of the proposal: a VAE trained on healthy tissue reconstructs
healthy tissue; where a tumour is, its reconstruction error is large. Tumour presence (per axial
slice) and location (per voxel) are read from that error.

Trained on healthy tissue of real, synthetic or both kinds of training volumes (tumour voxels
excluded from the loss, the model conditioned on the head alone), each tested on the same held-out
real cases:

- location: voxel AUROC of the error, tumour (WT) against healthy head voxels; Dice of the error map
  thresholded at the 99th percentile of the healthy error on the training volumes (an honest
  threshold), and the best Dice over thresholds (an upper bound, as unsupervised anomaly detection
  papers report it);
- presence: slice AUROC of the largest error in each axial slice, slices with tumour against
  slices of head without.
"""

from __future__ import annotations

import numpy as np
import torch

from ..labels import BRATS_REGIONS, HEAD
from ..models.cgan import CGANGenerator
from ..models.vae import VAEEncoder, healthy_labels
from ..precision import fast_bf16
from ..training.vae import vae_loss


def auroc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """The area under the ROC curve: the probability that a positive outscores a negative (ties
    count half), by the Mann-Whitney U statistic."""
    from scipy.stats import rankdata

    if not len(positive) or not len(negative):
        return None
    ranks = rankdata(np.concatenate([positive, negative]))  # ties get their average rank
    u = ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


def _dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    total = prediction.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (prediction & truth).sum() / total)


def train_anomaly_vae(cases: list[dict], steps: int, seed: int = 0, batch_size: int = 2):
    """A small VAE on the healthy tissue of `cases` (prepared items: image in [-1, 1], common labels)."""
    torch.manual_seed(seed)
    channels, shape = cases[0]["image"].shape[0], tuple(cases[0]["labels"].shape)
    encoder = VAEEncoder(modalities=tuple(f"m{c}" for c in range(channels)), disease_classes=("none",),
                         volume_shape=shape, latent_dim=32, base_channels=16, levels=2)
    decoder = CGANGenerator(modalities=tuple(f"m{c}" for c in range(channels)), disease_classes=("none",),
                            volume_shape=shape, noise_dim=32, base_channels=16, levels=2)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *decoder.parameters()], lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        picks = torch.randint(len(cases), (batch_size,), generator=generator).tolist()
        image = torch.stack([cases[i]["image"] for i in picks])
        labels = torch.stack([cases[i]["labels"] for i in picks])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast_bf16("cpu")):
            loss, _ = vae_loss(encoder, decoder, image, labels, torch.zeros(batch_size, dtype=torch.long), beta=1.0,
                               healthy_only=True, rng=generator)
        optimizer.zero_grad()
        loss.float().backward()
        optimizer.step()
    return encoder.eval(), decoder.eval()


@torch.no_grad()
def error_maps(encoder, decoder, cases: list[dict]) -> list[np.ndarray]:
    """Mean absolute reconstruction error over modalities per voxel (0 outside the head); the
    reconstruction decodes the posterior mean with fixed injected noise."""
    maps = []
    for case in cases:
        labels = healthy_labels(case["labels"][None])
        mean, _ = encoder(case["image"][None], labels, torch.zeros(1, dtype=torch.long))
        reconstruction = decoder(mean, labels, torch.zeros(1, dtype=torch.long),
                                 generator=torch.Generator().manual_seed(0))
        error = (reconstruction - case["image"][None]).abs().mean(dim=1)[0].numpy()
        maps.append(np.where(case["labels"].numpy() > 0, error, 0.0))
    return maps


def score_maps(maps: list[np.ndarray], cases: list[dict], threshold: float) -> dict:
    tumour = [np.isin(c["labels"].numpy(), BRATS_REGIONS["WT"]) for c in cases]
    healthy = [(c["labels"].numpy() == HEAD) for c in cases]
    voxel = auroc(np.concatenate([m[t] for m, t in zip(maps, tumour)]),
                  np.concatenate([m[h] for m, h in zip(maps, healthy)]))
    with_tumour, without = [], []
    for m, t, h in zip(maps, tumour, healthy):
        for z in range(m.shape[2]):
            if t[:, :, z].any():
                with_tumour.append(m[:, :, z].max())
            elif h[:, :, z].any():
                without.append(m[:, :, z].max())
    candidates = np.quantile(np.concatenate([m[h] for m, h in zip(maps, healthy)]), np.linspace(0.80, 0.999, 40))
    best = max(float(np.mean([_dice(m > c, t) for m, t in zip(maps, tumour)])) for c in candidates)
    return {"voxel_auroc": voxel, "slice_auroc": auroc(np.array(with_tumour), np.array(without)),
            "dice": float(np.mean([_dice(m > threshold, t) for m, t in zip(maps, tumour)])), "best_dice": best,
            "n": len(cases)}


def anomaly_study(training: dict[str, list[dict]], test: list[dict], steps: int, seed: int = 0) -> dict:
    """{regime: scores on the held-out real cases} for a VAE trained on each training set's healthy
    tissue; the Dice threshold is the 99th percentile of the healthy error on that training set."""
    out = {}
    for regime, cases in training.items():
        if not cases:
            out[regime] = None
            continue
        encoder, decoder = train_anomaly_vae(cases, steps, seed)
        train_maps = error_maps(encoder, decoder, cases)
        healthy = np.concatenate([m[c["labels"].numpy() == HEAD] for m, c in zip(train_maps, cases)])
        out[regime] = score_maps(error_maps(encoder, decoder, test), test, float(np.quantile(healthy, 0.99)))
    return out
