"""Latent previews: a linear projection of a Wan latent frame to RGB, for watching sampling.

The projections are published facts of the two Wan latent spaces (ComfyUI's latent formats
Wan21 and Wan22 carry the same numbers): for each latent channel its contribution to red,
green and blue, plus a bias, giving RGB in about -1..1 from the normalised latent the sampler
works in (the reference's (z - mean) / std, which is what these factors were fitted on). A
preview costs one small matrix product per frame, no VAE.
"""
from __future__ import annotations

import numpy as np
import torch

# 16 latent channels: the Wan2.1 VAE (T2V-A14B, I2V-A14B, S2V-14B). Rows: channels; columns: R, G, B.
WAN21_RGB_FACTORS = (
    (-0.1299, -0.1692,  0.2932),
    ( 0.0671,  0.0406,  0.0442),
    ( 0.3568,  0.2548,  0.1747),
    ( 0.0372,  0.2344,  0.1420),
    ( 0.0313,  0.0189, -0.0328),
    ( 0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925),
    ( 0.0166,  0.1902,  0.1975),
    (-0.0412,  0.0267, -0.1364),
    (-0.1293,  0.0740,  0.1636),
    ( 0.0680,  0.3019,  0.1128),
    ( 0.0032,  0.0581,  0.0639),
    (-0.1251,  0.0927,  0.1699),
    ( 0.0060, -0.0633,  0.0005),
    ( 0.3477,  0.2275,  0.2950),
    ( 0.1984,  0.0913,  0.1861),
)
WAN21_RGB_BIAS = (-0.1835, -0.0868, -0.3360)

# 48 latent channels: the Wan2.2 VAE (TI2V-5B).
WAN22_RGB_FACTORS = (
    ( 0.0119,  0.0103,  0.0046),
    (-0.1062, -0.0504,  0.0165),
    ( 0.0140,  0.0409,  0.0491),
    (-0.0813, -0.0677,  0.0607),
    ( 0.0656,  0.0851,  0.0808),
    ( 0.0264,  0.0463,  0.0912),
    ( 0.0295,  0.0326,  0.0590),
    (-0.0244, -0.0270,  0.0025),
    ( 0.0443, -0.0102,  0.0288),
    (-0.0465, -0.0090, -0.0205),
    ( 0.0359,  0.0236,  0.0082),
    (-0.0776,  0.0854,  0.1048),
    ( 0.0564,  0.0264,  0.0561),
    ( 0.0006,  0.0594,  0.0418),
    (-0.0319, -0.0542, -0.0637),
    (-0.0268,  0.0024,  0.0260),
    ( 0.0539,  0.0265,  0.0358),
    (-0.0359, -0.0312, -0.0287),
    (-0.0285, -0.1032, -0.1237),
    ( 0.1041,  0.0537,  0.0622),
    (-0.0086, -0.0374, -0.0051),
    ( 0.0390,  0.0670,  0.2863),
    ( 0.0069,  0.0144,  0.0082),
    ( 0.0006, -0.0167,  0.0079),
    ( 0.0313, -0.0574, -0.0232),
    (-0.1454, -0.0902, -0.0481),
    ( 0.0714,  0.0827,  0.0447),
    (-0.0304, -0.0574, -0.0196),
    ( 0.0401,  0.0384,  0.0204),
    (-0.0758, -0.0297, -0.0014),
    ( 0.0568,  0.1307,  0.1372),
    (-0.0055, -0.0310, -0.0380),
    ( 0.0239, -0.0305,  0.0325),
    (-0.0663, -0.0673, -0.0140),
    (-0.0416, -0.0047, -0.0023),
    ( 0.0166,  0.0112, -0.0093),
    (-0.0211,  0.0011,  0.0331),
    ( 0.1833,  0.1466,  0.2250),
    (-0.0368,  0.0370,  0.0295),
    (-0.3441, -0.3543, -0.2008),
    (-0.0479, -0.0489, -0.0420),
    (-0.0660, -0.0153,  0.0800),
    (-0.0101,  0.0068,  0.0156),
    (-0.0690, -0.0452, -0.0927),
    (-0.0145,  0.0041,  0.0015),
    ( 0.0421,  0.0451,  0.0373),
    ( 0.0504, -0.0483, -0.0356),
    (-0.0837,  0.0168,  0.0055),
)
WAN22_RGB_BIAS = (0.0317, -0.0878, -0.1388)

RGB_PROJECTIONS = {16: (WAN21_RGB_FACTORS, WAN21_RGB_BIAS), 48: (WAN22_RGB_FACTORS, WAN22_RGB_BIAS)}


def latent_to_rgb(latent: torch.Tensor, frame: int | None = None) -> np.ndarray:
    """[H, W, 3] uint8 preview of one frame of a latent [C, F, H, W] (or [1, C, F, H, W]) at the
    latent's resolution. `frame` defaults to the middle latent frame: the first one is the
    given image in image-to-video, the middle one shows the motion."""
    if latent.ndim == 5:
        latent = latent[0]
    if latent.ndim != 4 or latent.shape[0] not in RGB_PROJECTIONS:
        raise ValueError(f"a preview needs a Wan latent [C, F, H, W] with C in {sorted(RGB_PROJECTIONS)}, "
                         f"got shape {tuple(latent.shape)}")
    factors, bias = RGB_PROJECTIONS[latent.shape[0]]
    chosen = latent[:, latent.shape[1] // 2 if frame is None else frame].detach().float().cpu()
    rgb = torch.einsum("chw,cr->hwr", chosen, torch.tensor(factors)) + torch.tensor(bias)
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).numpy()
