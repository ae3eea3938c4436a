"""WanDiT against diffusers' WanTransformer3DModel (the oracle) on the same random weights, fp32.

The tiny configs keep the real head size (128) and channel counts, so RoPE's split of the head
over (frames, height, width), the text padding to 512 and the per-token timesteps are the real
ones; only width and depth are small.
"""
from __future__ import annotations

import pytest
import torch

from wan_core.dit import WanDiT
from wan_core.loading import to_layout
from wan_core.ops.attention import available_backends
from wan_core.testing import dit_state_dict, tiny_dit_config

RTOL = 1e-5  # fp32: max |ours - diffusers| / max |diffusers|
GRID = (3, 4, 6)  # latent frames, height, width -> 3 * 2 * 3 = 18 tokens


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def diffusers_twin(config, state_dict):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=config.patch_size, num_attention_heads=config.num_heads, attention_head_dim=config.head_dim,
        in_channels=config.in_dim, out_channels=config.out_dim, text_dim=config.text_dim,
        freq_dim=config.freq_dim, ffn_dim=config.ffn_dim, num_layers=config.num_layers,
        cross_attn_norm=config.cross_attn_norm, qk_norm="rms_norm_across_heads", eps=config.eps)
    model.load_state_dict(to_layout(state_dict, "dit", ["diffusers"]), strict=True)
    return model.eval()


def our_model(config, state_dict):
    model = WanDiT(config)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def sample_inputs(config, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y_channels = config.in_dim - 16 if config.model_type == "i2v" else 0
    x = torch.randn(batch, config.in_dim - y_channels, *GRID, generator=g)
    y = torch.randn(batch, y_channels, *GRID, generator=g) if y_channels else None
    lengths = [7, 12][:batch]
    context = [torch.randn(n, config.text_dim, generator=g) for n in lengths]
    return x, y, context


def padded(context, text_len):
    return torch.stack([torch.cat([c, c.new_zeros(text_len - c.shape[0], c.shape[1])]) for c in context])


@pytest.mark.parametrize("variant", ["t2v", "i2v", "ti2v"])
def test_matches_diffusers(variant):
    config = tiny_dit_config(variant)
    state_dict = dit_state_dict(config, seed=11)
    ours, theirs = our_model(config, state_dict), diffusers_twin(config, state_dict)
    x, y, context = sample_inputs(config, batch=2)
    t = torch.tensor([999.0, 437.0])
    with torch.no_grad():
        got = ours(x, t, context, y=y)
        hidden = x if y is None else torch.cat([x, y], dim=1)
        expected = theirs(hidden, t, padded(context, config.text_len), return_dict=False)[0]
    assert got.shape == expected.shape == (2, config.out_dim, *GRID)
    assert relative_error(got, expected) <= RTOL


def test_ti2v_per_token_timesteps_match_diffusers():
    """TI2V image-to-video: the first latent frame's tokens get t = 0, the rest the step's t."""
    config = tiny_dit_config("ti2v")
    state_dict = dit_state_dict(config, seed=12)
    ours, theirs = our_model(config, state_dict), diffusers_twin(config, state_dict)
    x, _, context = sample_inputs(config, batch=2, seed=1)
    tokens_per_frame = GRID[1] * GRID[2] // 4
    t = torch.full((2, GRID[0] * tokens_per_frame), 812.0)
    t[:, :tokens_per_frame] = 0
    t[1] = 305.0 * (t[1] > 0)
    with torch.no_grad():
        got = ours(x, t, context)
        expected = theirs(x, t, padded(context, config.text_len), return_dict=False)[0]
        uniform = ours(x, torch.tensor([812.0, 305.0]), context)
    assert relative_error(got, expected) <= RTOL
    assert relative_error(got, uniform) > 1e-3  # the per-token timesteps really are used


def test_context_as_padded_tensor_or_list_is_the_same():
    config = tiny_dit_config("t2v")
    model = our_model(config, dit_state_dict(config, seed=2))
    x, _, context = sample_inputs(config, batch=2)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        assert torch.equal(model(x, t, context), model(x, t, padded(context, config.text_len)))


def test_bf16_weights_stay_close_to_fp32():
    """bf16 weights and matmuls with the reference's float32 time embedding, modulation,
    residual stream and head: the output stays within bf16 noise of the fp32 model."""
    config = tiny_dit_config("t2v")
    state_dict = dit_state_dict(config, seed=4)
    fp32, bf16 = our_model(config, state_dict), our_model(config, state_dict).to(torch.bfloat16)
    x, _, context = sample_inputs(config, batch=1)
    with torch.no_grad():
        a = fp32(x, torch.tensor([700.0]), context)
        b = bf16(x.bfloat16(), torch.tensor([700.0]), [c.bfloat16() for c in context])
    assert b.dtype == torch.float32
    assert relative_error(b, a) < 0.05


def _i2v_args(**changes):
    args = dict(x=torch.zeros(1, 16, 3, 4, 6), y=torch.zeros(1, 20, 3, 4, 6), t=torch.tensor([1.0]),
                context=[torch.zeros(4, 24)])
    return {**args, **changes}


@pytest.mark.parametrize("args, message", [
    (_i2v_args(y=None), "takes 36 input channels (x and y together), got 16; i2v models also need y"),
    (_i2v_args(y=torch.zeros(1, 20, 2, 4, 6)), "must match x"),
    (_i2v_args(x=torch.zeros(1, 16, 3, 5, 6), y=torch.zeros(1, 20, 3, 5, 6)), "multiples of the patch size"),
    (_i2v_args(t=torch.zeros(1, 5)), "t must be [B] or [B, tokens]"),
    (_i2v_args(context=[torch.zeros(513, 24)]), "[L <= 512, 24]"),
    (_i2v_args(context=[torch.zeros(4, 24)] * 2), "2 prompts for a batch of 1"),
])
def test_bad_inputs_get_clear_errors(args, message):
    config = tiny_dit_config("i2v")
    model = our_model(config, dit_state_dict(config, seed=0))
    with pytest.raises(ValueError) as error:
        model(args["x"], args["t"], args["context"], y=args["y"])
    assert message in str(error.value)


def test_attention_backends():
    config = tiny_dit_config("t2v")
    model = WanDiT(config)
    assert "sdpa" in available_backends()
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        model.set_attention_backend("xformers")
    for name, package in (("flash_attn", "flash-attn"), ("sageattention", "sageattention")):
        if name in available_backends():
            continue
        with pytest.raises(ValueError, match=f"needs the '{package}' package.*pip install {package}"):
            model.set_attention_backend(name)


@pytest.mark.parametrize("variant", ["t2v", "ti2v"])
def test_token_chunks_keep_the_numbers(variant, monkeypatch):
    """At large token counts the row-wise work runs in chunks of CHUNK_TOKENS (less activation
    memory); chunked, the model still matches diffusers and its unchunked self (per-token
    timesteps included). 18 tokens in chunks of 5: 5 + 5 + 5 + 3. Chunked and whole differ by
    float32 rounding only (MKL blocks matmuls of other row counts differently)."""
    import wan_core.dit.model as model_module

    config = tiny_dit_config(variant)
    state_dict = dit_state_dict(config, seed=13)
    ours, theirs = our_model(config, state_dict), diffusers_twin(config, state_dict)
    x, _, context = sample_inputs(config, batch=2, seed=2)
    t = torch.tensor([900.0, 250.0]) if variant == "t2v" else torch.linspace(0, 900, 36).view(2, 18)
    with torch.no_grad():
        whole = ours(x, t, context)
        monkeypatch.setattr(model_module, "CHUNK_TOKENS", 5)
        chunked = ours(x, t, context)
        expected = theirs(x, t, padded(context, config.text_len), return_dict=False)[0]
    assert relative_error(chunked, whole) <= 5e-6
    assert relative_error(chunked, expected) <= RTOL
