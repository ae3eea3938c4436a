"""Run by tests/test_fused_elementwise.py in a fresh process with TRITON_INTERPRET=1 (Triton reads
the flag when it is first imported): the fused elementwise kernels against the exact torch path
on the CPU, alone and inside tiny bf16 models. Prints one JSON line per case: its errors (max
|a - b| / max |b|) and, for the models, how often each kernel ran."""
from __future__ import annotations

import json
from dataclasses import replace

import torch
import torch.nn.functional as F

import wan_core.dit.model as model_module
from wan_core.dit import WanDiT
from wan_core.dit.model import LayerNorm, rope_angles
from wan_core.ops import fused
from wan_core.ops.kernels import fused_elementwise as kernels
from wan_core.testing import dit_state_dict, tiny_dit_config
from wan_core.testing.compare import bf16_agreement, max_relative_error as relative

EPS = 1e-6
BF16 = torch.bfloat16
calls = {"norm_modulate": 0, "rms_norm_rope": 0}


def _counted(name):
    kernel = getattr(kernels, name)

    def run(*args, **kwargs):
        calls[name] += 1
        return kernel(*args, **kwargs)
    return run


for _name in calls:
    setattr(kernels, _name, _counted(_name))


def norm_cases(generator: torch.Generator) -> dict:
    """x a token slice of a batch-2 residual stream, D = 384 (the kernel's 512-wide block masked)."""
    batch, tokens, dim = 2, 21, 384
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    x = randn(batch, tokens + 9, dim)[:, 4:4 + tokens] * 3 + 1
    broadcast = randn(batch, 1, 2, dim).unbind(2)  # shift, scale: one row for all tokens
    per_token = randn(batch, tokens, 6, dim).unbind(2)[:2]  # strided rows, as the block's time_mod gives
    affine = LayerNorm(dim, EPS, elementwise_affine=True)
    with torch.no_grad():
        affine.weight.copy_(1 + randn(dim) * 0.2)
        affine.bias.copy_(randn(dim) * 0.2)
    affine = affine.to(BF16)  # the model's norm3 holds weights in the model's dtype
    plain = LayerNorm(dim, EPS, elementwise_affine=False)
    y, gate = randn(batch, tokens, dim).to(BF16), randn(batch, 1, dim)
    results = {}
    for name, (shift, scale) in (("broadcast", broadcast), ("per_token", per_token)):
        want = fused.modulate(F.layer_norm(x, (dim,), eps=EPS), shift, scale)
        results[f"modulate_{name}_fp32"] = relative(kernels.norm_modulate(x, None, None, EPS, shift, scale,
                                                                          torch.float32), want)
        with fused.only_fused(()):
            want = fused.norm_modulate(x, shift, scale, norm=plain, dtype=BF16)
        results[f"modulate_{name}_bf16"] = bf16_agreement(fused.norm_modulate(x, shift, scale, norm=plain, dtype=BF16), want)
    with fused.only_fused(()):
        want = fused.norm_modulate(x, None, None, norm=affine, dtype=BF16)
    results["affine_bf16"] = bf16_agreement(fused.norm_modulate(x, None, None, norm=affine, dtype=BF16), want)

    # the self-attention's gated residual into norm3, into a new tensor
    with fused.only_fused(()):
        want_sum = torch.empty_like(x)
        want = fused.residual_norm_modulate(want_sum, x, y, gate, None, None, norm=affine, dtype=BF16)
    got_sum = torch.full_like(x, float("nan"))
    got = fused.residual_norm_modulate(got_sum, x, y, gate, None, None, norm=affine, dtype=BF16)
    results["gated_residual_sum"], results["gated_residual_bf16"] = relative(got_sum, want_sum), bf16_agreement(got, want)
    # the cross-attention's residual into norm2 + modulation, in place
    shift, scale = broadcast
    with fused.only_fused(()):
        want_sum = x.clone()
        want = fused.residual_norm_modulate(want_sum, want_sum, y, None, shift, scale, norm=plain, dtype=BF16)
    got_sum = x.clone()
    got = fused.residual_norm_modulate(got_sum, got_sum, y, None, shift, scale, norm=plain, dtype=BF16)
    results["in_place_residual_sum"], results["in_place_residual_bf16"] = (relative(got_sum, want_sum),
                                                                          bf16_agreement(got, want))
    return results


def rope_cases(generator: torch.Generator) -> dict:
    """q of 3 heads of 128 on a (3, 4, 5) grid, the rotations a token slice of the table."""
    heads, grid = 3, (3, 4, 5)
    tokens = grid[0] * grid[1] * grid[2] - 7
    angles = rope_angles(grid, 128, torch.device("cpu"))
    rotation = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)[:, None][7:]
    y = torch.randn(2, tokens, heads * 128, generator=generator) * 2
    weight = 1 + torch.randn(heads * 128, generator=generator) * 0.2
    results = {"rope_fp32": relative(kernels.rms_norm_rope(y, weight, EPS, rotation, heads),
                                     fused.apply_rope(F.rms_norm(y, weight.shape, weight, EPS).unflatten(-1, (heads, -1)),
                                                      rotation))}
    # bf16: the kernel rounds once; the exact path also rounds the normalised y to bf16 before RoPE
    y, weight = y.to(BF16), weight.to(BF16)
    truth = fused.apply_rope(F.rms_norm(y.float(), weight.shape, weight.float(), EPS).unflatten(-1, (heads, -1)), rotation)
    with fused.only_fused(()):
        plain = fused.rms_norm_rope(y, weight, EPS, rotation, heads)
    got = fused.rms_norm_rope(y, weight, EPS, rotation, heads)
    truth = truth.to(BF16)
    results.update(rope_bf16=bf16_agreement(got, truth), rope_exact_bf16=bf16_agreement(plain, truth),
                   rope_shape_ok=tuple(got.shape) == tuple(plain.shape))
    return results


def model_case(variant: str) -> dict:
    """A tiny bf16 model with and without the kernels, both against the fp32 model."""
    config = tiny_dit_config(variant)
    if variant == "s2v":
        config = replace(config, num_layers=3, audio_inject_layers=(0, 2))
    state_dict = dit_state_dict(config, seed=21)
    fp32 = WanDiT(config)
    fp32.load_state_dict(state_dict)
    fp32.eval().requires_grad_(False)
    bf16 = WanDiT(config)
    bf16.load_state_dict(state_dict)
    bf16 = bf16.to(BF16).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(5)
    batch = 1 if variant == "s2v" else 2
    grid = (2, 8, 16) if variant == "s2v" else (3, 4, 6)
    x = torch.randn(batch, 16 if variant == "s2v" else config.in_dim, *grid, generator=g)
    context = [torch.randn(n, config.text_dim, generator=g) for n in (7, 12)[:batch]]
    t, extra = torch.tensor([900.0, 250.0]), {}
    if variant == "ti2v":  # per-token timesteps: the first latent frame's tokens at t = 0
        t = torch.full((batch, 18), 812.0)
        t[:, :6] = 0
    if variant == "s2v":  # S2V's reference and motion tokens: per-segment modulation
        t = torch.tensor([637.0])
        extra = dict(ref_latent=torch.randn(1, 16, 1, *grid[1:], generator=g),
                     audio_features=torch.randn(1, 25, config.audio_dim, 4 * grid[0], generator=g),
                     motion_latent=torch.randn(1, 16, 19, *grid[1:], generator=g))
    model_module.CHUNK_TOKENS = 5  # several token chunks, chunk edges inside the segments
    before = dict(calls)
    with torch.no_grad():
        truth = fp32(x, t, context, **extra)
        with fused.only_fused(()):
            plain = bf16(x.to(BF16), t, [c.to(BF16) for c in context], **{k: v.to(BF16) for k, v in extra.items()})
        ran = {name: calls[name] - before[name] for name in calls}
        got = bf16(x.to(BF16), t, [c.to(BF16) for c in context], **{k: v.to(BF16) for k, v in extra.items()})
    return {"variant": variant, "exact_calls": ran, "fused_calls": {n: calls[n] - before[n] - ran[n] for n in calls},
            "fused_vs_fp32": relative(got, truth), "exact_bf16_vs_fp32": relative(plain, truth),
            "fused_vs_exact_bf16": relative(got, plain)}


if __name__ == "__main__":
    generator = torch.Generator().manual_seed(0)
    print(json.dumps({"case": "norm", **norm_cases(generator)}), flush=True)
    print(json.dumps({"case": "rope", **rope_cases(generator)}), flush=True)
    for variant in ("t2v", "ti2v", "s2v"):
        print(json.dumps({"case": "model", **model_case(variant)}), flush=True)
