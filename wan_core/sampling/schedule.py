"""The reference's flow-matching schedule: sigmas, integer timesteps and the MoE hand-off.

Flow matching mixes x_sigma = sigma * noise + (1 - sigma) * x0, sigma from 1 (noise) to 0
(data). The reference builds its inference schedule like this (web/schedule.js computes the
same numbers for the graph editor, and a test checks that the two agree):

    unipc         sigma_i = linspace(SIGMA_MAX, 0, n + 1)[i] for i < n, where SIGMA_MAX is the
                  top of the scheduler's 1000-step training table, 1 - 1/1000, stored as float32
    dpm++, euler  sigma_i = linspace(1, 0, n + 1)[i] for i < n
    shift         sigma -> shift * sigma / (1 + (shift - 1) * sigma)   (float64)
    timestep      t_i = int64(1000 * sigma_i), truncated (unipc, dpm++); this integer is what
                  the model sees and what the MoE boundary is compared with
    end           a final sigma of exactly 0, so the last step lands on the x0 prediction

The reference has no Euler sampler. Ours follows the few-step distillations (Wan2.2-Lightning /
LightX2V, and ComfyUI's euler with the simple schedule): sigma from exactly 1 and the timestep
1000 * sigma unrounded (float64), so 4 steps at shift 5 run at t = 1000, 937.5, 833.33, 625 —
the timesteps those LoRAs were distilled at.

This is not diffusers' flow schedule: diffusers' UniPCMultistepScheduler with flow sigmas and
the same shift gives timesteps up to 7 apart, and about 1% different final latents.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np
import torch

from wan_core.configs import NUM_TRAIN_TIMESTEPS

SOLVERS = ("unipc", "dpm++", "euler")

# The reference scheduler's training table is sigma = 1 - linspace(1, 1/1000, 1000) reversed,
# kept as float32; its top entry (0.9990000128746033) starts the UniPC schedule.
SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))


def check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")


def check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")


def check_denoise(denoise: float) -> None:
    if isinstance(denoise, bool) or not isinstance(denoise, numbers.Real) or not 0 < denoise <= 1:
        raise ValueError(f"denoise must be in (0, 1] (1 = generate from pure noise), got {denoise!r}")


def check_boundary(boundary: float) -> None:
    if isinstance(boundary, bool) or not isinstance(boundary, numbers.Real) or not 0 < boundary < 1:
        raise ValueError(f"boundary must be a fraction in (0, 1) of the {NUM_TRAIN_TIMESTEPS} training "
                         f"timesteps (0.875 for T2V-A14B, 0.9 for I2V-A14B), got {boundary!r}")


def check_shift(shift: float) -> None:
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not 0 < shift < math.inf:
        raise ValueError(f"shift must be a finite number > 0 (the reference uses 1 to 17), got {shift!r}")


def schedule(solver: str, steps: int, shift: float, denoise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The `steps` sigmas and timesteps that run, as the reference computes them.

    Returns (sigmas, timesteps): sigmas float64 of length steps + 1 ending with 0, timesteps
    of length steps, int64 (float64 for euler, see the module docstring). With denoise < 1 the schedule is built for floor(steps / denoise)
    steps and only its last `steps` are returned (they start below full noise).
    """
    check_solver(solver)
    check_steps(steps)
    check_shift(shift)
    check_denoise(denoise)
    total = math.floor(steps / denoise) if denoise < 1 else int(steps)

    top = SIGMA_MAX if solver == "unipc" else 1.0
    sigmas = np.linspace(top, 0.0, total + 1)[:total]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * NUM_TRAIN_TIMESTEPS
    if solver != "euler":
        timesteps = timesteps.astype(np.int64)

    sigmas = np.append(sigmas, 0.0)[total - steps:]
    return torch.from_numpy(sigmas), torch.from_numpy(timesteps[total - steps:])


def runs_high_noise_expert(timestep: int, boundary: float) -> bool:
    """The reference's rule: the high-noise expert runs while t >= boundary * 1000."""
    return int(timestep) >= boundary * NUM_TRAIN_TIMESTEPS


def handoff_index(timesteps: Sequence[int] | torch.Tensor, boundary: float) -> int:
    """Index of the first step that runs the low-noise expert (len(timesteps) if none does)."""
    check_boundary(boundary)
    for index, timestep in enumerate(timesteps):
        if not runs_high_noise_expert(timestep, boundary):
            return index
    return len(timesteps)
