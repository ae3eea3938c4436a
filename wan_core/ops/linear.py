"""A linear layer whose weight stays in fp8 with one scale, upcast for each matmul.

The real weight is `stored * scale` (the convention of ComfyUI's fp8 files): `stored` is a
float8 tensor, `scale` a float32 scalar (or one value per output row). The weight is
rebuilt in the activations' dtype right before the matmul, so only the layer being run
holds a full-precision copy; the parameters themselves take one byte per value.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


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


class FP8Linear(nn.Module):
    """`nn.Linear` with an fp8 `weight`, a float32 `weight_scale` buffer and a `bias` kept in
    the model's dtype. Forward computes in the dtype of its input."""

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
        weight = fp8_to_dtype(self.weight, self.weight_scale, x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fp8_dtype={self.weight.dtype}")


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
