"""The one place attention is computed, so that a faster kernel can be swapped in everywhere.

Tensors are [batch, tokens, heads, head_dim] as the Wan blocks produce them. "sdpa" (torch's
scaled_dot_product_attention, which itself picks flash/memory-efficient kernels on GPUs) is
always there; "flash_attn" and "sageattention" are used only when installed and asked for.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Optional

import torch
import torch.nn.functional as F

DEFAULT_BACKEND = "sdpa"

# backend name -> (importable module, pip package that provides it)
_OPTIONAL_BACKENDS = {"flash_attn": ("flash_attn", "flash-attn"),
                      "sageattention": ("sageattention", "sageattention")}


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func

    # flash-attn only takes half precision; fp32 inputs are computed in bf16 and cast back
    half = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    return flash_attn_func(q.to(half), k.to(half), v.to(half)).to(q.dtype)


def _sageattention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from sageattention import sageattn

    half = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    return sageattn(q.to(half), k.to(half), v.to(half), tensor_layout="NHD").to(q.dtype)


_KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sdpa": _sdpa, "flash_attn": _flash_attn, "sageattention": _sageattention}


def available_backends() -> list[str]:
    """The backends that can run here: "sdpa" and each optional one whose package is installed."""
    return [DEFAULT_BACKEND] + [name for name, (module, _) in _OPTIONAL_BACKENDS.items()
                                if importlib.util.find_spec(module) is not None]


def check_backend(name: str) -> str:
    """`name` if it can run here; otherwise a ValueError that says what to install."""
    if name not in _KERNELS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {sorted(_KERNELS)}")
    if name in _OPTIONAL_BACKENDS and name not in available_backends():
        module, package = _OPTIONAL_BACKENDS[name]
        raise ValueError(f"attention backend {name!r} needs the {package!r} package, which is not "
                         f"installed: `pip install {package}` (or choose 'sdpa')")
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v over [batch, tokens, heads, head_dim] tensors."""
    return _KERNELS[backend or DEFAULT_BACKEND](q, k, v)
