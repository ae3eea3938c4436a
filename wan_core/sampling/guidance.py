"""Classifier-free guidance scales, in one documented order.

A pair of scales is always (low_noise, high_noise), the order of the reference config's
`sample_guide_scale` (t2v-A14B: (3.0, 4.0) = 3.0 for the low-noise expert, 4.0 for the
high-noise one); `GuideScale` names the two. Experts travel in the order they run,
(high_noise, low_noise), so `scales_by_expert` is the one place that turns one order into the
other.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Sequence, Union


class GuideScale(NamedTuple):
    """The two experts' CFG scales, (low_noise, high_noise) like the reference config."""

    low_noise: float
    high_noise: float


GuideScaleInput = Union[float, GuideScale, Sequence[float]]


def is_finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_guide_scale(guide_scale: GuideScaleInput, *, pair_allowed: bool = True,
                      name: str = "guide_scale") -> Union[float, GuideScale]:
    """One finite scale, or a (low_noise, high_noise) pair of them as a GuideScale (only when
    `pair_allowed`, i.e. for two experts). `name` is the input's name in the message."""
    if is_finite_number(guide_scale):
        return float(guide_scale)
    if isinstance(guide_scale, Sequence) and not isinstance(guide_scale, str):
        values = tuple(guide_scale)
        if len(values) == 1 and is_finite_number(values[0]):
            return float(values[0])
        if len(values) == 2 and all(map(is_finite_number, values)):
            if not pair_allowed:
                raise ValueError(f"{name}: one model runs every step, so it takes one scale, got {guide_scale!r}")
            return GuideScale(float(values[0]), float(values[1]))
    expected = "a finite number or a (low_noise, high_noise) pair" if pair_allowed else "one finite number"
    raise ValueError(f"{name} must be {expected}, got {guide_scale!r}")


def scales_by_expert(guide_scale: GuideScaleInput, num_experts: int, name: str = "guide_scale") -> tuple[float, ...]:
    """The scales in the order of the experts: (high_noise, low_noise) for two, (scale,) for one."""
    checked = check_guide_scale(guide_scale, pair_allowed=num_experts == 2, name=name)
    if isinstance(checked, GuideScale):
        return checked.high_noise, checked.low_noise
    return (checked,) * num_experts
