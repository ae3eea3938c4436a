"""A linear layer whose weight stays in fp8 with one scale, upcast for each matmul or multiplied
in fp8.

The real weight is `stored * scale` (the convention of ComfyUI's fp8 files): `stored` is a
float8 tensor, `scale` a float32 scalar (or one value per output row). By default the weight is
rebuilt in the activations' dtype right before the matmul (exact), so only the layer being run
holds a full-precision copy; the parameters themselves take one byte per value.

With `fp8_matmul` on (`enable_fp8_matmul`), a bf16 input on a GPU with fp8 matrix units
(compute capability >= 8.9) is instead quantised to e4m3 per token (one absmax scale per row)
and multiplied with the stored weight by `torch._scaled_mm` (cuBLASLt/CUTLASS, row-wise scales,
float32 accumulation, bias and both scales applied in the epilogue). Under torch.compile the
quantisation fuses with the elementwise work before it. `fp8_linear_reference` is its
plain-torch twin.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
E4M3_MAX = 448.0
# Blocks `enable_fp8_matmul` leaves on the exact path by default: the first and the last, as
# peers do (they see the raw patch embedding and feed the head).
EXACT_BLOCKS = (0, -1)

log = logging.getLogger("wan_core")


def fp8_to_dtype(stored: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The real weight `stored * scale` in `dtype`.

    The product is formed in float32 and rounded once to `dtype`, so a bf16 result does not
    also carry the rounding error of a bf16 scale. Every fp8 dequantization in the package
    goes through here, which keeps an fp8-kept model and a dequantized one bit-identical.
    """
    if scale.ndim == 1 and stored.ndim > 1 and scale.numel() == stored.shape[0]:
        scale = scale.reshape(-1, *([1] * (stored.ndim - 1)))  # one scale per output row
    return (stored.to(torch.float32) * scale.to(device=stored.device, dtype=torch.float32)).to(dtype)


def quantize_fp8(weight: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmax quantization: returns (stored fp8, float32 scalar scale)."""
    if fp8_dtype not in FP8_DTYPES:
        raise ValueError(f"fp8 dtype must be one of {FP8_DTYPES}, got {fp8_dtype}")
    w = weight.to(torch.float32)
    absmax = w.abs().max()
    # an all-zero weight keeps scale 1 so that dequantization gives zeros, not NaN
    fp8_max = torch.finfo(fp8_dtype).max
    scale = torch.where(absmax > 0, absmax / fp8_max, torch.ones_like(absmax))
    # w / scale can round a hair past the largest fp8 value; clamp rather than rely on how
    # a given torch build casts out-of-range values
    return (w / scale).clamp(-fp8_max, fp8_max).to(fp8_dtype), scale


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax quantisation of a 2-D `x` to e4m3: (stored [M, K], float32 scale [M, 1])."""
    absmax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = absmax.clamp(min=1e-12) / E4M3_MAX  # an all-zero row gets zeros, not NaN
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def _row_scales(weight_scale: torch.Tensor, out_features: int) -> torch.Tensor:
    return weight_scale.float().reshape(1, -1).expand(1, out_features).contiguous()


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x @ (weight * weight_scale)^T + bias with the product in fp8: x (bf16, on a GPU with fp8
    matrix units) quantised per row, `weight` the stored e4m3 [out, in]. Returns bf16."""
    quantized, scale = quantize_rows_fp8(x.reshape(-1, x.shape[-1]))
    out = torch._scaled_mm(quantized, weight.t(), scale_a=scale, scale_b=_row_scales(weight_scale, weight.shape[0]),
                           bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The twin of `fp8_linear` in plain torch on any device: the same quantised operands, the
    product in float32. Returns float32."""
    quantized, scale = quantize_rows_fp8(x.reshape(-1, x.shape[-1]))
    out = (quantized.float() * scale) @ (weight.float() * _row_scales(weight_scale, weight.shape[0]).t()).t()
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*x.shape[:-1], weight.shape[0])


def fp8_matmul_supported(device: Optional[torch.device] = None) -> bool:
    """Whether `device` (default: the current CUDA device) multiplies in fp8: compute capability
    >= 8.9 (Ada, Hopper and later)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Linear(nn.Module):
    """`nn.Linear` with an fp8 `weight`, a float32 `weight_scale` buffer and a `bias` kept in
    the model's dtype. Forward computes in the dtype of its input; with `fp8_matmul` set, bf16
    inputs on a CUDA device multiply in fp8 (`fp8_linear`) when the weight is e4m3."""

    fp8_matmul = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 fp8_dtype: torch.dtype = torch.float8_e4m3fn, bias_dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if fp8_dtype not in FP8_DTYPES:
            raise ValueError(f"fp8_dtype must be one of {FP8_DTYPES}, got {fp8_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=fp8_dtype, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_matmul and x.is_cuda and x.dtype == torch.bfloat16 and self.weight.dtype == torch.float8_e4m3fn:
            return fp8_linear(x, self.weight, self.weight_scale, self.bias)
        weight = fp8_to_dtype(self.weight, self.weight_scale, x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fp8_dtype={self.weight.dtype}, fp8_matmul={self.fp8_matmul}")


def enable_fp8_matmul(blocks: Sequence[nn.Module], *, exact_blocks: Sequence[int] = EXACT_BLOCKS,
                      enabled: bool = True) -> int:
    """Turn the fp8 matmul of every e4m3 `FP8Linear` in `blocks` on (or off with enabled=False),
    except in `exact_blocks` (indices, negative from the end), which keep the exact path. Does
    nothing where the CUDA device cannot multiply in fp8. Returns the number of layers on it."""
    supported = fp8_matmul_supported()
    if enabled and not supported:
        log.info("fp8 matmul: no CUDA device with compute capability >= 8.9; fp8 weights are upcast per matmul")
    exact = {i % len(blocks) for i in exact_blocks} if len(blocks) else set()
    count = 0
    for index, block in enumerate(blocks):
        for layer in block.modules():
            if isinstance(layer, FP8Linear) and layer.weight.dtype == torch.float8_e4m3fn:
                layer.fp8_matmul = enabled and supported and index not in exact
                count += layer.fp8_matmul
    return count


def convert_linears_to_fp8(module: nn.Module, *, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                           bias_dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Replace every `nn.Linear` inside `module` by an empty `FP8Linear` of the same shape on the
    same device (use on a meta-device model, then load weights). Returns the replaced names."""
    replaced = []
    for name, child in list(module.named_modules()):
        if type(child) is not nn.Linear:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, FP8Linear(child.in_features, child.out_features, child.bias is not None,
                                        fp8_dtype=fp8_dtype, bias_dtype=bias_dtype, device=child.weight.device))
        replaced.append(name)
    return replaced
