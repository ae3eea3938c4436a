"""The DiT block's elementwise work around the matmuls: adaLN modulation after a LayerNorm, RMSNorm
and RoPE on q and k, and the residual added before a norm.

Each function here is the exact torch computation (the reference's numbers, on every device and
dtype) and, on CUDA with a bf16 model in eager mode, one Triton kernel per row instead
(`wan_core.ops.kernels.fused_elementwise`): eager torch runs each step as its own pass over a
float32 intermediate, the kernel reads the inputs once and writes only the result. The kernel
keeps the float32 arithmetic and rounds once at the end, where the exact path may also round
the normalised q/k to bf16 before RoPE; tests compare the two. Compiled blocks (torch.compile)
always take the torch path, which inductor fuses itself.

`set_fused` (or `only_fused` for a block of code) chooses which kinds may use their kernel
("norm", "rope", "residual").
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("norm", "rope", "residual")
# Under Triton's interpreter (tests) the kernels run on CPU tensors too.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_HAVE_TRITON = importlib.util.find_spec("triton") is not None
_enabled = set(KINDS)


def set_fused(kinds: Iterable[str]) -> None:
    """Let the kernels of `kinds` (a subset of KINDS) run where they apply; the others take the
    exact torch path everywhere."""
    kinds = set(kinds)
    if not kinds <= set(KINDS):
        raise ValueError(f"unknown fused kinds {sorted(kinds - set(KINDS))}; expected some of {list(KINDS)}")
    _enabled.clear()
    _enabled.update(kinds)


def fused_kinds() -> tuple[str, ...]:
    """The kinds whose kernels may run (`set_fused`)."""
    return tuple(kind for kind in KINDS if kind in _enabled)


@contextmanager
def only_fused(kinds: Iterable[str]) -> Iterator[None]:
    """`set_fused(kinds)` inside the block, the previous kinds again after it."""
    before = fused_kinds()
    set_fused(kinds)
    try:
        yield
    finally:
        set_fused(before)


def applies(kind: str, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `kind`'s kernel runs for activations `x` producing `dtype`: enabled, Triton
    installed, a bf16 result, a CUDA tensor, not inside torch.compile."""
    if torch.compiler.is_compiling() or kind not in _enabled or not _HAVE_TRITON or dtype != torch.bfloat16:
        return False
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, in float32 (one fused pass)."""
    return torch.addcmul(shift, x.float(), 1 + scale)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent channel pair (x[2i], x[2i+1]) of x [B,L,N,d], read as the complex
    number x[2i] + i x[2i+1], by the unit complex `rotation` [L,1,d/2]; float32 math."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


def _kernel_norm(norm: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the norm kernel can stand in for `norm` on x."""
    return (isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1 and (norm.weight is None) == (norm.bias is None)
            and x.dtype == torch.float32 and x.ndim == 3 and applies("norm", x, dtype))


def norm_modulate(x: torch.Tensor, shift: Optional[torch.Tensor], scale: Optional[torch.Tensor], *,
                  norm: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """modulate(norm(x), shift, scale) in `dtype` (without shift and scale: norm(x) in `dtype`).
    x: float32 [B, L, D]; shift, scale: float32 [B, 1 | L, D]."""
    if _kernel_norm(norm, x, dtype) and x.stride(-1) == 1:
        from wan_core.ops.kernels.fused_elementwise import norm_modulate as kernel

        return kernel(x, norm.weight, norm.bias, norm.eps, shift, scale, dtype)
    h = norm(x)
    return (h if shift is None else modulate(h, shift, scale)).to(dtype)


def residual_norm_modulate(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor],
                           shift: Optional[torch.Tensor], scale: Optional[torch.Tensor], *, norm: nn.Module,
                           dtype: torch.dtype) -> torch.Tensor:
    """out = x + y * gate (x + y without a gate; `out` may be x itself), then
    norm_modulate(out, shift, scale). x, out: float32 [B, L, D]; y: [B, L, D] in the model's
    dtype; gate: float32 [B, 1 | L, D]."""
    if (_kernel_norm(norm, x, dtype) and applies("residual", x, dtype)
            and all(t.stride(-1) == 1 for t in (out, x, y, *(v for v in (gate, shift, scale) if v is not None)))):
        from wan_core.ops.kernels.fused_elementwise import norm_modulate as kernel

        return kernel(x, norm.weight, norm.bias, norm.eps, shift, scale, dtype, residual=y, gate=gate, sum_out=out)
    _sum_into(out, x, y, gate)
    return norm_modulate(out, shift, scale, norm=norm, dtype=dtype)


def _sum_into(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor]) -> None:
    """out = x + y * gate (x + y without a gate) in one pass. Autograd cannot record ops with
    out=, so where gradients are wanted it takes two in-place passes (the same numbers)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, y, gate)):
        if out is not x:
            out.copy_(x)
        out.add_(y) if gate is None else out.addcmul_(y, gate)
    elif gate is None:
        torch.add(x, y, out=out)
    else:
        torch.addcmul(x, y, gate, out=out)


def rms_norm_rope(y: torch.Tensor, weight: torch.Tensor, eps: float, rotation: torch.Tensor,
                  num_heads: int) -> torch.Tensor:
    """RMSNorm of y [B, L, N*d] over all heads (times `weight`), split into N heads and rotated
    by RoPE (`apply_rope`, rotation [L, 1, d/2] complex64) -> [B, L, N, d] in y's dtype."""
    if (applies("rope", y, y.dtype) and y.ndim == 3 and y.stride(-1) == 1 and rotation.dtype == torch.complex64
            and rotation.shape == (y.shape[1], 1, y.shape[2] // num_heads // 2)):
        from wan_core.ops.kernels.fused_elementwise import rms_norm_rope as kernel

        return kernel(y, weight, eps, rotation if rotation.stride(-1) == 1 else rotation.contiguous(), num_heads)
    return apply_rope(F.rms_norm(y, weight.shape, weight, eps).unflatten(-1, (num_heads, -1)), rotation)
