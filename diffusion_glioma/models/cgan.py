"""The conditional GAN baseline: the diffusion model is judged against it, so it is a real one.

Generator: a noise vector and the condition (one-hot mask in the common scheme, disease class
through a label embedding) -> transposed-convolution upsampling -> every modality, tanh. Noise is
also injected at every resolution, so samples for one mask vary. Discriminator: strided 3D
convolutions with LeakyReLU and dropout judging (volume, mask, class), ending in a sigmoid (the
training loss uses the logit form of binary cross-entropy, which is the same loss computed stably).
Both are diffusers `ModelMixin` + `ConfigMixin`: safetensors + config.json, `from_pretrained`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ..labels import COMMON_LABELS
from .conditioning import one_hot


def _pooled_mask(mask: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """The one-hot mask at a coarser resolution (label fractions per voxel)."""
    return F.adaptive_avg_pool3d(mask, size)


class CGANGenerator(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, modalities: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f"), num_labels: int = len(COMMON_LABELS),
                 disease_classes: tuple[str, ...] = ("none", "glioblastoma", "pediatric_diffuse_glioma"),
                 volume_shape: tuple[int, int, int] = (32, 32, 32), noise_dim: int = 64, base_channels: int = 32,
                 levels: int = 3, embedding_dim: int = 16):
        super().__init__()
        factor = 2 ** levels
        if any(s % factor for s in volume_shape):
            raise ValueError(f"volume_shape {list(volume_shape)} must be divisible by 2**levels = {factor}")
        self.coarse = tuple(s // factor for s in volume_shape)
        widths = [base_channels * 2 ** (levels - i) for i in range(levels + 1)]  # coarse -> fine
        self.class_embedding = nn.Embedding(len(disease_classes), embedding_dim)
        coarse_voxels = self.coarse[0] * self.coarse[1] * self.coarse[2]
        self.project = nn.Linear(noise_dim + embedding_dim, widths[0] * coarse_voxels)
        self.ups = nn.ModuleList()
        self.noise_scales = nn.ParameterList()
        for i in range(levels):
            in_channels = widths[i] + num_labels
            self.ups.append(nn.Sequential(
                nn.ConvTranspose3d(in_channels, widths[i + 1], 4, stride=2, padding=1),
                nn.GroupNorm(min(8, widths[i + 1]), widths[i + 1]),
                nn.LeakyReLU(0.2),
            ))
            self.noise_scales.append(nn.Parameter(torch.full((1, widths[i + 1], 1, 1, 1), 0.1)))
        self.to_volume = nn.Conv3d(widths[-1] + num_labels, len(modalities), 3, padding=1)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor, class_labels: torch.Tensor,
                generator: torch.Generator | list | None = None) -> torch.Tensor:
        """noise (b, noise_dim), labels (b, x, y, z) integers, class_labels (b,) -> (b, modalities, x, y, z)."""
        from diffusers.utils.torch_utils import randn_tensor

        mask = one_hot(labels, self.config.num_labels, self.dtype)
        b = noise.shape[0]
        h = self.project(torch.cat([noise, self.class_embedding(class_labels.long())], dim=1))
        h = h.view(b, -1, *self.coarse)
        for up, scale in zip(self.ups, self.noise_scales):
            h = up(torch.cat([h, _pooled_mask(mask, h.shape[2:])], dim=1))
            injected = randn_tensor((b, 1, *h.shape[2:]), generator=generator, device=h.device, dtype=h.dtype)
            h = h + scale * injected
        out = torch.tanh(self.to_volume(torch.cat([h, mask], dim=1)))
        return torch.where(labels[:, None] == 0, torch.full_like(out, -1.0), out)


class CGANDiscriminator(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, modalities: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f"), num_labels: int = len(COMMON_LABELS),
                 disease_classes: tuple[str, ...] = ("none", "glioblastoma", "pediatric_diffuse_glioma"),
                 volume_shape: tuple[int, int, int] = (32, 32, 32), base_channels: int = 32, levels: int = 3,
                 dropout: float = 0.3, embedding_dim: int = 4):
        super().__init__()
        self.class_embedding = nn.Embedding(len(disease_classes), embedding_dim)
        channels = len(modalities) + num_labels + embedding_dim
        layers = []
        for i in range(levels):
            out_channels = base_channels * 2 ** i
            layers += [nn.Conv3d(channels, out_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Dropout3d(dropout)]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        coarse = [s // 2 ** levels for s in volume_shape]
        self.classify = nn.Linear(channels * coarse[0] * coarse[1] * coarse[2], 1)

    def forward(self, volume: torch.Tensor, labels: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """The logit of "real" for each (volume, mask, class); `torch.sigmoid` of it is the probability."""
        mask = one_hot(labels, self.config.num_labels, volume.dtype)
        embedded = self.class_embedding(class_labels.long())[:, :, None, None, None].expand(-1, -1, *volume.shape[2:])
        h = self.features(torch.cat([volume, mask, embedded.to(volume.dtype)], dim=1))
        return self.classify(h.flatten(1)).squeeze(1)

    def probability(self, volume: torch.Tensor, labels: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self(volume, labels, class_labels))
