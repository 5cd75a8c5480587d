"""The GAN baselines: the diffusion model is judged against them, so they are real ones.

Generator: a noise vector and the condition (one-hot mask in the common scheme, disease class
through a label embedding) -> transposed-convolution upsampling -> every modality, tanh. Noise is
also injected at every resolution, so samples for one mask vary. Discriminator: strided 3D
convolutions with LeakyReLU and dropout judging (volume, mask, class), ending in a sigmoid (the
training loss uses the logit form of binary cross-entropy, which is the same loss computed stably).
Both are diffusers `ModelMixin` + `ConfigMixin`: safetensors + config.json, `from_pretrained`.

The pix2pix-style baseline (`gan.kind: pix2pix`) keeps the generator and judges with
`PatchDiscriminator`: spectral-normalised strided convolutions ending in a map of logits, one per
overlapping patch (Isola et al. 2017; Miyato et al. 2018), trained with an L1 term toward the real
volume. Both discriminators are a list of `blocks`, so few-shot adaptation can freeze the first
ones (FreezeD, Mo et al. 2020).
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


class _ConditionedDiscriminator(ModelMixin, ConfigMixin):
    """What both discriminators share: (volume, one-hot mask, class embedding) through `blocks`."""

    def _condition(self, volume: torch.Tensor, labels: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        mask = one_hot(labels, self.config.num_labels, volume.dtype)
        embedded = self.class_embedding(class_labels.long())[:, :, None, None, None].expand(-1, -1, *volume.shape[2:])
        h = torch.cat([volume, mask, embedded.to(volume.dtype)], dim=1)
        for block in self.blocks:
            h = block(h)
        return h

    def probability(self, volume: torch.Tensor, labels: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self(volume, labels, class_labels))


def _blocks(in_channels: int, base_channels: int, levels: int, make) -> tuple[nn.ModuleList, int]:
    blocks, channels = [], in_channels
    for i in range(levels):
        blocks.append(make(channels, base_channels * 2 ** i))
        channels = base_channels * 2 ** i
    return nn.ModuleList(blocks), channels


class CGANDiscriminator(_ConditionedDiscriminator):
    """The proposal's discriminator: strided convolutions with dropout, one logit per volume."""

    @register_to_config
    def __init__(self, modalities: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f"), num_labels: int = len(COMMON_LABELS),
                 disease_classes: tuple[str, ...] = ("none", "glioblastoma", "pediatric_diffuse_glioma"),
                 volume_shape: tuple[int, int, int] = (32, 32, 32), base_channels: int = 32, levels: int = 3,
                 dropout: float = 0.3, embedding_dim: int = 4):
        super().__init__()
        self.class_embedding = nn.Embedding(len(disease_classes), embedding_dim)
        block = lambda i, o: nn.Sequential(nn.Conv3d(i, o, 4, stride=2, padding=1), nn.LeakyReLU(0.2),  # noqa: E731
                                           nn.Dropout3d(dropout))
        self.blocks, channels = _blocks(len(modalities) + num_labels + embedding_dim, base_channels, levels, block)
        coarse = [s // 2 ** levels for s in volume_shape]
        self.classify = nn.Linear(channels * coarse[0] * coarse[1] * coarse[2], 1)

    def forward(self, volume: torch.Tensor, labels: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """The logit of "real" for each (volume, mask, class); `torch.sigmoid` of it is the probability."""
        return self.classify(self._condition(volume, labels, class_labels).flatten(1)).squeeze(1)


class PatchDiscriminator(_ConditionedDiscriminator):
    """pix2pix's PatchGAN in 3D with spectral normalisation: a logit per overlapping patch of
    (volume, mask, class) instead of one per volume, so it judges local texture everywhere; the
    receptive field of each logit grows with `levels` (3 levels: 46 voxels)."""

    @register_to_config
    def __init__(self, modalities: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f"), num_labels: int = len(COMMON_LABELS),
                 disease_classes: tuple[str, ...] = ("none", "glioblastoma", "pediatric_diffuse_glioma"),
                 volume_shape: tuple[int, int, int] = (32, 32, 32), base_channels: int = 32, levels: int = 3,
                 dropout: float = 0.0, embedding_dim: int = 4):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.class_embedding = nn.Embedding(len(disease_classes), embedding_dim)
        block = lambda i, o: nn.Sequential(sn(nn.Conv3d(i, o, 4, stride=2, padding=1)), nn.LeakyReLU(0.2))  # noqa: E731
        self.blocks, channels = _blocks(len(modalities) + num_labels + embedding_dim, base_channels, levels, block)
        self.classify = sn(nn.Conv3d(channels, 1, 3, padding=1))  # the patch logits

    def forward(self, volume: torch.Tensor, labels: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """(b, 1, x / 2**levels, y / 2**levels, z / 2**levels) logits of "real", one per patch."""
        return self.classify(self._condition(volume, labels, class_labels))


DISCRIMINATORS = {"bce": CGANDiscriminator, "pix2pix": PatchDiscriminator}
