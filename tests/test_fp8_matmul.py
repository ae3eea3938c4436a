"""fp8 matmuls of FP8Linear: the per-token activation quantisation, the plain-torch twin of the
scaled matmul against the exact layer, which layers `enable_fp8_matmul` turns on, and the
exact path everywhere the fast one does not apply (CPUs: every test here)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wan_core.ops import linear
from wan_core.ops.linear import (E4M3_MAX, FP8Linear, enable_fp8_matmul, fp8_linear_reference, fp8_to_dtype,
                                 quantize_fp8, quantize_rows_fp8)


def test_rows_quantise_with_one_absmax_scale_each():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=generator) * torch.tensor([1e-3, 1, 10, 100, 1, 0.5])[:, None]
    x[4] = 0  # an all-zero row stays zeros
    stored, scale = quantize_rows_fp8(x.to(torch.bfloat16))
    assert stored.dtype == torch.float8_e4m3fn and scale.shape == (6, 1) and scale.dtype == torch.float32
    assert (stored.float()[4] == 0).all() and torch.isfinite(scale).all()
    rows = [0, 1, 2, 3, 5]
    assert (stored.float()[rows].abs().amax(dim=1) == E4M3_MAX).all()  # each row's largest value maps to 448
    back = stored.float() * scale
    # e4m3 keeps 3 mantissa bits: each value within 2^-4 of itself (relative), whatever the row's scale
    assert ((back - x.to(torch.bfloat16).float()).abs() <= x.abs() * 2 ** -4 + scale * 2 ** -9).all()


@pytest.mark.parametrize("per_row_weight_scale", [False, True])
def test_twin_is_close_to_the_exact_layer(per_row_weight_scale):
    # Stated bound: e4m3 activations and weights (3 mantissa bits each) give ~3% relative L2 on
    # random data; 4% is the limit asserted.
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50, 256, generator=generator).to(torch.bfloat16)
    weight = torch.randn(384, 256, generator=generator) / 16
    if per_row_weight_scale:
        scale = weight.abs().amax(dim=1) / E4M3_MAX
        stored = (weight / scale[:, None]).to(torch.float8_e4m3fn)
    else:
        stored, scale = quantize_fp8(weight)
    bias = torch.randn(384, generator=generator).to(torch.bfloat16)
    exact = F.linear(x.float(), fp8_to_dtype(stored, scale, torch.float32), bias.float())
    twin = fp8_linear_reference(x, stored, scale, bias)
    assert twin.shape == (3, 50, 384)
    assert ((twin - exact).norm() / exact.norm()).item() < 0.04


def _fp8_blocks(count: int) -> torch.nn.ModuleList:
    blocks = torch.nn.ModuleList()
    for _ in range(count):
        block = torch.nn.Module()
        block.e4m3 = FP8Linear(32, 32, fp8_dtype=torch.float8_e4m3fn, bias_dtype=torch.float32)
        block.e5m2 = FP8Linear(32, 32, fp8_dtype=torch.float8_e5m2, bias_dtype=torch.float32)
        blocks.append(block)
    return blocks


def test_enable_keeps_the_exact_path_without_an_fp8_gpu():
    blocks = _fp8_blocks(4)
    if linear.fp8_matmul_supported():
        pytest.skip("this machine has an fp8 GPU")
    assert enable_fp8_matmul(blocks) == 0
    assert not any(layer.fp8_matmul for layer in blocks.modules() if isinstance(layer, FP8Linear))


def test_enable_skips_the_exact_blocks_and_e5m2_weights(monkeypatch):
    # which layers are switched is plain bookkeeping: pretend the device could multiply in fp8
    monkeypatch.setattr(linear, "fp8_matmul_supported", lambda device=None: True)
    blocks = _fp8_blocks(5)
    assert enable_fp8_matmul(blocks) == 3  # blocks 1..3; 0 and -1 stay exact; e5m2 never
    assert [b.e4m3.fp8_matmul for b in blocks] == [False, True, True, True, False]
    assert not any(b.e5m2.fp8_matmul for b in blocks)
    assert enable_fp8_matmul(blocks, exact_blocks=()) == 5
    assert enable_fp8_matmul(blocks, enabled=False) == 0


def test_a_cpu_input_takes_the_exact_path_even_when_enabled():
    layer = FP8Linear(32, 16, fp8_dtype=torch.float8_e4m3fn, bias_dtype=torch.bfloat16)
    stored, scale = quantize_fp8(torch.randn(16, 32))
    layer.load_state_dict({"weight": stored, "weight_scale": scale, "bias": torch.randn(16).to(torch.bfloat16)})
    x = torch.randn(5, 32).to(torch.bfloat16)
    exact = layer(x)
    layer.fp8_matmul = True
    assert torch.equal(layer(x), exact)


def test_fast_quant_mode_loads_e4m3_weights_and_computes_like_fp8_e4m3fn_on_the_cpu(tmp_path):
    from wan_core.loading import load_dit
    from wan_core.testing.dit import dit_state_dict, tiny_dit_config

    config = tiny_dit_config("t2v")
    state_dict = dit_state_dict(config)
    fast = load_dit(state_dict, dtype=torch.float32, quant="fp8_e4m3fn_fast")
    plain = load_dit(state_dict, dtype=torch.float32, quant="fp8_e4m3fn")
    assert isinstance(fast.blocks[0].ffn[0], FP8Linear) and fast.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    x = torch.randn(1, config.in_dim, 2, 4, 4)
    context = torch.randn(1, 7, config.text_dim)
    with torch.no_grad():
        assert torch.equal(fast(x, torch.tensor([300.0]), context), plain(x, torch.tensor([300.0]), context))
