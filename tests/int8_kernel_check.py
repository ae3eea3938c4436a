"""Run by tests/test_int8_attention.py in a fresh process with TRITON_INTERPRET=1 (Triton reads
the flag when it is first imported): the 8-bit attention kernels against their plain-torch
twins on the CPU. Prints one JSON line per case."""
from __future__ import annotations

import json
import sys

import torch
from triton.runtime import interpreter

from wan_core.ops.int8_attention import attention_reference, quantize_reference
from wan_core.ops.kernels import int8_fp8_attention as kernels

_patch = getattr(interpreter, "_patch_lang_tensor", None)
if _patch is not None:
    # Triton 3.6's interpreter turns loop bounds into ints with int(array([n])), which NumPy
    # >= 2.4 refuses; index through .item() instead (the same value)
    def _patched(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))
    interpreter._patch_lang_tensor = _patched


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(q_len: int, k_len: int) -> dict:
    generator = torch.Generator().manual_seed(q_len + k_len)
    q, k, v = (torch.randn(2, n, 2, 128, generator=generator) for n in (q_len, k_len, k_len))
    q, k, v = q.to(torch.bfloat16), (k + 3).to(torch.bfloat16), v.to(torch.bfloat16)
    twin = quantize_reference(q, k, v, block_m=64, block_n=32)
    kernel = kernels.quantize(q, k, v, block_m=64, block_n=32)
    result = {"q_len": q_len, "k_len": k_len}
    for name in ("q", "k", "v", "q_scale", "k_scale", "v_scale"):
        got, want = getattr(kernel, name).float(), getattr(twin, name).float()
        result[name] = None if got.shape != want.shape else (got - want).abs().max().item()
    out = kernels.attention(twin, torch.float32)
    result["shape_ok"] = tuple(out.shape) == tuple(q.shape)
    result["attention_vs_twin"] = relative(out, attention_reference(twin))
    result["bf16_output_vs_fp32"] = relative(kernels.attention(twin, torch.bfloat16), out)
    return result


if __name__ == "__main__":
    for q_len, k_len in (tuple(map(int, case.split("x"))) for case in sys.argv[1:]):
        print(json.dumps(check(q_len, k_len)), flush=True)
