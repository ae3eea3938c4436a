"""The one place attention is computed, so that a faster kernel can be swapped in everywhere.

Tensors are [batch, tokens, heads, head_dim] as the Wan blocks produce them. "sdpa" (torch's
scaled_dot_product_attention, which itself picks cuDNN/flash/memory-efficient kernels on GPUs)
is always there and exact; "flash_attn" and "sageattention" are used only when installed and
asked for; "int8_fp8_triton" is the package's own 8-bit kernel (`wan_core.ops.int8_attention`,
Hopper GPUs, needs Triton). "auto" picks per device: the fastest back-end that runs there and
passes a one-time accuracy probe against sdpa, else sdpa (`resolve_backend`).
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from wan_core.ops.int8_attention import int8_fp8_attention

log = logging.getLogger("wan_core")

DEFAULT_BACKEND = "sdpa"
AUTO = "auto"
# The smallest cosine similarity to sdpa's output on the probe that "auto" accepts.
PROBE_MIN_COSINE = 0.999

# backend name -> (importable module, pip package that provides it)
_OPTIONAL_BACKENDS = {"flash_attn": ("flash_attn", "flash-attn"),
                      "sageattention": ("sageattention", "sageattention"),
                      "int8_fp8_triton": ("triton", "triton")}
# What "auto" tries on a GPU, fastest first (bench/RESULTS.md, H200), each with the smallest
# compute capability it is used on; sdpa is the last resort.
_AUTO_ORDER = (("int8_fp8_triton", (9, 0)),)


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


def _int8_fp8_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if q.device.type != "cuda":
        raise ValueError(f"attention backend 'int8_fp8_triton' runs on CUDA GPUs; these tensors are on "
                         f"{q.device}: choose 'sdpa' or 'auto'")
    return int8_fp8_attention(q, k, v)


_KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sdpa": _sdpa, "flash_attn": _flash_attn, "sageattention": _sageattention, "int8_fp8_triton": _int8_fp8_triton}


def available_backends() -> list[str]:
    """The backends that can run here: "sdpa" and each optional one whose package is installed."""
    return [DEFAULT_BACKEND] + [name for name, (module, _) in _OPTIONAL_BACKENDS.items()
                                if importlib.util.find_spec(module) is not None]


def check_backend(name: str) -> str:
    """`name` if it can run here; otherwise a ValueError that says what to install."""
    if name == AUTO:
        return name
    if name not in _KERNELS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {sorted([AUTO, *_KERNELS])}")
    if name in _OPTIONAL_BACKENDS and name not in available_backends():
        module, package = _OPTIONAL_BACKENDS[name]
        raise ValueError(f"attention backend {name!r} needs the {package!r} package, which is not "
                         f"installed: `pip install {package}` (or choose 'sdpa')")
    return name


_resolved: dict[tuple[str, torch.dtype], tuple[str, str]] = {}


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> str:
    """The back-end that `name` runs as on `device` with inputs of `dtype`: `name` itself, or
    for "auto" the first of the fast back-ends that is installed, supported by the device and
    within PROBE_MIN_COSINE of sdpa on a small probe, else "sdpa". Each (device, dtype) is
    probed once per process; the choice and the reasons for passing over the others are logged
    (`auto_reason` repeats them)."""
    if name != AUTO:
        return name
    device = torch.device(device)
    key = (str(device), dtype)
    if key not in _resolved:
        _resolved[key] = _choose(device, dtype)
        log.info("attention auto on %s (%s): %s (%s)", device, str(dtype).removeprefix("torch."), *_resolved[key])
    return _resolved[key][0]


def auto_reason(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> str:
    """Why "auto" chose what it did on (device, dtype), once it has been resolved there."""
    return _resolved[(str(torch.device(device)), dtype)][1]


def _choose(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    if device.type != "cuda":
        return DEFAULT_BACKEND, f"sdpa is the only back-end on {device.type}"
    if dtype not in (torch.bfloat16, torch.float16):
        return DEFAULT_BACKEND, f"the 8-bit back-ends are for bf16/fp16 models, this one computes in {dtype}"
    capability = torch.cuda.get_device_capability(device)
    passed_over = []
    for name, needs in _AUTO_ORDER:
        if name not in available_backends():
            passed_over.append(f"{name}: package {_OPTIONAL_BACKENDS[name][1]!r} is not installed")
        elif capability < needs:
            passed_over.append(f"{name}: needs compute capability {needs[0]}.{needs[1]}, the GPU has "
                               f"{capability[0]}.{capability[1]}")
        else:
            cosine, error = _probe(name, device, dtype)
            if cosine is not None and cosine >= PROBE_MIN_COSINE:
                return name, f"probe cosine {cosine:.5f} to sdpa"
            passed_over.append(f"{name}: " + (error or f"probe cosine {cosine:.5f} < {PROBE_MIN_COSINE}"))
    return DEFAULT_BACKEND, "; ".join(passed_over) or "no faster back-end applies"


def _probe(name: str, device: torch.device, dtype: torch.dtype) -> tuple[Optional[float], Optional[str]]:
    """(cosine similarity of back-end `name` to sdpa on a random [1, 1000, 4, 128] problem, None)
    or (None, why it failed to run)."""
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 1000, 4, 128, device=device, dtype=dtype, generator=generator) for _ in range(3))
    try:
        out = _KERNELS[name](q, k, v).float()
    except Exception as e:  # a kernel that cannot compile or launch here must not stop the model
        return None, f"failed on the probe: {type(e).__name__}: {e}"
    reference = _sdpa(q, k, v).float()
    return F.cosine_similarity(out.flatten(), reference.flatten(), dim=0).item(), None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v over [batch, tokens, heads, head_dim] tensors."""
    return _KERNELS[resolve_backend(backend or DEFAULT_BACKEND, q.device, q.dtype)](q, k, v)
