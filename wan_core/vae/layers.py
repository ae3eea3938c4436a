"""Building blocks of the Wan VAEs, fed one temporal chunk at a time.

The reference never runs a whole video through the network at once: the encoder takes the
first frame alone and then 4 frames per call, the decoder one latent frame per call. Layers
that look at past frames keep what they need from earlier calls in a `TemporalCache`, so a
video is processed in constant memory along time. Every layer takes `(x, cache)`.

Module and parameter names follow the official checkpoints (`residual.0.gamma`,
`resample.1.weight`, `time_conv.weight`, ...), so official state dicts load as they are.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class TemporalCache:
    """The frames each causal layer remembers from earlier chunks of one pass over a video.

    `first_chunk` is True during the first call; the temporal up- and down-samplers treat
    the first frame specially (it is never mixed with the frames after it).
    """

    def __init__(self) -> None:
        self._frames: dict[nn.Module, torch.Tensor] = {}
        self.first_chunk = True

    def get(self, layer: nn.Module) -> Optional[torch.Tensor]:
        return self._frames.get(layer)

    def put(self, layer: nn.Module, frames: torch.Tensor) -> None:
        self._frames[layer] = frames

    def next_chunk(self) -> None:
        self.first_chunk = False


class CausalConv3d(nn.Conv3d):
    """A 3-D convolution whose output frame t sees input frames t-k+1 .. t only.

    The k-1 frames before the first one are zeros. Fed chunk by chunk, it prepends the last
    k-1 input frames it saw (kept in the cache), which gives exactly the result of running
    the whole video at once. Height and width are zero-padded to keep their size.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int | tuple[int, int, int]) -> None:
        k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__(in_dim, out_dim, k, padding=(0, k[1] // 2, k[2] // 2))
        self.past_frames = k[0] - 1

    def forward(self, x: torch.Tensor, cache: TemporalCache) -> torch.Tensor:
        if self.past_frames:
            past = cache.get(self)
            stream = x if past is None else torch.cat([past, x], dim=2)
            cache.put(self, stream[:, :, -self.past_frames:].clone())
            zeros_in_front = self.past_frames - (stream.shape[2] - x.shape[2])
            x = F.pad(stream, (0, 0, 0, 0, zeros_in_front, 0)) if zeros_in_front else stream
        return super().forward(x)


class RMSNorm(nn.Module):
    """Scales each position's channel vector to length sqrt(dim), then by a learned gain."""

    def __init__(self, dim: int, *, image: bool = False) -> None:
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if image else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 when the activations are half precision (the sum of squares overflows)
        unit = F.normalize(x.float() if x.element_size() < 4 else x, dim=1).to(x.dtype)
        return unit.mul_(self.scale).mul_(self.gamma)  # in place: full-resolution tensors are large


def _frames_as_batch(x: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _batch_as_frames(x: torch.Tensor, batch: int) -> torch.Tensor:
    bt, c, h, w = x.shape
    return x.reshape(batch, bt // batch, c, h, w).transpose(1, 2)


class ResidualBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1x1 projection when widths differ."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # keys: the positions these layers have in the official nn.Sequential
        # (norm, SiLU, conv, norm, SiLU, dropout, conv)
        self.residual = nn.ModuleDict({
            "0": RMSNorm(in_dim), "2": CausalConv3d(in_dim, out_dim, 3),
            "3": RMSNorm(out_dim), "6": CausalConv3d(out_dim, out_dim, 3),
        })
        self.shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: TemporalCache) -> torch.Tensor:
        r = self.residual
        h = r["2"](F.silu(r["0"](x), inplace=True), cache)
        h = r["6"](F.silu(r["3"](h), inplace=True), cache)
        return h + self.shortcut(x)


class Head(nn.ModuleDict):
    """The output layers: norm, SiLU, causal conv (official names head.0 and head.2)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__({"0": RMSNorm(in_dim), "2": CausalConv3d(in_dim, out_dim, 3)})

    def forward(self, x: torch.Tensor, cache: TemporalCache) -> torch.Tensor:
        return self["2"](F.silu(self["0"](x), inplace=True), cache)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (frames do not see each other)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, image=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: TemporalCache) -> torch.Tensor:  # noqa: ARG002 - per frame, no past
        b, c, t, h, w = x.shape
        y = self.norm(_frames_as_batch(x))
        q, k, v = self.to_qkv(y).reshape(b * t, 3, c, h * w).transpose(-1, -2).unsqueeze(1).unbind(2)
        y = F.scaled_dot_product_attention(q, k, v)  # [b*t, 1, h*w, c]
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + _batch_as_frames(y, b)


class Downsample(nn.Module):
    """Halves height and width (zero-pad right/bottom, 3x3 conv with stride 2) and, when
    `temporal`, the frame count: a kernel-3 stride-2 conv over [last frame of the previous
    chunk, this chunk]. The first frame of the video passes the temporal step unchanged."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.ModuleDict({"1": nn.Conv2d(dim, dim, 3, stride=2)})  # official resample.1
        self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: TemporalCache) -> torch.Tensor:
        y = self.resample["1"](F.pad(_frames_as_batch(x), (0, 1, 0, 1)))
        x = _batch_as_frames(y, x.shape[0])
        if self.time_conv is None:
            return x
        previous = cache.get(self)
        cache.put(self, x[:, :, -1:].clone())
        return x if previous is None else self.time_conv(torch.cat([previous, x], dim=2))


class Upsample(nn.Module):
    """Doubles height and width (nearest, then a 3x3 conv to `out_dim` channels) and, when
    `temporal`, the frame count: a causal conv makes two output frames per input frame. The
    first chunk is not doubled (one latent frame decodes to one first video frame), and it is
    not part of the temporal conv's past either: that stream starts with the second chunk."""

    def __init__(self, dim: int, out_dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.ModuleDict({"1": nn.Conv2d(dim, out_dim, 3, padding=1)})  # official resample.1
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: TemporalCache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.time_conv is not None and not cache.first_chunk:
            pairs = self.time_conv(x, cache).reshape(b, 2, c, t, h, w)
            x = pairs.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)  # frame 2i from the first half
        y = _frames_as_batch(x)
        # nearest-neighbour in float32: bfloat16 is not supported by every back-end
        y = F.interpolate(y.float(), scale_factor=2.0, mode="nearest-exact").to(y.dtype)
        return _batch_as_frames(self.resample["1"](y), b)


def fold_average(x: torch.Tensor, out_dim: int, frames: int, pixels: int) -> torch.Tensor:
    """Shortcut around a Wan2.2 encoder stage, without weights: fold `frames` x `pixels` x
    `pixels` neighbourhoods into channels, then average consecutive channel groups down to
    `out_dim`. The frame count is zero-padded at the front to a multiple of `frames`."""
    x = F.pad(x, (0, 0, 0, 0, -x.shape[2] % frames, 0))
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // frames, frames, h // pixels, pixels, w // pixels, pixels)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # channel index: (c, frame, row, column)
    return x.reshape(b, out_dim, -1, t // frames, h // pixels, w // pixels).mean(dim=2)


def unfold_repeat(x: torch.Tensor, out_dim: int, frames: int, pixels: int, first_chunk: bool) -> torch.Tensor:
    """Shortcut around a Wan2.2 decoder stage, the inverse of `fold_average`: repeat each
    channel, then unfold channel groups into `frames` x `pixels` x `pixels` neighbourhoods.
    On the first chunk only the last of the new frames is kept (one frame in, one out)."""
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(out_dim * frames * pixels * pixels // c, dim=1)
    x = x.reshape(b, out_dim, frames, pixels, pixels, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, out_dim, t * frames, h * pixels, w * pixels)
    return x[:, :, frames - 1:] if first_chunk else x


class DownStage(nn.Module):
    """A Wan2.2 encoder stage (official Down_ResidualBlock): residual blocks and an optional
    `Downsample`, plus the `fold_average` shortcut."""

    def __init__(self, blocks: list[nn.Module], out_dim: int, frames: int, pixels: int) -> None:
        super().__init__()
        self.downsamples = nn.ModuleList(blocks)
        self.out_dim, self.frames, self.pixels = out_dim, frames, pixels

    def forward(self, x: torch.Tensor, cache: TemporalCache) -> torch.Tensor:
        y = x
        for layer in self.downsamples:
            y = layer(y, cache)
        return y + fold_average(x, self.out_dim, self.frames, self.pixels)


class UpStage(nn.Module):
    """A Wan2.2 decoder stage (official Up_ResidualBlock): residual blocks and an optional
    `Upsample`; stages that up-sample add the `unfold_repeat` shortcut."""

    def __init__(self, blocks: list[nn.Module], out_dim: int, frames: int, pixels: int) -> None:
        super().__init__()
        self.upsamples = nn.ModuleList(blocks)
        self.out_dim, self.frames, self.pixels = out_dim, frames, pixels

    def forward(self, x: torch.Tensor, cache: TemporalCache) -> torch.Tensor:
        y = x
        for layer in self.upsamples:
            y = layer(y, cache)
        if self.pixels == 1:
            return y
        return y + unfold_repeat(x, self.out_dim, self.frames, self.pixels, cache.first_chunk)
