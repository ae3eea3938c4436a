"""The fused elementwise kernels (wan_core.ops.fused): where they run, and, under Triton's
interpreter on the CPU, the kernels against the exact torch path alone (float32 output:
relative 1e-5; bf16 output: at most one unit in the last place, on under 0.1% of the values,
where float32 sums in another order round the other way) and inside tiny bf16 t2v / ti2v / S2V
models with token chunks, per-token timesteps and S2V segments (as close to the float32 model
as the exact bf16 path, within 25%)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wan_core.dit.model import LayerNorm
from wan_core.ops import fused

ROOT = Path(__file__).resolve().parent.parent
LAYERS, CHUNKS = 2, 4  # the tiny t2v / ti2v models: 18 tokens in chunks of 5


def test_exact_path_on_the_cpu_and_for_float32_models():
    x = torch.randn(1, 4, 8)
    assert not fused.applies("norm", x, torch.bfloat16)  # a CPU tensor
    if torch.cuda.is_available():
        assert not fused.applies("norm", x.cuda(), torch.float32)  # float32 models keep the exact path
    norm = LayerNorm(8, 1e-6, elementwise_affine=False)
    shift, scale = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    expected = torch.addcmul(shift, torch.nn.functional.layer_norm(x, (8,), eps=1e-6), 1 + scale).bfloat16()
    assert torch.equal(fused.norm_modulate(x, shift, scale, norm=norm, dtype=torch.bfloat16), expected)


def test_set_fused_chooses_the_kinds():
    kinds = fused.fused_kinds()
    try:
        fused.set_fused(["rope"])
        assert fused.fused_kinds() == ("rope",)
        with pytest.raises(ValueError, match="unknown fused kinds \\['layernorm'\\]"):
            fused.set_fused(["layernorm"])
    finally:
        fused.set_fused(kinds)
    assert fused.fused_kinds() == kinds


@pytest.fixture(scope="module")
def kernel_results() -> dict:
    """The kernels in Triton's interpreter, in a fresh process (the flag only takes effect when
    Triton is first imported)."""
    pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be interpreted")
    environment = {**os.environ, "TRITON_INTERPRET": "1",
                   "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "fused_kernel_check.py")], env=environment,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {r.get("variant", r["case"]): r for r in results}


def _one_rounding_apart(agreement: dict) -> bool:
    return agreement["max_ulps"] <= 1 and agreement["mismatch"] <= 1e-3


def test_norm_kernel_matches_the_exact_path(kernel_results):
    result = kernel_results["norm"]
    for name in ("modulate_broadcast_fp32", "modulate_per_token_fp32"):
        assert result[name] <= 1e-5, name
    for name in ("gated_residual_sum", "in_place_residual_sum"):  # the residual stream itself
        assert result[name] <= 1e-6, name
    for name in ("modulate_broadcast_bf16", "modulate_per_token_bf16", "affine_bf16", "gated_residual_bf16",
                 "in_place_residual_bf16"):
        assert _one_rounding_apart(result[name]), (name, result[name])


def test_rope_kernel_matches_the_exact_path(kernel_results):
    result = kernel_results["rope"]
    assert result["rope_shape_ok"]
    assert result["rope_fp32"] <= 1e-5
    # bf16: the kernel rounds the float32 result once; the exact path's extra rounding of the
    # normalised q/k before RoPE makes it the less accurate of the two
    assert _one_rounding_apart(result["rope_bf16"]), result["rope_bf16"]
    assert result["rope_exact_bf16"]["max_ulps"] >= result["rope_bf16"]["max_ulps"]


@pytest.mark.parametrize("variant", ["t2v", "ti2v", "s2v"])
def test_models_with_the_kernels_keep_the_exact_paths_accuracy(kernel_results, variant):
    result = kernel_results[variant]
    assert result["exact_calls"] == {"norm_modulate": 0, "rms_norm_rope": 0}  # set_fused(()) turns them off
    calls = result["fused_calls"]
    if variant == "s2v":  # one call per segment run of each chunk
        assert calls["norm_modulate"] > 0 and calls["rms_norm_rope"] > 0
    else:  # norm1, norm3 and norm2 per chunk; q and k per chunk
        assert calls == {"norm_modulate": 3 * LAYERS * CHUNKS, "rms_norm_rope": 2 * LAYERS * CHUNKS}
    assert result["fused_vs_fp32"] <= 1.25 * result["exact_bf16_vs_fp32"]
    assert result["fused_vs_exact_bf16"] <= 1e-2  # bf16 noise, nothing systematic


def test_residual_stream_is_token_major():
    """The blocks get (and return) [B, L, D] with contiguous rows in bf16 models too: the patch
    embedding's transposed view, upcast as it is, would leave every block's residual stream
    channel-major and keep the kernels (which need contiguous rows) from running."""
    from wan_core.dit import WanDiT
    from wan_core.testing import dit_state_dict, tiny_dit_config

    config = tiny_dit_config("t2v")
    model = WanDiT(config)
    model.load_state_dict(dit_state_dict(config, seed=3))
    model = model.to(torch.bfloat16).eval()
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: seen.append((args[0].is_contiguous(), out.is_contiguous())))
    with torch.no_grad():
        model(torch.randn(1, 16, 3, 4, 6).bfloat16(), torch.tensor([500.0]), [torch.randn(7, config.text_dim).bfloat16()])
    assert seen == [(True, True)] * config.num_layers


def test_forward_with_gradients_on_gives_the_same_numbers():
    """The residuals are written into the block's output tensor (out=, one pass); autograd
    records no out= ops, so with gradients on (weights that require them, no torch.no_grad)
    they take the in-place route: the forward still runs, with the same output."""
    from wan_core.dit import WanDiT
    from wan_core.testing import dit_state_dict, tiny_dit_config

    config = tiny_dit_config("t2v")
    model = WanDiT(config)
    model.load_state_dict(dit_state_dict(config, seed=8))
    x, context = torch.randn(1, 16, 3, 4, 6), [torch.randn(7, config.text_dim)]
    with torch.no_grad():
        expected = model(x, torch.tensor([300.0]), context)
    out = model(x, torch.tensor([300.0]), context)
    assert out.requires_grad and torch.equal(out.detach(), expected)
