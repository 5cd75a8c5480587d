"""Fidelity and diversity metrics as pure functions of features and volumes: FID, KID (mean and
standard deviation over subsets), MS-SSIM diversity, paired SSIM, PSNR and MAE inside the head with
trivial references, and memorisation against the nearest training case other than the source.

The feature extractors live in `features.py`; the report that calls these in `report.py`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DiffusionGliomaError

VOLUME_SIZE = (32, 32, 32)  # 3D features and diversity are computed at this size
SLICE_SIZE = (64, 64)


def mean_and_sd(values: list[float]) -> dict:
    """{"mean", "sd"} of repeated scores (runs with different seeds); sd is the sample standard
    deviation, None for a single value."""
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None}


def frechet_distance(real: torch.Tensor, synthetic: torch.Tensor) -> float | None:
    """FID between two feature sets (MONAI's FIDMetric); None when a set has fewer than 2 members."""
    from monai.metrics import FIDMetric

    if len(real) < 2 or len(synthetic) < 2:
        return None
    return float(FIDMetric()(synthetic.double(), real.double()))


def _frechet_from_statistics(mean_a, cov_a, mean_b, cov_b) -> float:
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)), the square root's trace from the eigenvalues
    of C_a C_b (real and non-negative for two covariances, up to rounding): a few ms at 112 dimensions,
    where a matrix square root per bootstrap resample would dominate a report."""
    eigenvalues = np.linalg.eigvals(cov_a @ cov_b)
    root_trace = np.sqrt(np.clip(eigenvalues.real, 0, None)).sum()
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * root_trace)


def fid_interval(real: torch.Tensor, synthetic: torch.Tensor, resamples: int = 200, seed: int = 0) -> list | None:
    """A bootstrap 95% interval of the FID: both sets resampled (volumes with replacement), FID each
    time. It says how far the number moves with the draw of volumes at this n; FID's own bias at small
    n (see the rank-deficiency note) moves the whole interval, not its width."""
    if len(real) < 2 or len(synthetic) < 2:
        return None
    x, y = real.double().numpy(), synthetic.double().numpy()
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        a, b = x[rng.integers(len(x), size=len(x))], y[rng.integers(len(y), size=len(y))]
        values.append(_frechet_from_statistics(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def _polynomial_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.T / a.shape[1] + 1) ** 3


def _mmd2(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor) -> float:
    """The unbiased squared MMD from the three kernel matrices."""
    n, m = len(kxx), len(kyy)
    return float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
                 + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean())


def kernel_inception_distance(real: torch.Tensor, synthetic: torch.Tensor) -> float | None:
    """KID: unbiased squared MMD with the cubic polynomial kernel (Bińkowski et al. 2018)."""
    if len(real) < 2 or len(synthetic) < 2:
        return None
    x, y = real.double(), synthetic.double()
    return _mmd2(_polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y))


KID_INTERVAL_MAX = 4096  # volumes per set: its three 4096² kernels in float64 are 400 MB, held once


def kid_kernels(real: torch.Tensor, synthetic: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The three kernel matrices (real-real, synthetic-synthetic, real-synthetic) in float64, for
    `kid_over_subsets` and `kid_interval` to share; None past `KID_INTERVAL_MAX` volumes a set, where
    each computes what it needs on its own."""
    if max(len(real), len(synthetic)) > KID_INTERVAL_MAX:
        return None
    x, y = real.double(), synthetic.double()
    return _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)


def kid_interval(real: torch.Tensor, synthetic: torch.Tensor, resamples: int = 1000, seed: int = 0,
                 kernels: tuple | None = None) -> list | None:
    """A bootstrap 95% interval of the KID, as `fid_interval` gives FID's: both sets resampled
    (volumes with replacement), the unbiased MMD² each time over the pairs of distinct draws (a volume
    drawn twice is not paired with itself, which would add its self-similarity to the estimate).
    The kernels are computed once, so sets of more than `KID_INTERVAL_MAX` volumes get no interval
    (their memory would grow with the square of the set; the subsets' deviation still shows). Each
    resample costs three matrix-vector products (how often each volume was drawn), so it takes 1000.
    It is the interval of the whole-set KID; the report's value beside it is the mean over subsets of
    half the set or less, which has the same expectation and a wider spread. `kernels`: `kid_kernels`
    of the same two sets, computed once for both KID functions."""
    n, m = len(real), len(synthetic)
    if min(n, m) < 3 or max(n, m) > KID_INTERVAL_MAX:
        return None
    kxx, kyy, kxy = (k.numpy() for k in (kernels or kid_kernels(real, synthetic)))
    rng = np.random.default_rng(seed)

    def within(kernel: np.ndarray, counts: np.ndarray) -> float | None:
        # The mean kernel over pairs of distinct draws, from how often each volume was drawn: no copies.
        pairs = counts.sum() ** 2 - (counts ** 2).sum()
        return float((counts @ kernel @ counts - (counts ** 2 * kernel.diagonal()).sum()) / pairs) if pairs else None

    values = []
    for _ in range(resamples):
        cx, cy = np.bincount(rng.integers(n, size=n), minlength=n), np.bincount(rng.integers(m, size=m), minlength=m)
        xx, yy = within(kxx, cx), within(kyy, cy)
        if xx is not None and yy is not None:
            values.append(xx + yy - 2 * float(cx @ kxy @ cy) / (n * m))
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else None


def kid_over_subsets(real: torch.Tensor, synthetic: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                     seed: int = 0, kernels: tuple | None = None) -> dict | None:
    """KID as torch-fidelity and the StyleGAN/GliomaGen papers report it: the mean and standard
    deviation over `subsets` random subsets of `subset_size` features drawn from each set without
    replacement. Sets of fewer than 2 x `subset_size` give subsets of half the smaller set, so that
    subsets differ and the deviation says how much KID moves with the draw (of a set half this size);
    a set of fewer than 4 scores both whole sets once, with no deviation. `kernels`: as `kid_interval`'s."""
    n, m = len(real), len(synthetic)
    if min(n, m) < 2:
        return None
    x, y = real.double(), synthetic.double()
    size = min(subset_size, n // 2, m // 2)
    if size < 2:  # too few to subsample: both whole sets, once
        return {"mean": kernel_inception_distance(x, y), "std": 0.0, "subsets": 1, "subset_size": min(n, m)}
    # Kernels of sets up to a few thousand features are computed once and indexed per subset.
    whole = max(n, m) <= KID_INTERVAL_MAX
    if whole:
        kxx, kyy, kxy = kernels or kid_kernels(x, y)
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        i, j = torch.randperm(n, generator=generator)[:size], torch.randperm(m, generator=generator)[:size]
        if whole:
            values.append(_mmd2(kxx[i][:, i], kyy[j][:, j], kxy[i][:, j]))
        else:
            values.append(kernel_inception_distance(x[i], y[j]))
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "subsets": subsets, "subset_size": size}


def inception_score(probabilities: torch.Tensor) -> float | None:
    """exp(E_x KL(p(y|x) || p(y))) from (n, classes) predicted probabilities (Salimans et al. 2016).
    With a domain classifier (the StyleGAN2 tumour study's measure) it runs from 1 (every volume
    gets the same prediction, or none is confident) to the number of classes (each volume is
    confidently one class and the classes are balanced)."""
    if len(probabilities) < 2:
        return None
    p = probabilities.double().clamp_min(1e-12)
    marginal = p.mean(dim=0, keepdim=True)
    return float(torch.exp((p * (p.log() - marginal.log())).sum(dim=1).mean()))


def ms_ssim_diversity(volumes: torch.Tensor, max_pairs: int = 50, seed: int = 0) -> float | None:
    """Mean MS-SSIM between distinct volumes of a set, per channel averaged (lower = more diverse).
    Three scales with a 5-voxel kernel, so that it is defined at VOLUME_SIZE."""
    from monai.metrics import MultiScaleSSIMMetric

    n = len(volumes)
    if n < 2:
        return None
    pairs = list(itertools.combinations(range(n), 2))
    if len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in rng.choice(len(pairs), max_pairs, replace=False)]
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=5, weights=(0.3, 0.4, 0.3))
    a = torch.stack([volumes[i] for i, _ in pairs]).flatten(0, 1)[:, None]
    b = torch.stack([volumes[j] for _, j in pairs]).flatten(0, 1)[:, None]
    return float(metric(a, b).mean())


def paired_similarity(real: np.ndarray, synthetic: np.ndarray, head: np.ndarray) -> dict[str, float]:
    """SSIM, PSNR and MAE of two volumes in [0, 1] on the same grid, inside the head only.

    The background is shared by construction (both are 0 there) and is most of a volume, so any
    whole-volume score would mostly measure it. SSIM uses the Gaussian window (sigma 1.5) of the
    papers' convention, its map averaged over head voxels; PSNR and MAE use head voxels only."""
    from skimage.metrics import structural_similarity

    if not head.any():
        raise DiffusionGliomaError("paired metrics need a head mask with at least one voxel")
    # Outside the head both volumes get the real head's mean: otherwise the head's outline, which any
    # generator copies from the mask, would count as shared structure in every window at its edge.
    fill = float(real[head].mean())
    _, ssim_map = structural_similarity(np.where(head, real, fill), np.where(head, synthetic, fill), data_range=1.0,
                                        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True)
    difference = (real[head].astype(np.float64) - synthetic[head].astype(np.float64))
    mse = float(np.mean(difference ** 2))
    return {"ssim": float(ssim_map[head].mean()), "psnr": math.inf if mse == 0 else 10 * math.log10(1.0 / mse),
            "mae": float(np.abs(difference).mean())}


MEAN_FILL, NOISE = "mean-fill inside the head", "noise inside the head"


def trivial_references(real: np.ndarray, head: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """What a generator that learnt nothing but the head would write: the real volume's mean
    intensity everywhere inside the head, and uniform noise inside the head (0 outside both)."""
    rng = np.random.default_rng(seed)
    mean_fill = np.where(head, real[head].mean(), 0.0).astype(real.dtype)
    noise = np.where(head, rng.uniform(0, 1, real.shape), 0.0).astype(real.dtype)
    return {MEAN_FILL: mean_fill, NOISE: noise}


@dataclass
class Memorisation:
    """For each synthetic volume, its nearest training case other than the case its mask came from,
    in 3D feature space, judged against how close real cases come to each other."""

    nearest: list[tuple[str, str, float]]  # (synthetic id, nearest other training case, distance)
    threshold: float | None  # the real-vs-real nearest-neighbour distance at `quantile`
    quantile: float
    suspicious: list[str]  # synthetic ids closer to another training case than the threshold


def memorisation(real_ids: list[str], real_features: torch.Tensor, synthetic_ids: list[str],
                 synthetic_features: torch.Tensor, synthetic_sources: list[str], *, quantile: float = 0.05,
                 training: set[str] | None = None) -> Memorisation:
    """Memorisation against the nearest training case *other than the source case*.

    A synthetic volume made from case A's mask should resemble A (the paired metrics reward that),
    so closeness to A says nothing. Closeness to another case B that it had no reason to resemble
    does: it is flagged when its distance to B is below the `quantile` of the real-vs-real nearest-
    neighbour distances (by construction that fraction of real cases falls below it too).
    `training`: the generator's training cases, when known; otherwise every real case counts."""
    real_features = real_features.double()
    within = torch.cdist(real_features, real_features)
    within.fill_diagonal_(math.inf)
    threshold = float(torch.quantile(within.min(dim=1).values, quantile)) if len(real_ids) >= 2 else None
    candidates = [i for i, r in enumerate(real_ids) if training is None or r in training]
    nearest, suspicious = [], []
    if candidates and len(synthetic_ids):
        distances = torch.cdist(synthetic_features.double(), real_features[candidates])
        for row, (sid, source) in enumerate(zip(synthetic_ids, synthetic_sources)):
            others = [k for k, i in enumerate(candidates) if real_ids[i] != source]
            if not others:
                continue
            k = others[int(distances[row, others].argmin())]
            distance = float(distances[row, k])
            nearest.append((sid, real_ids[candidates[k]], distance))
            if threshold is not None and distance < threshold:
                suspicious.append(sid)
    return Memorisation(nearest, threshold, quantile, suspicious)


def memorisation_against_training(training_ids: list[str], training_features: torch.Tensor,
                                  held_out_features: torch.Tensor, synthetic_ids: list[str],
                                  synthetic_features: torch.Tensor, *, quantile: float = 0.05) -> Memorisation:
    """Memorisation when the real set is held out: each synthetic volume's nearest training case (its
    mask is held out, so no training case is its own), flagged when it lies closer than the `quantile`
    of the held-out real cases' own distances to their nearest training case: that share of genuinely
    new cases comes that close too."""
    training_features = training_features.double()
    threshold = None
    if len(held_out_features) and len(training_ids):
        real_nearest = torch.cdist(held_out_features.double(), training_features).min(dim=1).values
        threshold = float(torch.quantile(real_nearest, quantile))
    nearest, suspicious = [], []
    if len(training_ids) and len(synthetic_ids):
        distances = torch.cdist(synthetic_features.double(), training_features)
        for row, sid in enumerate(synthetic_ids):
            k = int(distances[row].argmin())
            nearest.append((sid, training_ids[k], float(distances[row, k])))
            if threshold is not None and nearest[-1][2] < threshold:
                suspicious.append(sid)
    return Memorisation(nearest, threshold, quantile, suspicious)
