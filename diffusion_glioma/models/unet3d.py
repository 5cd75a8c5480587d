"""DenoiserUNet3D: the mask-conditioned volumetric denoiser.

diffusers' UNet3DConditionModel is a video model (2D convolutions plus a time axis), so the denoiser
is our own: Conv3d throughout, conditioned as in Med-DDPM by concatenating the one-hot mask (common
label scheme) to the noisy modalities, with the disease class embedded and added to the timestep
embedding (class 0 = "none", which classifier-free guidance uses). Being a diffusers `ModelMixin`
+ `ConfigMixin`, it saves as safetensors + config.json and reloads with `from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.utils import BaseOutput
from einops import rearrange
from torch import nn

from ..labels import COMMON_LABELS

# Named architectures; the CLI and configs choose among these by name.
PRESETS: dict[str, dict] = {
    # Tests: a few thousand parameters, runs at 16^3 on a CPU in milliseconds.
    "tiny": dict(base_channels=8, channel_multipliers=(1, 2), layers_per_level=1, attention_levels=(False, False),
                 norm_groups=4),
    # CPU demo and the shipped weights: 32^3 volumes, about a second per training step on 2 cores.
    "small": dict(base_channels=16, channel_multipliers=(1, 2, 4), layers_per_level=1,
                  attention_levels=(False, False, True), attention_head_dim=32, norm_groups=8),
    # A mid-size GPU model (96^3 - 128^3 volumes).
    "base": dict(base_channels=32, channel_multipliers=(1, 2, 4, 4), layers_per_level=2,
                 attention_levels=(False, False, True, True), norm_groups=16),
    # Med-DDPM's BraTS network, for like-for-like comparison (base 64, multipliers 1,1,2,3,4, two
    # residual blocks, attention at 1/8 resolution).
    "medddpm": dict(base_channels=64, channel_multipliers=(1, 1, 2, 3, 4), layers_per_level=2,
                    attention_levels=(False, False, False, True, False), norm_groups=32),
}


@dataclass
class DenoiserOutput(BaseOutput):
    sample: torch.Tensor


class ResBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.embedding = nn.Linear(embedding_dim, 2 * out_channels)  # scale and shift
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.embedding(F.silu(embedding))[:, :, None, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention3D(nn.Module):
    """Self-attention over all voxels of a (coarse) level, through PyTorch's fused attention kernels."""

    def __init__(self, channels: int, head_dim: int, groups: int):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.out = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *size = x.shape
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three h d) x y z -> three b h (x y z) d",
                            three=3, h=self.heads)
        h = F.scaled_dot_product_attention(q, k, v)
        h = rearrange(h, "b h (x y z) d -> b (h d) x y z", x=size[0], y=size[1], z=size[2])
        return x + self.out(h)


class Level(nn.Module):
    """Residual blocks (each followed by attention where configured) at one resolution."""

    def __init__(self, channels_in: list[int], channels_out: int, embedding_dim: int, attention: bool,
                 head_dim: int, groups: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock3D(c, channels_out, embedding_dim, groups, dropout) for c in channels_in)
        self.attentions = nn.ModuleList(
            Attention3D(channels_out, head_dim, groups) if attention else nn.Identity() for _ in channels_in)


class DenoiserUNet3D(ModelMixin, ConfigMixin):
    """Predicts noise (or v, or x0) for every modality from the noisy volume, the mask and the class.

    Args:
        modalities: names of the modalities produced, in channel order.
        num_labels: one-hot channels of the mask (the common label scheme).
        disease_classes: class names; index 0 must be "none" (unconditional, for guidance).
        base_channels, channel_multipliers: width of each resolution level.
        layers_per_level: residual blocks per level on the way down (one more on the way up).
        attention_levels: per level, whether its blocks are followed by self-attention.
        attention_head_dim: channels per attention head.
        norm_groups: GroupNorm groups (must divide every level's width).
        dropout: dropout inside residual blocks.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        modalities: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f"),
        num_labels: int = len(COMMON_LABELS),
        disease_classes: tuple[str, ...] = ("none", "glioblastoma", "pediatric_diffuse_glioma"),
        base_channels: int = 32,
        channel_multipliers: tuple[int, ...] = (1, 2, 4),
        layers_per_level: int = 1,
        attention_levels: tuple[bool, ...] = (False, False, True),
        attention_head_dim: int = 32,
        norm_groups: int = 8,
        dropout: float = 0.0,
    ):
        super().__init__()
        # Checks up front, with the values, so a bad config fails before any allocation.
        if len(attention_levels) != len(channel_multipliers):
            raise ValueError(f"attention_levels ({len(attention_levels)}) must have one entry per level of "
                             f"channel_multipliers ({len(channel_multipliers)})")
        widths = [base_channels * m for m in channel_multipliers]
        if any(w % norm_groups for w in [base_channels, *widths]):
            raise ValueError(f"norm_groups={norm_groups} must divide every level width {widths}")
        if not disease_classes or disease_classes[0] != "none":
            raise ValueError(f"disease_classes must start with 'none' (unconditional), got {list(disease_classes)}")
        if len(set(disease_classes)) != len(disease_classes):
            raise ValueError(f"disease_classes must be distinct, got {list(disease_classes)}")

        embedding_dim = 4 * base_channels
        # 1. Timestep and disease-class embeddings (summed).
        self.time_proj = Timesteps(base_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(base_channels, embedding_dim)
        self.class_embedding = nn.Embedding(len(disease_classes), embedding_dim)

        # 2. Encoder: the noisy modalities and the one-hot mask, concatenated.
        self.conv_in = nn.Conv3d(len(modalities) + num_labels, base_channels, 3, padding=1)
        skips = [base_channels]
        self.down_levels = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        width = base_channels
        for level, out_width in enumerate(widths):
            inputs = [width] + [out_width] * (layers_per_level - 1)
            self.down_levels.append(Level(inputs, out_width, embedding_dim, attention_levels[level],
                                          attention_head_dim, norm_groups, dropout))
            width = out_width
            skips += [width] * layers_per_level
            last = level == len(widths) - 1
            self.downsamplers.append(nn.Identity() if last else nn.Conv3d(width, width, 3, stride=2, padding=1))
            if not last:
                skips.append(width)

        # 3. Middle.
        self.mid_block1 = ResBlock3D(width, width, embedding_dim, norm_groups, dropout)
        self.mid_attention = Attention3D(width, attention_head_dim, norm_groups)
        self.mid_block2 = ResBlock3D(width, width, embedding_dim, norm_groups, dropout)

        # 4. Decoder, taking the encoder's skips in reverse.
        self.up_levels = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level in reversed(range(len(widths))):
            out_width = widths[level]
            inputs = []
            for _ in range(layers_per_level + 1):
                inputs.append(width + skips.pop())
                width = out_width
            self.up_levels.append(Level(inputs, out_width, embedding_dim, attention_levels[level],
                                        attention_head_dim, norm_groups, dropout))
            self.upsamplers.append(nn.Conv3d(width, width, 3, padding=1) if level > 0 else nn.Identity())

        # 5. Output: one channel per modality, zero-initialised so training starts from "predict 0".
        self.norm_out = nn.GroupNorm(norm_groups, width)
        self.conv_out = nn.Conv3d(width, len(modalities), 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.gradient_checkpointing = False

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config.channel_multipliers) - 1)

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """(b, x, y, z) integer labels -> (b, num_labels, x, y, z) float one-hot."""
        return F.one_hot(labels.long(), self.config.num_labels).permute(0, 4, 1, 2, 3).to(self.dtype)

    def _run(self, block, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, labels: torch.Tensor,
                class_labels: torch.Tensor | None = None, return_dict: bool = True):
        """
        Args:
            sample: (b, modalities, x, y, z) noisy volume.
            timestep: scalar or (b,) diffusion timesteps.
            labels: (b, x, y, z) integer mask in the common scheme, or an already one-hot (b, L, x, y, z).
            class_labels: (b,) disease indices; None means class 0 ("none").
        """
        b = sample.shape[0]
        factor = self.downsampling_factor
        if any(s % factor for s in sample.shape[2:]):
            raise ValueError(f"volume shape {tuple(sample.shape[2:])} must be divisible by {factor} "
                             f"({len(self.config.channel_multipliers)} levels)")
        # 1. Embeddings.
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.expand(b)
        embedding = self.time_embedding(self.time_proj(timesteps).to(self.dtype))
        if class_labels is None:
            class_labels = torch.zeros(b, dtype=torch.long, device=sample.device)
        embedding = embedding + self.class_embedding(class_labels.long())

        # 2. Conditioning by concatenation.
        mask = labels if labels.ndim == 5 else self.one_hot(labels)
        h = self.conv_in(torch.cat([sample.to(self.dtype), mask.to(self.dtype)], dim=1))

        # 3. Down.
        skips = [h]
        for level, downsample in zip(self.down_levels, self.downsamplers):
            for block, attention in zip(level.blocks, level.attentions):
                h = self._run(block, h, embedding)
                h = attention(h)
                skips.append(h)
            if not isinstance(downsample, nn.Identity):
                h = downsample(h)
                skips.append(h)

        # 4. Middle.
        h = self._run(self.mid_block1, h, embedding)
        h = self.mid_attention(h)
        h = self._run(self.mid_block2, h, embedding)

        # 5. Up.
        for level, upsample in zip(self.up_levels, self.upsamplers):
            for block, attention in zip(level.blocks, level.attentions):
                h = self._run(block, torch.cat([h, skips.pop()], dim=1), embedding)
                h = attention(h)
            if not isinstance(upsample, nn.Identity):
                h = upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))

        # 6. Output.
        out = self.conv_out(F.silu(self.norm_out(h)))
        if not return_dict:
            return (out,)
        return DenoiserOutput(sample=out)


def build_denoiser(preset: str = "small", **overrides) -> DenoiserUNet3D:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return DenoiserUNet3D(**{**PRESETS[preset], **overrides})
