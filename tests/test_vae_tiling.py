"""Spatially tiled encode and decode: the tiles are really used, blended with linear ramps that
sum to one, and the result stays close to the untiled one."""
from __future__ import annotations

import pytest
import torch

from wan_core.testing import PLACEMENT_TOLERANCE, max_relative_error, tiny_vae_config, vae_state_dict
from wan_core.vae import Tiling, WanVAE
from wan_core.vae.tiling import plan_axis, plan_tiles


@pytest.fixture(scope="module", params=["2.1", "2.2"])
def vae(request) -> WanVAE:
    config = tiny_vae_config(request.param)
    model = WanVAE(config)
    model.load_state_dict(vae_state_dict(config, seed=1), strict=True)
    return model.eval()


def latent_for(vae: WanVAE, frames: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, vae.z_dim, frames, h, w, generator=torch.Generator().manual_seed(seed))


def test_axis_plan_covers_evenly_with_ramps_summing_to_one():
    spans = plan_axis(length=10, tile=4, overlap=1, scale=2)
    assert [(s.start, s.stop) for s in spans] == [(0, 4), (3, 7), (6, 10)]
    total = torch.zeros(20)
    for span in spans:
        total[span.start * 2:span.stop * 2] += span.weights
    torch.testing.assert_close(total, torch.ones(20))
    first, middle, last = (span.weights for span in spans)
    assert torch.all(first[:6] == 1) and torch.all(last[-6:] == 1)  # the frame's borders keep full weight
    # across the 2-output overlap of the first two tiles, the weight falls linearly: 2/3, 1/3
    torch.testing.assert_close(first[6:], torch.tensor([2 / 3, 1 / 3]))
    torch.testing.assert_close(middle[:2], torch.tensor([1 / 3, 2 / 3]))
    # tiles are spread evenly to end at the border: neighbours overlap by at least `overlap`
    assert [(s.start, s.stop) for s in plan_axis(11, 4, 1, 1)] == [(0, 4), (2, 6), (5, 9), (7, 11)]


@pytest.mark.parametrize("length, tile, overlap", [(60, 32, 8), (104, 32, 8), (13, 5, 2), (7, 3, 0), (9, 9, 2)])
def test_axis_plan_invariants(length, tile, overlap):
    spans = plan_axis(length, tile, overlap, scale=1)
    assert spans[0].start == 0 and spans[-1].stop == length
    assert all(s.stop - s.start == min(tile, length) for s in spans)
    assert all(a.stop - b.start >= overlap for a, b in zip(spans, spans[1:]))
    if len(spans) > 1:
        total = sum(torch.zeros(length).index_add_(0, torch.arange(s.start, s.stop), s.weights) for s in spans)
        torch.testing.assert_close(total, torch.ones(length))


def test_a_tile_covering_the_frame_is_the_untiled_result(vae):
    s = vae.stride[1]
    latent = latent_for(vae, 2, 3, 4)
    # a tile is a view at an offset: equal to MKL's alignment-dependent rounding (PLACEMENT_TOLERANCE)
    tiled = vae.decode(latent, tile=Tiling((4 * s, 4 * s), (s, s)))
    assert max_relative_error(tiled, vae.decode(latent)) <= PLACEMENT_TOLERANCE
    video = vae.decode(latent)
    assert max_relative_error(vae.encode(video, tile=Tiling((3 * s, 4 * s), (0, 0))), vae.encode(video)) \
        <= PLACEMENT_TOLERANCE


def test_tiles_are_used_and_counted(vae):
    s = vae.stride[1]
    latent = latent_for(vae, 2, 6, 5)
    tiling = Tiling((3 * s, 3 * s), (s, s))
    # rows: ceil((6 - 1) / (3 - 1)) = 3 tiles, columns: ceil((5 - 1) / (3 - 1)) = 2
    assert len(plan_tiles((6, 5), tiling, s, scale=s)) == 6
    calls = []
    vae.decode(latent, tile=tiling, callback=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 12) for i in range(1, 13)]  # 6 tiles x 2 latent frames
    calls.clear()
    vae.encode(torch.zeros(1, 3, 5, 6 * s, 5 * s), tile=tiling, callback=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 12) for i in range(1, 13)]  # 6 tiles x 2 chunks (1 frame, then 4)


def test_tiled_decode_is_the_blend_of_independently_decoded_tiles(vae):
    """Each tile decoded on its own (untiled), weighted by the plan's ramps and summed, gives
    the tiled output: the tiles go to the right place with the right weights. (A tile decoded
    alone comes back clamped to [-1, 1] while the tiled decode clamps after blending, so
    pixels where a tile saturates are left out.)"""
    s = vae.stride[1]
    latent = latent_for(vae, 2, 5, 6, seed=4)
    tiling = Tiling((3 * s, 4 * s), (s, 2 * s))
    tiled = vae.decode(latent, tile=tiling)
    expected = torch.zeros_like(tiled)
    saturated = torch.zeros_like(tiled, dtype=torch.bool)
    for rows, columns in plan_tiles((5, 6), tiling, s, scale=s):
        alone = vae.decode(latent[:, :, :, rows.start:rows.stop, columns.start:columns.stop])
        weight = rows.weights[:, None] * columns.weights[None, :]
        region = (..., slice(rows.start * s, rows.stop * s), slice(columns.start * s, columns.stop * s))
        expected[region] += alone * weight
        saturated[region] |= alone.abs() == 1
    assert saturated.float().mean() < 0.2
    torch.testing.assert_close(tiled[~saturated], expected[~saturated], rtol=0, atol=1e-5)


def test_interrupt_from_the_callback_stops_decoding(vae):
    def interrupt(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        vae.decode(latent_for(vae, 3, 2, 2), callback=interrupt)


# With random weights every output depends on the whole frame (a single-head attention over
# all pixels of a frame sits in the middle of both networks, and ~30 chained 3x3 convolutions
# see across these tiny frames), so tiles can't reproduce the untiled output exactly. Measured
# here (8x8 latent, 3x3 tiles of 4 overlapping by 2, one latent frame, random weights): decode
# mean |tiled - untiled| 0.064 (Wan2.1) / 0.063 (Wan2.2) for video in [-1, 1], against
# 0.099 / 0.092 for butt-joined tiles; encode 13 % / 22 % of the latents' mean magnitude,
# against 17 % / 33 %. The bounds below are those figures with some margin.
DECODE_MEAN_ABS_TOLERANCE = 0.1   # mean |tiled - untiled|, video in [-1, 1]
ENCODE_MEAN_REL_TOLERANCE = 0.3   # mean |tiled - untiled| / mean |untiled|, normalised latents


def test_tiled_decode_stays_close_and_overlap_blending_beats_hard_seams(vae):
    s = vae.stride[1]
    latent = latent_for(vae, 1, 8, 8, seed=5)
    untiled = vae.decode(latent)
    blended = (vae.decode(latent, tile=Tiling((4 * s, 4 * s), (2 * s, 2 * s))) - untiled).abs().mean()
    seams = (vae.decode(latent, tile=Tiling((4 * s, 4 * s), (0, 0))) - untiled).abs().mean()
    print(f"decode Wan{vae.version}: mean |tiled - untiled| {blended:.4f} blended, {seams:.4f} hard seams")
    assert blended <= DECODE_MEAN_ABS_TOLERANCE
    assert blended < seams


def test_tiled_encode_stays_close(vae):
    s = vae.stride[1]
    video = torch.rand(1, 3, 1, 8 * s, 8 * s, generator=torch.Generator().manual_seed(6)) * 2 - 1
    untiled = vae.encode(video)
    scale = untiled.abs().mean()
    blended = (vae.encode(video, tile=Tiling((4 * s, 4 * s), (2 * s, 2 * s))) - untiled).abs().mean() / scale
    seams = (vae.encode(video, tile=Tiling((4 * s, 4 * s), (0, 0))) - untiled).abs().mean() / scale
    print(f"encode Wan{vae.version}: mean |tiled - untiled| / mean |untiled| {blended:.4f} blended, "
          f"{seams:.4f} hard seams")
    assert blended <= ENCODE_MEAN_REL_TOLERANCE
    assert blended < seams
