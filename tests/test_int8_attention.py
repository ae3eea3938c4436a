"""The 8-bit attention: its plain-torch twin against exact attention, the Triton kernels against
the twin under TRITON_INTERPRET=1 (Triton's interpreter runs the kernels with numpy on the CPU;
skipped where triton is not installed), and the back-end dispatch with attention="auto"."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wan_core.ops import attention as attention_ops
from wan_core.ops.int8_attention import (FP8_MAX, INT8_MAX, attention_reference, int8_fp8_attention_reference,
                                         quantize_reference, softmax_scale_log2)

ROOT = Path(__file__).resolve().parent.parent


def qkv(batch=2, q_len=200, k_len=150, heads=2, dim=128, seed=0, k_offset=3.0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, heads, dim, generator=generator)
    k = torch.randn(batch, k_len, heads, dim, generator=generator) + k_offset  # smoothing removes the offset
    v = torch.randn(batch, k_len, heads, dim, generator=generator)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def exact(q, k, v):
    return F.scaled_dot_product_attention(*(x.double().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_quantisation_is_per_block_absmax_with_smoothed_k():
    q, k, v = qkv()
    qz = quantize_reference(q, k, v, block_m=64, block_n=32)
    assert qz.q.dtype == qz.k.dtype == torch.int8 and qz.v.dtype == torch.float8_e4m3fn
    assert qz.q.shape == (2, 2, 256, 128) and qz.k.shape == (2, 2, 160, 128) and qz.v.shape == (2, 2, 128, 160)
    # one scale per block and head, the block's absmax / 127: some value in each block reaches +-127
    assert qz.q_scale.shape == (2, 2, 4) and qz.k_scale.shape == (2, 2, 5)
    assert (qz.q.view(2, 2, 4, 64, 128).abs().amax(dim=(-2, -1)) == INT8_MAX).all()
    scaled_q = q.float().transpose(1, 2) * softmax_scale_log2(128)
    dequantized = qz.q[:, :, :200].float() * qz.q_scale.repeat_interleave(64, dim=2)[:, :, :200, None]
    assert (dequantized - scaled_q).abs().max() <= qz.q_scale.max() / 2 + 1e-6
    # k is centred per head and channel before quantisation (its +3 offset is gone)
    k_dequantized = qz.k[:, :, :150].float() * qz.k_scale.repeat_interleave(32, dim=2)[:, :, :150, None]
    assert k_dequantized.mean(dim=2).abs().max() < 0.05
    # v: one e4m3 scale per head and channel, token-contiguous, padding zeros
    assert torch.allclose(qz.v_scale, v.abs().amax(dim=1) / FP8_MAX)
    assert (qz.v[..., 150:].float() == 0).all() and (qz.q[:, :, 200:] == 0).all()


def test_smoothing_k_leaves_attention_unchanged():
    q, k, v = (x.double() for x in qkv(k_offset=0.0))
    shifted = k + torch.randn(1, 1, 2, 128, dtype=torch.float64) * 5  # a per-head, per-channel offset of all keys
    assert relative(exact(q, shifted - shifted.mean(dim=1, keepdim=True), v), exact(q, shifted, v)) < 1e-12


@pytest.mark.parametrize("k_len", [150, 40, 256])
def test_twin_is_close_to_exact_attention(k_len):
    # Stated bound: 5% relative L2 on random normal q, k, v (diffuse attention, the hardest case:
    # e4m3's 3 mantissa bits cost ~2.5% each for p and v, the int8 q.k ~1%); cosine >= 0.998.
    q, k, v = qkv(k_len=k_len)
    out = int8_fp8_attention_reference(q, k, v, block_m=64, block_n=32)
    reference = exact(q, k, v)
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert relative(out, reference) < 0.05
    assert F.cosine_similarity(out.double().flatten(), reference.flatten(), dim=0) > 0.998


def test_twin_online_softmax_equals_one_pass_softmax_of_the_same_quantised_scores():
    """With one key block the online softmax is a plain softmax; with several it must agree."""
    q, k, v = qkv(k_len=96)
    one_block = attention_reference(quantize_reference(q, k, v, block_m=64, block_n=96))
    qz = quantize_reference(q, k, v, block_m=64, block_n=96)
    scores = torch.einsum("bhmd,bhnd->bhmn", qz.q.float(), qz.k.float()) * (
        qz.q_scale.repeat_interleave(64, dim=2)[..., None] * qz.k_scale[:, :, :1, None])
    p = torch.exp2(scores - scores.amax(-1, keepdim=True))
    by_hand = torch.einsum("bhmn,bhdn->bhmd", (p * FP8_MAX).to(torch.float8_e4m3fn).float(), qz.v.float())
    by_hand = (by_hand * qz.v_scale[:, :, None] / FP8_MAX / p.sum(-1, keepdim=True))[:, :, :200].transpose(1, 2)
    assert relative(one_block, by_hand) < 1e-6


@pytest.fixture(scope="module")
def kernel_results() -> dict:
    """The kernels against their twins in Triton's interpreter, in a fresh process (the
    interpreter flag only takes effect when Triton is first imported)."""
    pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be interpreted")
    cases = ("200x150", "130x40", "64x64")
    environment = {**os.environ, "TRITON_INTERPRET": "1",
                   "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "int8_kernel_check.py"), *cases], env=environment,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {f"{r['q_len']}x{r['k_len']}": r for r in results}


@pytest.mark.parametrize("case", ["200x150", "130x40", "64x64"])
def test_kernels_match_their_twins(kernel_results, case):
    result = kernel_results[case]
    for name in ("q", "k", "v", "q_scale", "k_scale", "v_scale"):
        assert result[name] is not None, f"{name}: the kernel's shape differs from the twin's"
        assert result[name] <= (1e-6 if name.endswith("scale") else 0), name  # the same roundings
    assert result["shape_ok"]
    assert result["attention_vs_twin"] < 1e-5
    assert result["bf16_output_vs_fp32"] < 1e-2  # rounding the output to bf16, nothing else


def test_auto_is_sdpa_on_the_cpu_and_explicit_8bit_needs_a_gpu():
    assert attention_ops.check_backend("auto") == "auto"
    assert attention_ops.resolve_backend("auto", "cpu", torch.bfloat16) == "sdpa"
    assert "only back-end on cpu" in attention_ops.auto_reason("cpu", torch.bfloat16)
    assert attention_ops.resolve_backend("sageattention", "cpu") == "sageattention"  # names pass through
    q, k, v = qkv(batch=1, q_len=16, k_len=16)
    assert torch.equal(attention_ops.attention(q, k, v, "auto"), attention_ops.attention(q, k, v, "sdpa"))
    if "int8_fp8_triton" in attention_ops.available_backends():
        with pytest.raises(ValueError, match="runs on CUDA GPUs; these tensors are on cpu"):
            attention_ops.attention(q, k, v, "int8_fp8_triton")
    else:
        with pytest.raises(ValueError, match="pip install triton"):
            attention_ops.check_backend("int8_fp8_triton")


def test_model_defaults_to_auto_and_runs_sdpa_on_the_cpu():
    from wan_core.dit import WanDiT
    from wan_core.testing.dit import dit_state_dict, tiny_dit_config

    config = tiny_dit_config("t2v")
    model = WanDiT(config)
    model.load_state_dict(dit_state_dict(config))
    assert model.attention_backend == "auto"
    x = torch.randn(1, config.in_dim, 2, 4, 4)
    context = torch.randn(1, 7, config.text_dim)
    with torch.no_grad():
        auto = model(x, torch.tensor([500.0]), context)
        model.set_attention_backend("sdpa")
        assert torch.equal(model(x, torch.tensor([500.0]), context), auto)
    assert not math.isnan(auto.abs().sum().item())
