"""The Wan2.1 and Wan2.2 video VAEs: one encoder, one decoder, versions by config.

`WanVAE.encode` follows the reference: video frames go in as [first frame], [next 4], ...;
the encoder turns each chunk into one latent frame; a 1x1x1 conv (`conv1`) gives the mean
and log-variance, and the mean, normalised per channel, is the latent. `decode` applies
`conv2` and decodes one latent frame per call (the first gives 1 video frame, the others
4 each). Wan2.2 folds each 2x2 pixel block into channels around the network.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch import nn

from wan_core.vae.config import VAEConfig
from wan_core.vae.layers import (AttentionBlock, CausalConv3d, Downsample, DownStage, Head, ResidualBlock,
                                 TemporalCache, Upsample, UpStage)
from wan_core.vae.tiling import Canvas, Tiling, check_tiling, nearest_valid, plan_tiles

ProgressCallback = Callable[[int, int], None]
FRAMES_PER_CHUNK = 4  # encoder chunk after the first frame; the temporal stride


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, C*p*p, F, H/p, W/p]; channel index (c, column offset, row offset)."""
    if p == 1:
        return x
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, f, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of `patchify`."""
    if p == 1:
        return x
    b, cpp, f, h, w = x.shape
    x = x.reshape(b, cpp // (p * p), p, p, f, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cpp // (p * p), f, h * p, w * p)


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.dim * m for m in (1, *config.dim_mult)]
        last_stage = len(config.dim_mult) - 1
        self.conv1 = CausalConv3d(3 * config.patch_size ** 2, widths[0], 3)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(widths[:-1], widths[1:])):
            blocks: list[nn.Module] = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim)
                                       for j in range(config.num_res_blocks)]
            temporal = i < last_stage and config.temporal_downsample[i]
            if i < last_stage:
                blocks.append(Downsample(out_dim, temporal))
            if config.residual_stages:
                layers.append(DownStage(blocks, out_dim, frames=2 if temporal else 1,
                                        pixels=2 if i < last_stage else 1))
            else:
                layers.extend(blocks)
        self.downsamples = nn.ModuleList(layers)
        width = widths[-1]
        self.middle = nn.ModuleList([ResidualBlock(width, width), AttentionBlock(width), ResidualBlock(width, width)])
        self.head = Head(width, 2 * config.z_dim)  # mean and log-variance

    def forward(self, x: torch.Tensor, cache: TemporalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        return self.head(x, cache)


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.dec_dim * m for m in (config.dim_mult[-1], *reversed(config.dim_mult))]
        last_stage = len(config.dim_mult) - 1
        self.conv1 = CausalConv3d(config.z_dim, widths[0], 3)
        width = widths[0]
        self.middle = nn.ModuleList([ResidualBlock(width, width), AttentionBlock(width), ResidualBlock(width, width)])
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(widths[:-1], widths[1:])):
            if i > 0 and not config.residual_stages:
                in_dim //= 2  # Wan2.1: the previous stage's up-sampling conv halved the width
            blocks: list[nn.Module] = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim)
                                       for j in range(config.num_res_blocks + 1)]
            temporal = i < last_stage and config.temporal_upsample[i]
            if i < last_stage:
                up_dim = out_dim if config.residual_stages else out_dim // 2
                blocks.append(Upsample(out_dim, up_dim, temporal))
            if config.residual_stages:
                layers.append(UpStage(blocks, out_dim, frames=2 if temporal else 1,
                                      pixels=2 if i < last_stage else 1))
            else:
                layers.extend(blocks)
        self.upsamples = nn.ModuleList(layers)
        self.head = Head(widths[-1], 3 * config.patch_size ** 2)

    def forward(self, x: torch.Tensor, cache: TemporalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        return self.head(x, cache)


class _Progress:
    def __init__(self, callback: Optional[ProgressCallback], total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def step(self) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total)  # may raise to interrupt


class WanVAE(nn.Module):
    """The Wan2.1 or Wan2.2 VAE. Parameter names are the official checkpoint's.

    `encode(video)`: [B, 3, F, H, W] in [-1, 1], F = 4n+1, H and W multiples of the spatial
    stride -> normalised latent [B, z, (F-1)/4+1, H/s, W/s] (float32).
    `decode(latent)`: -> video [B, 3, 4(T-1)+1, H*s, W*s] clamped to [-1, 1] (float32).
    Both take `tile=Tiling(...)` to bound memory and `callback(done, total)`, called after
    each chunk of each tile (raise in it to interrupt).
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.conv1 = nn.Conv3d(2 * config.z_dim, 2 * config.z_dim, 1)  # official quant conv
        self.conv2 = nn.Conv3d(config.z_dim, config.z_dim, 1)  # official post-quant conv
        self.decoder = Decoder(config)

    @property
    def version(self) -> str:
        return self.config.version

    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    @property
    def stride(self) -> tuple[int, int, int]:
        return self.config.stride

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    @property
    def name(self) -> str:
        return f"Wan{self.version} VAE"

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    # ---------------------------------------------------------------------------------- encode

    @torch.no_grad()
    def encode(self, video: torch.Tensor, *, tile: Optional[Tiling] = None,
               callback: Optional[ProgressCallback] = None) -> torch.Tensor:
        x = self._check_video(video)
        if tile is not None:
            check_tiling(tile, self.stride[1], self.name)
        b, _, frames, height, width = x.shape
        s = self.stride[1]
        latent_frames = (frames - 1) // FRAMES_PER_CHUNK + 1
        tiles = plan_tiles((height // s, width // s), tile, s, scale=1)
        progress = _Progress(callback, len(tiles) * latent_frames)
        canvas = Canvas((b, self.z_dim, latent_frames, height // s, width // s), scale=1, device=x.device)
        for rows, columns in tiles:
            pixels = x[:, :, :, rows.start * s:rows.stop * s, columns.start * s:columns.stop * s]
            canvas.add(self._encode_tile(pixels, progress), rows, columns, first_frame=0)
        mean, std = self._latent_stats(canvas.values)
        return (canvas.values - mean) / std

    def _encode_tile(self, x: torch.Tensor, progress: _Progress) -> torch.Tensor:
        """The encoder's mean (before normalisation) of one spatial tile, all frames."""
        x = patchify(x, self.config.patch_size)
        cache = TemporalCache()
        latents = []
        for chunk in _encoder_chunks(x):
            latents.append(self.encoder(chunk, cache))
            cache.next_chunk()
            progress.step()
        return self.conv1(torch.cat(latents, dim=2))[:, :self.z_dim]

    def _check_video(self, video: torch.Tensor) -> torch.Tensor:
        if not isinstance(video, torch.Tensor):
            raise TypeError(f"video must be a torch.Tensor [B, 3, F, H, W] in [-1, 1], got {type(video).__name__}")
        if video.dim() != 5:
            hint = " (add the batch dimension: video[None])" if video.dim() == 4 else ""
            raise ValueError(f"video must be [B, 3, F, H, W]; got shape {tuple(video.shape)}{hint}")
        if not video.is_floating_point():
            raise TypeError(f"video must hold floats in [-1, 1], got dtype {video.dtype}")
        _, channels, frames, height, width = video.shape
        if channels != 3:
            raise ValueError(f"video has {channels} channels in dimension 1; the {self.name} encodes RGB "
                             f"videos [B, 3, F, H, W]")
        if frames < 1 or (frames - 1) % FRAMES_PER_CHUNK:
            raise ValueError(f"video has {frames} frames; the {self.name} encodes 4n+1 frames "
                             f"(1, 5, 9, ...): use {nearest_valid(frames, FRAMES_PER_CHUNK, offset=1)}")
        s = self.stride[1]
        for axis, size in (("height", height), ("width", width)):
            if size < s or size % s:
                raise ValueError(f"video {axis} {size} is not a multiple of {s}, the {self.name}'s spatial "
                                 f"stride: resize or crop to {nearest_valid(size, s)}")
        return video.to(device=self.device, dtype=self.dtype)

    # ---------------------------------------------------------------------------------- decode

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, *, tile: Optional[Tiling] = None,
               callback: Optional[ProgressCallback] = None) -> torch.Tensor:
        z = self._check_latent(latent)
        if tile is not None:
            check_tiling(tile, self.stride[1], self.name)
        mean, std = self._latent_stats(z)
        z = self.conv2(z * std + mean)
        b, _, latent_frames, h, w = z.shape
        s = self.stride[1]
        tiles = plan_tiles((h, w), tile, s, scale=s)
        progress = _Progress(callback, len(tiles) * latent_frames)
        frames = (latent_frames - 1) * self.stride[0] + 1
        canvas = Canvas((b, 3, frames, h * s, w * s), scale=s, device=z.device)
        for rows, columns in tiles:
            cache = TemporalCache()
            first_frame = 0
            for i in range(latent_frames):
                chunk = z[:, :, i:i + 1, rows.start:rows.stop, columns.start:columns.stop]
                video = unpatchify(self.decoder(chunk, cache), self.config.patch_size)
                cache.next_chunk()
                canvas.add(video, rows, columns, first_frame)
                first_frame += video.shape[2]
                progress.step()
        return canvas.values.clamp_(-1.0, 1.0)

    def _check_latent(self, latent: torch.Tensor) -> torch.Tensor:
        if not isinstance(latent, torch.Tensor):
            raise TypeError(f"latent must be a torch.Tensor [B, {self.z_dim}, T, h, w], got {type(latent).__name__}")
        if latent.dim() != 5:
            hint = " (add the batch dimension: latent[None])" if latent.dim() == 4 else ""
            raise ValueError(f"latent must be [B, {self.z_dim}, T, h, w]; got shape {tuple(latent.shape)}{hint}")
        if not latent.is_floating_point():
            raise TypeError(f"latent must hold floats, got dtype {latent.dtype}")
        channels = latent.shape[1]
        if channels != self.z_dim:
            other = {16: "Wan2.1", 48: "Wan2.2"}.get(channels)
            hint = f"; a {channels}-channel latent belongs to the {other} VAE" if other else ""
            raise ValueError(f"latent has {channels} channels but the {self.name} takes {self.z_dim}{hint}")
        if min(latent.shape[2:]) < 1:
            raise ValueError(f"latent has an empty dimension: shape {tuple(latent.shape)}")
        return latent.to(device=self.device, dtype=self.dtype)


def _encoder_chunks(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """The reference's temporal chunks: the first frame alone, then 4 frames at a time."""
    yield x[:, :, :1]
    for start in range(1, x.shape[2], FRAMES_PER_CHUNK):
        yield x[:, :, start:start + FRAMES_PER_CHUNK]
