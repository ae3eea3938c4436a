"""Spatial tiling: encode or decode a video in overlapping tiles and blend them.

A tile runs through the whole network for all frames (with its own temporal cache), so the
peak memory follows the tile size, not the frame size. Where tiles overlap, their outputs
are mixed with linear ramps: a tile's weight rises from the edge it shares with a neighbour
to 1 over the shared width, and the weights of all tiles covering a pixel sum to 1. Pixels
at the frame's border keep full weight (both the tiled and untiled networks zero-pad there).

Tiles are spread evenly so the last one ends at the border; neighbours therefore overlap by
at least the requested `overlap`. All sizes are in pixels of the video and must be
multiples of the VAE's spatial stride (8 for Wan2.1, 16 for Wan2.2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Tiling:
    """Tile size and minimum overlap, (height, width) in video pixels."""

    tile_size: tuple[int, int] = (256, 256)
    overlap: tuple[int, int] = (64, 64)

    def __post_init__(self) -> None:
        for name in ("tile_size", "overlap"):
            value = getattr(self, name)
            if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value)):
                raise TypeError(f"Tiling.{name} must be two ints (height, width) in pixels, got {value!r}")
        if min(self.tile_size) <= 0 or min(self.overlap) < 0:
            raise ValueError(f"Tiling needs positive tile sizes and non-negative overlaps, got "
                             f"tile_size={self.tile_size}, overlap={self.overlap}")
        for axis, tile, overlap in zip(("height", "width"), self.tile_size, self.overlap):
            if overlap >= tile:
                raise ValueError(f"Tiling overlap {overlap} must be smaller than the tile {axis} {tile}")


@dataclass(frozen=True)
class Span:
    """One tile along one axis: [start, stop) in latent positions, and its blend weights
    along that axis in output positions (`scale` outputs per latent position)."""

    start: int
    stop: int
    weights: Optional[torch.Tensor]  # None: the only tile on this axis, weight 1 everywhere


def nearest_valid(value: int, step: int, offset: int = 0) -> str:
    """The valid values nearest to `value` among offset + k*step (k >= 1 when offset is 0),
    written for an error message: "480 or 488"."""
    lower = value - (value - offset) % step
    smallest = offset if offset > 0 else step
    below = [lower] if lower >= smallest and lower != value else []
    return " or ".join(str(v) for v in below + [max(lower + step, smallest)])


def check_tiling(tiling: Tiling, stride: int, vae_name: str) -> None:
    """A ValueError naming the value and the nearest valid ones when a tile size or overlap
    is not a multiple of the spatial stride."""
    for name, values in (("tile_size", tiling.tile_size), ("overlap", tiling.overlap)):
        for axis, value in zip(("height", "width"), values):
            if value % stride:
                valid = nearest_valid(value, stride) if name == "tile_size" else \
                    " or ".join(str(v) for v in (value - value % stride, value - value % stride + stride))
                raise ValueError(f"Tiling {name} {axis} {value} is not a multiple of {stride}, the "
                                 f"{vae_name}'s spatial stride: use {valid}")


def plan_axis(length: int, tile: int, overlap: int, scale: int) -> list[Span]:
    """Tiles covering `length` latent positions with tiles of `tile` and overlaps of at least
    `overlap` latent positions; weights in output positions (`scale` per latent position)."""
    if tile >= length:
        return [Span(0, length, None)]
    count = math.ceil((length - overlap) / (tile - overlap))
    starts = [round(i * (length - tile) / (count - 1)) for i in range(count)]
    ramps = []
    for i, start in enumerate(starts):
        lead = (starts[i - 1] + tile - start) * scale if i > 0 else 0
        trail = (start + tile - starts[i + 1]) * scale if i < count - 1 else 0
        position = torch.arange(tile * scale, dtype=torch.float64)
        rise = (position + 1) / (lead + 1)
        fall = (tile * scale - position) / (trail + 1)
        ramps.append(torch.minimum(torch.minimum(rise, fall), torch.ones(())))
    total = torch.zeros(length * scale, dtype=torch.float64)
    for start, ramp in zip(starts, ramps):
        total[start * scale:(start + tile) * scale] += ramp
    return [Span(start, start + tile, (ramp / total[start * scale:(start + tile) * scale]).float())
            for start, ramp in zip(starts, ramps)]


def plan_tiles(latent_size: tuple[int, int], tiling: Optional[Tiling], stride: int,
               scale: int) -> list[tuple[Span, Span]]:
    """The (row span, column span) of every tile over a latent of `latent_size` (h, w).

    `stride`: pixels per latent position (tiling sizes are converted with it); `scale`:
    output positions per latent position (the stride when decoding, 1 when encoding).
    Without `tiling`, one tile covers everything.
    """
    h, w = latent_size
    if tiling is None:
        return [(Span(0, h, None), Span(0, w, None))]
    rows = plan_axis(h, tiling.tile_size[0] // stride, tiling.overlap[0] // stride, scale)
    columns = plan_axis(w, tiling.tile_size[1] // stride, tiling.overlap[1] // stride, scale)
    return [(row, column) for row in rows for column in columns]


class Canvas:
    """The output assembled from tiles: each tile adds its values times its blend weights."""

    def __init__(self, shape: tuple[int, ...], scale: int, device: torch.device) -> None:
        self.values = torch.zeros(shape, dtype=torch.float32, device=device)
        self.scale = scale

    def add(self, tile: torch.Tensor, row: Span, column: Span, first_frame: int) -> None:
        s = self.scale
        target = self.values[:, :, first_frame:first_frame + tile.shape[2],
                             row.start * s:row.stop * s, column.start * s:column.stop * s]
        if row.weights is None and column.weights is None:
            target.copy_(tile)  # the only tile: its values as they are
            return
        weight = torch.ones((), device=tile.device)
        if row.weights is not None:
            weight = weight * row.weights.to(tile.device)[:, None]
        if column.weights is not None:
            weight = weight * column.weights.to(tile.device)[None, :]
        target.add_(tile.float() * weight)
