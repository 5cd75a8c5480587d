"""The mask-conditioned 3D VAE baseline (the proposal's VAE generator).

Encoder: (volume, one-hot mask, class embedding) -> strided convolutions -> the mean and log-variance
of a latent vector. Decoder: `CGANGenerator` with the latent vector as its "noise": the mask enters
at every resolution, so the pipeline that samples the GAN (`CGANPipeline`) samples the VAE too,
drawing the latent from the prior N(0, I).

With `healthy_only`, the VAE is the anomaly model: conditioned on the head alone (tumour labels
read as head) and trained on healthy tissue only, so its reconstruction error is large where a
tumour is (evaluation/anomaly.py).
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ..labels import COMMON_LABELS, HEAD
from .conditioning import one_hot


def healthy_labels(labels: torch.Tensor) -> torch.Tensor:
    """Every tumour label read as head: what an anomaly model is conditioned on."""
    return torch.where(labels > HEAD, torch.full_like(labels, HEAD), labels)


class VAEEncoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, modalities: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f"), num_labels: int = len(COMMON_LABELS),
                 disease_classes: tuple[str, ...] = ("none", "glioblastoma", "pediatric_diffuse_glioma"),
                 volume_shape: tuple[int, int, int] = (32, 32, 32), latent_dim: int = 64, base_channels: int = 32,
                 levels: int = 3, embedding_dim: int = 4):
        super().__init__()
        self.class_embedding = nn.Embedding(len(disease_classes), embedding_dim)
        channels, layers = len(modalities) + num_labels + embedding_dim, []
        for i in range(levels):
            out_channels = base_channels * 2 ** i
            layers += [nn.Conv3d(channels, out_channels, 4, stride=2, padding=1),
                       nn.GroupNorm(min(8, out_channels), out_channels), nn.LeakyReLU(0.2)]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        coarse = [s // 2 ** levels for s in volume_shape]
        self.to_latent = nn.Linear(channels * coarse[0] * coarse[1] * coarse[2], 2 * latent_dim)

    def forward(self, volume: torch.Tensor, labels: torch.Tensor,
                class_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance) of q(z | volume, mask, class), each (b, latent_dim)."""
        mask = one_hot(labels, self.config.num_labels, volume.dtype)
        embedded = self.class_embedding(class_labels.long())[:, :, None, None, None].expand(-1, -1, *volume.shape[2:])
        h = self.features(torch.cat([volume, mask, embedded.to(volume.dtype)], dim=1))
        mean, log_variance = self.to_latent(h.flatten(1)).chunk(2, dim=1)
        return mean, log_variance.clamp(-10, 10)


def kl_divergence(mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per volume, summed over the latent dimensions, averaged over the batch."""
    return 0.5 * (mean.pow(2) + log_variance.exp() - 1 - log_variance).sum(dim=1).mean()
