"""Does a mask-conditioned generator sample, or regress to the mean? Pure functions of volumes that
share one mask, compared inside the head on one grid (the model's).

- `two_draw_ratio`: how much two draws of one mask differ, against how much a draw differs from the
  real case, on volumes z-scored inside the head. A true conditional sampler scores about 1 (the
  real case is one more draw from the same distribution), a mask-to-mean regressor or a copy 0.
- `spread_ratio`: the voxelwise standard deviation of K >= 2 draws of one mask inside the head, as a
  ratio to the truth's own same-mask spread (the phantom's truth draws): 1 right, 0 collapse, above
  1 noisier than the truth. The standard deviation is corrected for its small-sample bias (c4), so a
  perfect sampler reads about 1 whatever the two draw counts.
- `MaskGroup`: the same measures over one mask's draws as they stream past, one volume at a time.
- `correlation_with_real`: a draw's Pearson correlation with the real case inside the head (a
  sample must look like the anatomy its mask came from, clearly above what noise scores).
- `roughness_ratio`: a draw's mean squared difference between neighbouring head voxels over a truth
  draw's: 1 as fine-grained as the truth, above 1 grainier (residual noise), below 1 smoother (blur).
  Spread alone cannot tell variety of anatomy from grain; this column and `coarse_spread_ratio` (the
  spread after averaging 2x2x2 blocks, where voxel-scale grain averages out and anatomy does not) can.

Arrays are (modality, x, y, z) or (draw, modality, x, y, z); `head` is a boolean (x, y, z) mask.
"""

from __future__ import annotations

import math

import numpy as np


def zscore_in_head(volume: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Each modality to mean 0, sd 1 over the head's voxels: (modality, n_head_voxels)."""
    values = volume[:, head].astype(np.float64)
    return (values - values.mean(axis=1, keepdims=True)) / np.maximum(values.std(axis=1, keepdims=True), 1e-8)


def two_draw_ratio(first: np.ndarray, second: np.ndarray, real: np.ndarray, head: np.ndarray) -> float:
    """mean |a - b|^2 / mean of |a - real|^2 and |b - real|^2, z-scored in the head."""
    a, b, r = (zscore_in_head(v, head) for v in (first, second, real))
    between = np.mean((a - b) ** 2)
    to_real = 0.5 * (np.mean((a - r) ** 2) + np.mean((b - r) ** 2))
    return float(between / max(to_real, 1e-12))


def c4(n: int) -> float:
    """E[s] / sigma for the sample standard deviation of n normal draws (0.80 at 2, 0.92 at 4)."""
    return math.sqrt(2 / (n - 1)) * math.exp(math.lgamma(n / 2) - math.lgamma((n - 1) / 2))


def voxelwise_spread(draws: np.ndarray, head: np.ndarray) -> float:
    """Mean over modalities and head voxels of the standard deviation across draws (ddof 1, over c4)."""
    if len(draws) < 2:
        raise ValueError("the spread of draws needs at least two draws of one mask")
    return float(draws[:, :, head].std(axis=0, ddof=1).mean()) / c4(len(draws))


def spread_ratio(draws: np.ndarray, truth_draws: np.ndarray, head: np.ndarray) -> float:
    """The generator's same-mask spread over the truth's (both on one grid and intensity scale)."""
    return voxelwise_spread(draws, head) / max(voxelwise_spread(truth_draws, head), 1e-12)


def neighbour_roughness(volume: np.ndarray, head: np.ndarray) -> float:
    """Mean over modalities, axes and neighbouring voxel pairs inside the head of the squared difference."""
    values = []
    for axis in range(3):
        inside = np.logical_and(np.take(head, range(head.shape[axis] - 1), axis), np.take(head, range(1, head.shape[axis]), axis))
        values.append(np.diff(volume.astype(np.float64), axis=axis + 1)[:, inside].ravel())
    return float(np.mean(np.concatenate(values) ** 2))


def roughness_ratio(draw: np.ndarray, truth_draw: np.ndarray, head: np.ndarray) -> float:
    """The draw's neighbour roughness over a truth draw's of the same mask (same grid and intensity scale)."""
    return neighbour_roughness(draw, head) / max(neighbour_roughness(truth_draw, head), 1e-12)


def block_mean(volumes: np.ndarray, head: np.ndarray, factor: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(..., x, y, z) volumes averaged over factor^3 blocks (cropped to a multiple), and the blocks that lie
    wholly inside the head."""
    x, y, z = (n - n % factor for n in head.shape)
    blocks = lambda a: a[..., :x, :y, :z].reshape(*a.shape[:-3], x // factor, factor, y // factor, factor,  # noqa: E731
                                                  z // factor, factor)
    return blocks(volumes).mean(axis=(-5, -3, -1)), blocks(head).all(axis=(-5, -3, -1))


def coarse_spread_ratio(draws: np.ndarray, truth_draws: np.ndarray, head: np.ndarray, factor: int = 2) -> float:
    """`spread_ratio` on factor^3 block means: the variety at the scale of anatomy rather than of grain."""
    coarse_draws, coarse_head = block_mean(draws, head, factor)
    coarse_truth, _ = block_mean(truth_draws, head, factor)
    return spread_ratio(coarse_draws, coarse_truth, coarse_head)


def correlation_with_real(draw: np.ndarray, real: np.ndarray, head: np.ndarray) -> float:
    """Pearson correlation inside the head, pooled over modalities after z-scoring each."""
    a, r = zscore_in_head(draw, head), zscore_in_head(real, head)
    return float(np.mean(a * r))


class MaskGroup:
    """The draws of one mask, seen one at a time (memory: two volumes, whatever the draw count):
    running mean and sum of squares for the spread (Welford), the first two draws for the two-draw
    ratio. `real` and `head` are the mask's real case and its head, when known."""

    def __init__(self, real: np.ndarray | None, head: np.ndarray):
        self.real, self.head = real, head
        self.count, self.mean, self.squares, self.first_two = 0, None, None, []
        self.correlations: list[float] = []

    def add(self, draw: np.ndarray) -> None:
        values = draw[:, self.head].astype(np.float64)
        self.count += 1
        if self.mean is None:
            self.mean, self.squares = values.copy(), np.zeros_like(values)
        else:
            delta = values - self.mean
            self.mean += delta / self.count
            self.squares += delta * (values - self.mean)
        if len(self.first_two) < 2:
            self.first_two.append(draw)
        if self.real is not None:
            self.correlations.append(correlation_with_real(draw, self.real, self.head))

    def summary(self) -> dict:
        """{draws, spread, two_draw_ratio, correlation_with_real}; None where undefined."""
        spread = (float(np.sqrt(self.squares / (self.count - 1)).mean()) / c4(self.count)
                  if self.count >= 2 else None)
        two_draw = (two_draw_ratio(*self.first_two, self.real, self.head)
                    if self.count >= 2 and self.real is not None else None)
        correlation = float(np.mean(self.correlations)) if self.correlations else None
        return {"draws": self.count, "spread": spread, "two_draw_ratio": two_draw, "correlation_with_real": correlation}
