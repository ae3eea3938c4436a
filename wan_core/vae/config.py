"""The two Wan VAEs as data: widths, strides and the per-channel latent statistics.

Both share the layout of the official `WanVAE_` (dim_mult (1, 2, 4, 4), two residual blocks
per stage, temporal down-sampling in the 2nd and 3rd stages). What differs:

- Wan2.1 (A14B models): 16 latent channels, one width (96) for encoder and decoder, flat
  lists of blocks, decoder up-sampling convolutions halve the width.
- Wan2.2 (TI2V-5B): 48 latent channels, the frame is first folded 2x2 into channels
  ("patchify", 3 -> 12 channels), encoder width 160 and decoder width 256, blocks grouped
  into stages with a parameter-free averaging / duplicating shortcut around each stage.

`latents_mean` / `latents_std` are the reference's constants: `encode` returns
(mu - mean) / std per channel, `decode` undoes it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)


@dataclass(frozen=True)
class VAEConfig:
    version: str                      # "2.1" | "2.2"
    z_dim: int                        # latent channels
    dim: int                          # encoder base width
    dec_dim: int                      # decoder base width
    patch_size: int                   # 2x2 pixel fold before the encoder (1 = none)
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per encoder stage transition

    @property
    def residual_stages(self) -> bool:
        """Wan2.2 groups blocks into stages with a parameter-free shortcut around each."""
        return self.version == "2.2"

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        return tuple(reversed(self.temporal_downsample))

    @property
    def stride(self) -> tuple[int, int, int]:
        """(frames, height, width) pixels per latent position."""
        spatial = 2 ** (len(self.dim_mult) - 1) * self.patch_size
        return 2 ** sum(self.temporal_downsample), spatial, spatial

    def tiny(self, dim: int, dec_dim: int) -> "VAEConfig":
        """The same VAE at small widths (tests): names, strides and latent channels unchanged."""
        return replace(self, dim=dim, dec_dim=dec_dim)


WAN21_VAE = VAEConfig(version="2.1", z_dim=16, dim=96, dec_dim=96, patch_size=1,
                      latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD)
WAN22_VAE = VAEConfig(version="2.2", z_dim=48, dim=160, dec_dim=256, patch_size=2,
                      latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD)
VAE_CONFIGS: dict[str, VAEConfig] = {c.version: c for c in (WAN21_VAE, WAN22_VAE)}
