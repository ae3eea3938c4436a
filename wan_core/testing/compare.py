"""Comparing float outputs the way the project's tests do.

MKL's AVX-512 float32 kernels give results that depend on the memory alignment of their inputs
(memory-mapped checkpoint tensors and views with offsets differ from fresh allocations), so
outputs computed from differently placed inputs agree to rounding, not bit for bit.
"""
from __future__ import annotations

import torch

# max |a - b| / max |b| for fp32 outputs of the same computation on differently placed inputs
PLACEMENT_TOLERANCE = 1e-5


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are all zeros)."""
    scale = expected.abs().max()
    difference = (actual.double() - expected.double()).abs().max()
    return float(difference / scale) if scale > 0 else float(difference)


def bf16_agreement(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    """How far bf16 `actual` is from bf16 `expected`: "max_ulps", the largest difference in units
    of the last place of `expected` (values below 2^-20 of the largest count as that size), and
    "mismatch", the fraction of values that differ at all."""
    actual, expected = actual.double(), expected.double()
    _, exponent = torch.frexp(expected.abs().clamp(min=expected.abs().max().item() * 2 ** -20))
    ulp = torch.ldexp(torch.ones_like(expected), exponent - 8)  # bf16 keeps 8 significant bits
    return {"max_ulps": ((actual - expected).abs() / ulp).max().item(),
            "mismatch": (actual != expected).double().mean().item()}
