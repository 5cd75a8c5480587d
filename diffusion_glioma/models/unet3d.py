"""DenoiserUNet3D: the mask-conditioned volumetric denoiser.

diffusers' UNet3DConditionModel is a video model (2D convolutions plus a time axis), so the denoiser
is our own: Conv3d throughout, conditioned as in Med-DDPM by concatenating the one-hot mask (common
label scheme) to the noisy modalities, with the disease class embedded and added to the timestep
embedding (class 0 = "none", which classifier-free guidance uses). Being a diffusers `ModelMixin`
+ `ConfigMixin`, it saves as safetensors + config.json and reloads with `from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.utils import BaseOutput
from einops import rearrange
from torch import nn

from ..labels import COMMON_LABELS
from .conditioning import one_hot
from .wavelet import LOW_PASS_GAIN, haar3d, inverse_haar3d

# Named architectures; the CLI and configs choose among these by name.
PRESETS: dict[str, dict] = {
    # Tests: a few thousand parameters, runs at 16^3 on a CPU in milliseconds.
    "tiny": dict(base_channels=8, channel_multipliers=(1, 2), layers_per_level=1, attention_levels=(False, False),
                 norm_groups=4),
    # CPU demo and the shipped weights: 32^3 volumes, about a second per training step on 2 cores.
    "small": dict(base_channels=16, channel_multipliers=(1, 2, 4), layers_per_level=1,
                  attention_levels=(False, False, True), attention_head_dim=32, norm_groups=8),
    # The shipped demo weights: wavelet space on 2 CPU cores at the phantom's 3 mm grid (64x80x64).
    # Wavelet presets see the mask as its own Haar coefficients, which trained better than block means
    # (docs/benchmarks.md); the shipped weights predate that and keep "mean" in their saved config.
    "demo": dict(base_channels=32, channel_multipliers=(1, 2, 2), layers_per_level=1,
                 attention_levels=(False, False, True), attention_head_dim=32, norm_groups=8, wavelet=True,
                 wavelet_mask="haar"),
    # A mid-size GPU model (96^3 - 128^3 volumes).
    "base": dict(base_channels=32, channel_multipliers=(1, 2, 4, 4), layers_per_level=2,
                 attention_levels=(False, False, True, True), norm_groups=16),
    # The default for real work. Wavelet space (as WDM): Med-DDPM's network without its
    # full-resolution level, run on the 8 Haar coefficients per modality at half size; sides must be
    # divisible by 16. At 4x192x192x144 it trains 5x faster than `medddpm` in a fifth of the memory
    # (docs/benchmarks.md).
    "wavelet": dict(base_channels=64, channel_multipliers=(1, 2, 3, 4), layers_per_level=2,
                    attention_levels=(False, False, False, False), norm_groups=32, wavelet=True,
                    wavelet_mask="haar"),
    # Med-DDPM's BraTS network, like for like: base 64, multipliers 1,1,2,3,4, two residual blocks,
    # attention only in the middle block (its attention_resolutions="16" at 192 matches no level).
    "medddpm": dict(base_channels=64, channel_multipliers=(1, 1, 2, 3, 4), layers_per_level=2,
                    attention_levels=(False, False, False, False, False), norm_groups=32),
}


@dataclass
class DenoiserOutput(BaseOutput):
    sample: torch.Tensor


class GroupNorm(nn.GroupNorm):
    """GroupNorm whose output keeps the input's dtype. Autocast computes group_norm in fp32 and
    would hand fp32 activations to the next layer, doubling what is stored for backward in bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).to(x.dtype)


class ResBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.embedding = nn.Linear(embedding_dim, 2 * out_channels)  # scale and shift
        self.norm2 = GroupNorm(groups, out_channels)
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
    """Self-attention over all voxels of a (coarse) level, through PyTorch's fused attention kernels.

    The fused kernels (flash, memory-efficient, cuDNN) need q, k and v with a contiguous head
    dimension; a 1x1x1 convolution's output has the voxels innermost instead, and SDPA would fall back
    to the math kernel that builds the whole score matrix. So the projections run as matrix products
    over tokens (the weights stay 1x1x1 convolutions, as saved models have them).
    """

    def __init__(self, channels: int, head_dim: int, groups: int):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = GroupNorm(groups, channels)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.out = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *size = x.shape
        tokens = rearrange(self.norm(x), "b c x y z -> b (x y z) c")
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)  # d stays innermost
        h = F.scaled_dot_product_attention(q, k, v)
        h = F.linear(rearrange(h, "b h n d -> b n (h d)"), self.out.weight.flatten(1), self.out.bias)
        return x + rearrange(h, "b (x y z) c -> b c x y z", x=size[0], y=size[1], z=size[2])


class Level(nn.Module):
    """Residual blocks (each followed by attention where configured) at one resolution."""

    def __init__(self, channels_in: list[int], channels_out: int, embedding_dim: int, attention: bool,
                 head_dim: int, groups: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock3D(c, channels_out, embedding_dim, groups, dropout) for c in channels_in)
        self.attentions = nn.ModuleList(
            Attention3D(channels_out, head_dim, groups) if attention else nn.Identity() for _ in channels_in)


def _block_then_attention(block: ResBlock3D, attention: nn.Module, h: torch.Tensor,
                          embedding: torch.Tensor) -> torch.Tensor:
    return attention(block(h, embedding))


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
        wavelet: diffuse in 3D Haar wavelet space: the network sees the 8 coefficients of every
            2x2x2 block of each modality (8x the channels at half the size per axis), which makes a
            volume of a given size roughly 8x cheaper (models/wavelet.py). `encode`/`decode` move
            between volumes and the space the model diffuses in; for pixel models they do nothing.
        wavelet_mask: how a wavelet model sees the mask on its half-size grid: "mean" (the one-hot
            mask averaged over each 2x2x2 block: label fractions) or "haar" (the one-hot mask's own
            8 Haar coefficients per label, which keep where inside the block each label lies).
        wavelet_band_scale: the standard deviation of each of the 8 Haar bands on the training data
            (training measures it); `encode` divides by it so that every band meets the unit-variance
            noise on equal terms (raw detail bands are 10-20x smaller than the low-pass band, and a
            model then samples noise in them). None: raw coefficients (models trained before this).
        skip_sigma_data: for x0-prediction, EDM's preconditioning (Karras et al. 2022) at this data
            sd: the network's output is EDM's F, and the x0 estimate is c_skip * x + c_out * F
            (`diffusion_glioma.pipeline.skip_coefficients`), so that at low noise the network corrects
            its input instead of redrawing it. None: the output is the x0 estimate itself.
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
        wavelet: bool = False,
        wavelet_mask: str = "mean",
        wavelet_band_scale: tuple[float, ...] | None = None,
        skip_sigma_data: float | None = None,
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
        if wavelet_mask not in ("mean", "haar"):
            raise ValueError(f"wavelet_mask must be 'mean' or 'haar', got {wavelet_mask!r}")
        if wavelet_band_scale is not None and (not wavelet or len(wavelet_band_scale) != 8
                                               or min(wavelet_band_scale) <= 0):
            raise ValueError(f"wavelet_band_scale must be 8 positive values for a wavelet model, got {wavelet_band_scale}")
        if skip_sigma_data is not None and not skip_sigma_data > 0:
            raise ValueError(f"skip_sigma_data must be positive, got {skip_sigma_data}")
        if len(set(disease_classes)) != len(disease_classes):
            raise ValueError(f"disease_classes must be distinct, got {list(disease_classes)}")

        embedding_dim = 4 * base_channels
        # 1. Timestep and disease-class embeddings (summed).
        self.time_proj = Timesteps(base_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(base_channels, embedding_dim)
        self.class_embedding = nn.Embedding(len(disease_classes), embedding_dim)

        # 2. Encoder: the noisy modalities (or their wavelet coefficients) and the mask, concatenated.
        self.data_channels = len(modalities) * (8 if wavelet else 1)
        mask_channels = num_labels * (8 if wavelet and wavelet_mask == "haar" else 1)
        self.conv_in = nn.Conv3d(self.data_channels + mask_channels, base_channels, 3, padding=1)
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
        self.norm_out = GroupNorm(norm_groups, width)
        self.conv_out = nn.Conv3d(width, self.data_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.gradient_checkpointing = False

    @property
    def downsampling_factor(self) -> int:
        """What every side of a volume must be divisible by."""
        return 2 ** (len(self.config.channel_multipliers) - 1) * (2 if self.config.wavelet else 1)

    @property
    def value_range(self) -> float:
        """Data in [-1, 1] lies in [-value_range, value_range] in the space the model diffuses in."""
        return LOW_PASS_GAIN if self.config.wavelet else 1.0

    def _band_scale(self, like: torch.Tensor) -> torch.Tensor | None:
        scale = self.config.wavelet_band_scale
        if not self.config.wavelet or scale is None:
            return None
        per_channel = torch.tensor(scale, dtype=like.dtype, device=like.device).repeat(len(self.config.modalities))
        return per_channel.view(1, -1, 1, 1, 1)  # channel 8 m + k is band k of modality m

    def encode(self, volumes: torch.Tensor) -> torch.Tensor:
        """(b, modalities, X, Y, Z) volumes -> the space the model diffuses in."""
        if not self.config.wavelet:
            return volumes
        coefficients = haar3d(volumes)
        scale = self._band_scale(coefficients)
        return coefficients if scale is None else coefficients / scale

    def decode(self, sample: torch.Tensor) -> torch.Tensor:
        """The inverse of `encode`."""
        if not self.config.wavelet:
            return sample
        scale = self._band_scale(sample)
        return inverse_haar3d(sample if scale is None else sample * scale)

    def project_to_data(self, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """An x0 estimate made a possible volume: clipped to [-1, 1] in image space (every band
        alike, whatever its scale) and -1 outside the head, which the mask fixes."""
        volumes = self.decode(x0.float()).clamp(-1.0, 1.0)
        volumes = torch.where(labels[:, None] == 0, torch.full_like(volumes, -1.0), volumes)
        return self.encode(volumes).to(x0.dtype)

    def sample_shape(self, batch: int, volume_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the diffused tensor for volumes of `volume_shape` (x, y, z)."""
        divisor = 2 if self.config.wavelet else 1
        return (batch, self.data_channels, *(s // divisor for s in volume_shape))

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """(b, x, y, z) integer labels -> (b, num_labels, x, y, z) one-hot in the model's dtype."""
        return one_hot(labels, self.config.num_labels, self.dtype)

    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        """(b, X, Y, Z) integer masks on the volume grid -> the conditioning channels on the model's
        grid. Done on the device inside the step (the data loader ships uint8 labels); the pipeline
        computes it once per sampling run and passes it to every step."""
        mask = self.one_hot(labels)
        if not self.config.wavelet:
            return mask
        mask = mask.float()  # pooling has no CPU bf16 kernel; the result is cast back
        mask = haar3d(mask) if self.config.wavelet_mask == "haar" else F.avg_pool3d(mask, 2)
        return mask.to(self.dtype)

    def _run(self, block, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def _run_level_block(self, block, attention, h, embedding):
        if isinstance(attention, nn.Identity):
            return self._run(block, h, embedding)
        # Attention inside the checkpoint too: its activations are the largest of a coarse level.
        return self._run(partial(_block_then_attention, block, attention), h, embedding)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, labels: torch.Tensor,
                class_labels: torch.Tensor | None = None, return_dict: bool = True):
        """
        Args:
            sample: (b, channels, x, y, z) noisy tensor in the space the model diffuses in
                (`sample_shape`: the modalities, or their wavelet coefficients at half size).
            timestep: scalar or (b,) diffusion timesteps.
            labels: (b, X, Y, Z) integer masks in the common scheme on the volume grid, or their
                `condition(labels)` computed beforehand.
            class_labels: (b,) disease indices; None means class 0 ("none").
        """
        b = sample.shape[0]
        factor = 2 ** (len(self.config.channel_multipliers) - 1)
        if any(s % factor for s in sample.shape[2:]):
            raise ValueError(f"volume shape must be divisible by {self.downsampling_factor} "
                             f"({len(self.config.channel_multipliers)} levels"
                             f"{', wavelet space' if self.config.wavelet else ''}); got the model input "
                             f"{tuple(sample.shape[2:])}")
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
        mask = labels if labels.is_floating_point() else self.condition(labels)
        if mask.shape[2:] != sample.shape[2:]:
            raise ValueError(f"the mask's condition has grid {tuple(mask.shape[2:])} but the sample "
                             f"{tuple(sample.shape[2:])}")
        h = self.conv_in(torch.cat([sample.to(self.dtype), mask.to(self.dtype)], dim=1))

        # 3. Down.
        skips = [h]
        for level, downsample in zip(self.down_levels, self.downsamplers):
            for block, attention in zip(level.blocks, level.attentions):
                h = self._run_level_block(block, attention, h, embedding)
                skips.append(h)
            if not isinstance(downsample, nn.Identity):
                h = downsample(h)
                skips.append(h)

        # 4. Middle.
        h = self._run_level_block(self.mid_block1, self.mid_attention, h, embedding)
        h = self._run(self.mid_block2, h, embedding)

        # 5. Up.
        for level, upsample in zip(self.up_levels, self.upsamplers):
            for block, attention in zip(level.blocks, level.attentions):
                h = self._run_level_block(block, attention, torch.cat([h, skips.pop()], dim=1), embedding)
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
