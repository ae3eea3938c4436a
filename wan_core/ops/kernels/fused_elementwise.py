"""Triton kernels of the DiT block's elementwise work (`wan_core.ops.fused` dispatches to them
and holds the exact torch path they are tested against). One program per token row: the row is
read once, its statistics are taken in float32 registers, and only the result is written, where
eager torch makes a float32 intermediate tensor per step (norm, modulation, cast; or the
complex upcast, product and cast of RoPE).

Rows are addressed by (batch, token) strides, so the token-chunk and S2V-segment slices of the
block's [B, L, D] tensors go in without copies; a per-row vector [B, 1 | L, D] with one row
for all tokens has token stride 0.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton 3.6's interpreter truncates float32 -> bf16 casts (a GPU rounds to nearest, ties to
# even). Under the interpreter the kernels round the bits themselves first, which makes the
# cast exact, so that tests see the GPU's roundings.
EXACT_CAST = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _rounded(x, dtype: tl.constexpr, EXACT_CAST: tl.constexpr):
    """float32 x in `dtype`, rounded to nearest, ties to even."""
    if EXACT_CAST and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _norm_modulate(x_ptr, y_ptr, gate_ptr, sum_ptr, weight_ptr, bias_ptr, shift_ptr, scale_ptr, out_ptr, dim, eps,
                   sx_b, sx_l, sy_b, sy_l, sg_b, sg_l, ss_b, ss_l, sh_b, sh_l, sc_b, sc_l, so_b, so_l,
                   BLOCK: tl.constexpr, RESIDUAL: tl.constexpr, GATE: tl.constexpr, AFFINE: tl.constexpr,
                   MODULATE: tl.constexpr, EXACT_CAST: tl.constexpr):
    """One row: [s = x + y (* gate), written to sum_ptr;] LayerNorm(s) [* weight + bias]
    [* (1 + scale) + shift] -> out (its dtype). Statistics and arithmetic in float32."""
    token = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < dim
    x = tl.load(x_ptr + b * sx_b + token * sx_l + cols, mask=inside, other=0.0).to(tl.float32)
    if RESIDUAL:
        y = tl.load(y_ptr + b * sy_b + token * sy_l + cols, mask=inside, other=0.0).to(tl.float32)
        if GATE:
            y = y * tl.load(gate_ptr + b * sg_b + token * sg_l + cols, mask=inside, other=0.0).to(tl.float32)
        x = x + y
        tl.store(sum_ptr + b * ss_b + token * ss_l + cols, x, mask=inside)
    mean = tl.sum(x, axis=0) / dim
    centred = tl.where(inside, x - mean, 0.0)
    normed = centred * tl.rsqrt(tl.sum(centred * centred, axis=0) / dim + eps)
    if AFFINE:
        normed = (normed * tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
                  + tl.load(bias_ptr + cols, mask=inside, other=0.0).to(tl.float32))
    if MODULATE:
        scale = tl.load(scale_ptr + b * sc_b + token * sc_l + cols, mask=inside, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + b * sh_b + token * sh_l + cols, mask=inside, other=0.0).to(tl.float32)
        normed = normed * (1.0 + scale) + shift
    tl.store(out_ptr + b * so_b + token * so_l + cols, _rounded(normed, out_ptr.dtype.element_ty, EXACT_CAST),
             mask=inside)


@triton.jit
def _rms_norm_rope(y_ptr, weight_ptr, rotation_ptr, out_ptr, dim, eps, sy_b, sy_l, sr_l, so_b, so_l,
                   HALF_HEAD: tl.constexpr, BLOCK: tl.constexpr, EXACT_CAST: tl.constexpr):
    """One row of y [.., D] (all heads): RMSNorm over D times weight, then each channel pair
    (2i, 2i+1) of each head rotated by the unit complex (cos, sin) = rotation[token, i % (d/2)]."""
    token = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    pairs = tl.arange(0, BLOCK)
    inside = pairs < dim // 2
    row = y_ptr + b * sy_b + token * sy_l + 2 * pairs
    real = tl.load(row, mask=inside, other=0.0).to(tl.float32)
    imag = tl.load(row + 1, mask=inside, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(real * real, axis=0) + tl.sum(imag * imag, axis=0)) / dim + eps)
    real = real * rstd * tl.load(weight_ptr + 2 * pairs, mask=inside, other=0.0).to(tl.float32)
    imag = imag * rstd * tl.load(weight_ptr + 2 * pairs + 1, mask=inside, other=0.0).to(tl.float32)
    angle = rotation_ptr + token * sr_l + 2 * (pairs % HALF_HEAD)
    cos = tl.load(angle, mask=inside, other=0.0)
    sin = tl.load(angle + 1, mask=inside, other=0.0)
    out = out_ptr + b * so_b + token * so_l + 2 * pairs
    tl.store(out, _rounded(real * cos - imag * sin, out_ptr.dtype.element_ty, EXACT_CAST), mask=inside)
    tl.store(out + 1, _rounded(real * sin + imag * cos, out_ptr.dtype.element_ty, EXACT_CAST), mask=inside)


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8


def _row_strides(t: torch.Tensor | None) -> tuple[int, int]:
    """(batch, token) strides of a [B, L | 1, D] tensor; 0 along a broadcast token axis."""
    if t is None:
        return 0, 0
    return t.stride(0), (0 if t.shape[1] == 1 else t.stride(1))


def norm_modulate(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                  shift: torch.Tensor | None, scale: torch.Tensor | None, out_dtype: torch.dtype, *,
                  residual: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                  sum_out: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension of x [B, L, D] (with `weight`/`bias` when given), then
    `* (1 + scale) + shift` when given, as a new [B, L, D] tensor of `out_dtype`. With
    `residual`, x + residual (* gate) is normalised instead and written to `sum_out` (which may
    be x itself). Every tensor's last dimension must be contiguous."""
    batch, tokens, dim = x.shape
    out = torch.empty(batch, tokens, dim, dtype=out_dtype, device=x.device)
    block = triton.next_power_of_2(dim)
    anchor = x  # stands in for the pointers a variant does not read
    _norm_modulate[(tokens, batch)](
        x, residual if residual is not None else anchor, gate if gate is not None else anchor,
        sum_out if sum_out is not None else anchor, weight if weight is not None else anchor,
        bias if bias is not None else anchor, shift if shift is not None else anchor,
        scale if scale is not None else anchor, out, dim, eps, *_row_strides(x), *_row_strides(residual),
        *_row_strides(gate), *_row_strides(sum_out), *_row_strides(shift), *_row_strides(scale),
        *_row_strides(out), BLOCK=block, RESIDUAL=residual is not None, GATE=gate is not None,
        AFFINE=weight is not None, MODULATE=shift is not None, EXACT_CAST=EXACT_CAST, num_warps=_warps(block))
    return out


def rms_norm_rope(y: torch.Tensor, weight: torch.Tensor, eps: float, rotation: torch.Tensor,
                  num_heads: int) -> torch.Tensor:
    """y [B, L, N*d] RMS-normalised over all N*d channels (times `weight`), then rotated by
    `rotation` [L, 1, d/2] complex64 -> [B, L, N, d] in y's dtype."""
    batch, tokens, dim = y.shape
    out = torch.empty(batch, tokens, num_heads, dim // num_heads, dtype=y.dtype, device=y.device)
    angles = torch.view_as_real(rotation)  # [L, 1, d/2, 2] float32
    block = triton.next_power_of_2(dim // 2)
    _rms_norm_rope[(tokens, batch)](
        y, weight, angles, out, dim, eps, *_row_strides(y), angles.stride(0), out.stride(0), out.stride(1),
        HALF_HEAD=dim // num_heads // 2, BLOCK=block, EXACT_CAST=EXACT_CAST, num_warps=_warps(block))
    return out
