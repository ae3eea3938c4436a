"""The S2V DiT plug-in: the real checkpoint's names, every layout loading the same model, the
config.json that decides the injectors, fp8 and weight patches, and each model formula of
docs/s2v-facts.md §4 written out (audio prefix and causality, RoPE positions of the reference
and motion tokens, two-column time modulation, the pose bias, the adaLN against diffusers').
The whole forward against the reference's own code: tests/test_s2v_reference.py."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from wan_core.configs import TASKS
from wan_core.dit import WanDiT
from wan_core.dit.model import WanBlock, rope_angles
from wan_core.dit.s2v import (ADALN_EPS, AudioAdaLN, S2VForward, injector_count, injector_of_block, motion_positions,
                              reference_positions)
from wan_core.loading import convert_layout, detect_dit_config, load_dit, read_state_dict, split_fp8
from wan_core.ops.linear import FP8Linear
from wan_core.testing import S2V_LAYOUTS, dit_state_dict, layout_state_dict, tiny_dit_config, write_dit_checkpoint

SEED = 11
RTOL = 1e-5
S2V = TASKS["s2v-14B"].dit
# Formula tests run a 5-block model (injectors after 0, 2, 4, as an official folder's config.json
# can say); files without a config.json need the 14B's 40 blocks (tiny_dit_config("s2v")).
SMALL = replace(tiny_dit_config("s2v"), num_layers=5, audio_inject_layers=(0, 2, 4))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def our_model(config=SMALL, seed: int = SEED) -> WanDiT:
    model = WanDiT(config)
    model.load_state_dict(dit_state_dict(config, seed=seed))
    return model.eval().requires_grad_(False)


def inputs(config, frames: int = 2, height: int = 8, width: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(1, 16, frames, height, width, generator=g), t=torch.tensor([637]),
                context=[torch.randn(5, config.text_dim, generator=g)],
                ref_latent=torch.randn(1, 16, 1, height, width, generator=g),
                audio_features=torch.randn(1, 25, config.audio_dim, 4 * frames, generator=g),
                motion_latent=torch.randn(1, 16, 19, height, width, generator=g),
                pose_latent=torch.randn(1, 16, frames, height, width, generator=g))


def run(model, **changes) -> torch.Tensor:
    args = {**inputs(model.config), **changes}
    with torch.no_grad():
        return model(args.pop("x"), args.pop("t"), args.pop("context"), **args)


@pytest.fixture(scope="module")
def model() -> WanDiT:
    return our_model()


# --- the real checkpoint ------------------------------------------------------------------------

def manifest_shapes(manifest_dir) -> dict[str, tuple[int, ...]]:
    tensors = json.loads((manifest_dir / "official_s2v_14B.json").read_text())["tensors"]
    return {k: tuple(shape) for k, (shape, _dtype) in tensors.items()}


def test_full_size_model_names_and_shapes_are_the_manifest(manifest_dir):
    canonical = dit_state_dict(S2V, device="meta")
    expected = manifest_shapes(manifest_dir)
    assert {k: tuple(v.shape) for k, v in canonical.items()} == expected and len(expected) == 1260
    assert sum(v.numel() for v in canonical.values()) == 16_295_755_609
    for layout in S2V_LAYOUTS:
        tensors, _ = layout_state_dict(canonical, layout)
        plain, quantized = split_fp8(convert_layout(tensors, "dit")[0])
        shapes = {**{k: tuple(v.shape) for k, v in plain.items()}, **{k: tuple(s.shape) for k, (s, _) in quantized.items()}}
        assert shapes == expected, layout


def test_config_detected_from_the_real_shapes_is_the_14b(manifest_dir):
    assert detect_dit_config(manifest_shapes(manifest_dir)) == S2V


def test_injectors_by_the_reference_substring_rule():
    assert injector_of_block(S2V.audio_inject_layers, 40) == {b: i for i, b in enumerate(S2V.audio_inject_layers)}
    # measured on the reference: 12 blocks with [0, 1, 4] build 5 injectors, block 1 uses injector 4
    assert injector_count([0, 1, 4], 12) == 5 and injector_of_block([0, 1, 4], 12) == {0: 0, 1: 4, 4: 2}


# --- loading ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2v_layouts")
    return {layout: write_dit_checkpoint(root / layout, "s2v", layout, seed=SEED) for layout in S2V_LAYOUTS}


def test_every_layout_loads_the_same_model(checkpoints):
    """Bit-equal parameters from every layout (fp8: the dequantized values), and the same
    outputs (fp8: close)."""
    reference = dit_state_dict(tiny_dit_config("s2v"), seed=SEED)
    want = run(our_model(tiny_dit_config("s2v")))
    for layout, path in checkpoints.items():
        loaded = load_dit(path, dtype=torch.float32)
        assert loaded.config == tiny_dit_config("s2v"), layout
        params = loaded.state_dict()
        assert params.keys() == reference.keys(), layout
        if layout.startswith("comfy_fp8"):
            quantized = set(split_fp8(convert_layout(read_state_dict(path), "dit")[0])[1])
            assert sum(k.startswith("audio_injector.") for k in quantized) == 12 * 4  # fp8 outside the blocks too
            assert all(torch.equal(params[k], reference[k]) for k in reference if k not in quantized), layout
            if layout == "comfy_fp8_scaled":
                assert 0 < relative_error(run(loaded), want) < 0.1
        else:
            assert all(torch.equal(params[k], reference[k]) for k in reference), layout
    assert relative_error(run(load_dit(checkpoints["comfy_prefixed"], dtype=torch.float32)), want) <= RTOL


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """An official S2V folder (config.json + shards) of the 5-block model."""
    return write_dit_checkpoint(tmp_path_factory.mktemp("s2v_official") / "Wan2.2-S2V-14B", "s2v", "official",
                                config=SMALL, seed=SEED)


def test_half_precision_files_load_in_their_dtype(small_folder, model):
    want = run(model)
    for dtype in (torch.float16, torch.bfloat16):
        loaded = load_dit(small_folder, dtype=dtype)
        assert loaded.dtype == dtype
        got = run(loaded, **{k: v.to(dtype) for k, v in inputs(SMALL).items() if k in ("x", "ref_latent")})
        assert relative_error(got, want) < 0.05


def test_the_official_folders_config_decides_the_injection_layers(tmp_path, model):
    folder = write_dit_checkpoint(tmp_path / "official", "s2v", "official", config=SMALL, seed=SEED)
    loaded = load_dit(folder, dtype=torch.float32)
    assert loaded.config == SMALL and len(loaded.audio_injector.injector) == 3
    assert relative_error(run(loaded), run(model)) <= RTOL
    # the same weights after other blocks are another model
    moved = our_model(replace(SMALL, audio_inject_layers=(1, 2, 3)))
    assert relative_error(run(moved), run(model)) > 1e-3
    # weights alone do not say where the injectors go: without config.json only the 14B list
    single = tmp_path / "single.safetensors"
    from safetensors.torch import save_file

    save_file(read_state_dict(folder), str(single))
    with pytest.raises(ValueError, match=r"3 audio injectors for 5 blocks, but the S2V-14B's injection layers"):
        load_dit(single)
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, "audio_inject_layers": [0, 1, 2, 3]}))
    with pytest.raises(ValueError, match=r"its config.json's audio_inject_layers \[0, 1, 2, 3\] make 4"):
        load_dit(folder)
    (folder / "config.json").write_text(json.dumps({**settings, "enable_framepack": False}))
    with pytest.raises(ValueError, match="sets enable_framepack=False"):
        load_dit(folder)


def test_fp8_keeps_the_block_linears_and_leaves_s2v_weights_outside_the_blocks(small_folder, model):
    """quant= converts only the blocks' linears (the audio injectors are not blocks); the extra
    S2V weights are ordinary parameters of the "everything else" weight unit."""
    quantized = load_dit(small_folder, dtype=torch.float32, quant="fp8_e4m3fn")
    assert isinstance(quantized.blocks[0].self_attn.q, FP8Linear)
    assert type(quantized.audio_injector.injector[0].q) is torch.nn.Linear
    assert 0 < relative_error(run(quantized), run(model)) < 0.1
    units = quantized.weight_units()
    rest = dict(units[-1][1].named_parameters())
    assert [prefix for prefix, _, _ in units] == [f"blocks.{i}." for i in range(SMALL.num_layers)] + [""]
    assert "audio_injector.injector.0.q.weight" in rest and "frame_packer.proj_4x.weight" in rest
    assert not any(name.startswith(("audio_injector", "casual_audio_encoder", "frame_packer"))
                   for _, block, _ in units[:-1] for name, _ in block.named_parameters())


def test_weight_patches_reach_the_s2v_weights(model):
    class ZeroInjectorOutputs:
        key = "zero-injector-o"

        def patch(self, prefix, tensors):
            return {k: torch.zeros_like(v) if prefix == "" and k.startswith("audio_injector.") and ".o." in k else v
                    for k, v in tensors.items()}

    patched = our_model()
    before = run(patched)
    patched.set_weight_patches(ZeroInjectorOutputs())
    without_audio = run(patched)
    patched.set_weight_patches(None)
    assert relative_error(run(patched), before) == 0
    assert relative_error(without_audio, before) > 1e-3
    # with every injector's output zeroed the audio no longer matters
    patched.set_weight_patches(ZeroInjectorOutputs())
    silent = run(patched, audio_features=torch.zeros(1, 25, patched.config.audio_dim, 8))
    assert relative_error(silent, without_audio) <= RTOL


# --- formulas -----------------------------------------------------------------------------------

def test_audio_tokens_see_their_four_frames_behind_the_73_frame_prefix(model):
    """Latent frame k's audio tokens depend on audio frames up to 4k + 3 only, and the prefix
    (73 copies of the clip's first frame) is what makes the groups line up."""
    config = model.config
    features = torch.randn(1, 25, config.audio_dim, 16, generator=torch.Generator().manual_seed(5))
    x = torch.zeros(1, 16, 4, 8, 8)

    def tokens(f):
        prepared = S2VForward(model, x, torch.tensor([1]), torch.zeros(1, 16, 1, 8, 8), f, None, None)
        return torch.cat([prepared.audio_tokens, prepared.audio_vectors[:, :, None]], dim=2)

    base = tokens(features)
    assert base.shape == (1, 4, 6, config.dim)  # 5 tokens + the global vector per latent frame
    for j in (1, 4, 7, 13):
        bumped = features.clone()
        bumped[..., j] += 1.0
        changed = (tokens(bumped) - base).abs().amax(dim=(0, 2, 3)) > 1e-6
        assert not changed[:j // 4].any() and changed[j // 4], j  # never earlier frames; its own group
    # the prefix: without it (ComfyUI's way) the same features give other tokens
    encoded = model.casual_audio_encoder(features)
    assert encoded[0].shape[1] == 4 and relative_error(encoded[0], base[:, :, :5]) > 1e-3
    # zero features still give tokens: the convolutions' biases and the padding token
    assert tokens(torch.zeros_like(features)).abs().amax() > 0.1


def test_reference_and_motion_rope_positions():
    """The facts sheet's positions: reference frame 30; motion -1, -3, and -19/-14/-9/-4 with
    truncated linspace rows and columns (h/2 = 8: the 2x rows are 0, 2, 4, 7)."""
    frames, rows, columns = reference_positions(8, 16)
    assert frames.tolist() == [30] and rows.tolist() == list(range(8)) and columns.tolist() == list(range(16))
    (f1, r1, c1), (f2, r2, c2), (f4, r4, c4) = motion_positions(8, 16)
    assert f1.tolist() == [-1] and r1.tolist() == list(range(8)) and c1.tolist() == list(range(16))
    assert f2.tolist() == [-3] and r2.tolist() == [0, 2, 4, 7] and c2.tolist() == [0, 2, 4, 6, 8, 10, 12, 15]
    assert f4.tolist() == [-19, -14, -9, -4] and r4.tolist() == [0, 7] and c4.tolist() == [0, 5, 10, 15]


def test_the_assembled_sequence(model):
    """Token counts, the noisy tokens' RoPE equal to the base model's, the reference at 30, a
    negative position as the conjugate rotation, and the timestep-0 column for all but the noisy."""
    config = model.config
    args = inputs(config)
    prepared = S2VForward(model, args["x"], args["t"], args["ref_latent"], args["audio_features"],
                          args["motion_latent"], None)
    embedded = model.patch_embedding(args["x"]).flatten(2).transpose(1, 2)
    angles = rope_angles((2, 4, 8), config.head_dim, torch.device("cpu"))
    _, time_mod = model._time_embedding(args["t"], 1, 1)
    tokens, all_angles, mod, segments = prepared.extend(embedded, angles, time_mod, args["t"])
    per_frame = 4 * 8
    assert segments == (2 * per_frame, per_frame + per_frame * 3 // 2) and tokens.shape[1] == sum(segments)
    assert torch.equal(all_angles[:2 * per_frame], angles)
    frame_pairs = 22  # of the head's 64 channel pairs, the first 22 rotate with the frame index
    ref_angles = all_angles[2 * per_frame:3 * per_frame]
    at_30 = rope_angles((31, 4, 8), config.head_dim, torch.device("cpu"))[30 * per_frame:]
    assert torch.allclose(ref_angles, at_30)
    newest = all_angles[3 * per_frame:4 * per_frame]
    at_1 = rope_angles((2, 4, 8), config.head_dim, torch.device("cpu"))[per_frame:]
    assert torch.allclose(newest[:, :frame_pairs], -at_1[:, :frame_pairs])
    assert torch.allclose(newest[:, frame_pairs:], at_1[:, frame_pairs:])
    _, zero_mod = model._time_embedding(torch.tensor([0]), 1, 1)
    assert mod.shape == (1, 2, 6, config.dim) and torch.equal(mod[:, :1], time_mod) and torch.equal(mod[:, 1:], zero_mod)
    assert not torch.allclose(time_mod, zero_mod)


def random_block_and_inputs(config, seed: int) -> tuple:
    """A block with random weights and its inputs for 20 tokens: x, a two-row modulation (S2V's
    segments), text context and RoPE rotations."""
    block = WanBlock(config).eval()
    torch.manual_seed(seed)
    for p in block.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(1, 20, config.dim)
    mod = torch.randn(1, 2, 6, config.dim)
    context = torch.randn(1, 7, config.dim)
    rope = torch.polar(torch.ones(20, 64, dtype=torch.float64), torch.rand(20, 64, dtype=torch.float64))
    return block, x, mod, context, rope.to(torch.complex64)[:, None]


def test_segmented_modulation_is_the_per_token_one():
    """The block's per-segment modulation equals the per-token form (the TI2V path) with each
    token given its segment's vector."""
    config = tiny_dit_config("s2v")
    block, x, mod, context, rope = random_block_and_inputs(config, seed=0)
    per_token = torch.cat([mod[:, :1].expand(1, 12, 6, -1), mod[:, 1:].expand(1, 8, 6, -1)], dim=1)
    with torch.no_grad():
        assert relative_error(block(x, mod, context, rope, "sdpa", (12, 8)),
                              block(x, per_token, context, rope, "sdpa")) <= RTOL


def test_no_pose_is_a_zero_pose_latent_whose_bias_counts(model):
    none = run(model, pose_latent=None)
    zeros = run(model, pose_latent=torch.zeros(1, 16, 2, 8, 16))
    assert relative_error(none, zeros) <= 1e-6
    unbiased = our_model()
    unbiased.cond_encoder.bias.data.zero_()
    assert relative_error(run(unbiased, pose_latent=None), none) > 1e-3


def test_first_clip_has_no_motion_tokens_and_short_motion_is_padded(model):
    padded = torch.cat([torch.zeros(1, 16, 12, 8, 16), inputs(model.config)["motion_latent"][:, :, -7:]], dim=2)
    assert relative_error(run(model, motion_latent=padded[:, :, -7:]), run(model, motion_latent=padded)) <= 1e-6
    assert relative_error(run(model, motion_latent=None), run(model)) > 1e-3


def test_audio_adaln_is_diffusers_ada_layer_norm():
    from diffusers.models.attention import AdaLayerNorm

    dim = 16
    ours = AudioAdaLN(dim)
    theirs = AdaLayerNorm(embedding_dim=dim, output_dim=2 * dim, chunk_dim=1)
    torch.manual_seed(1)
    for p in ours.parameters():
        p.data.normal_(0, 0.5)
    theirs.linear.load_state_dict(ours.linear.state_dict())
    assert theirs.norm.eps == ADALN_EPS and not theirs.norm.elementwise_affine
    x, vector = torch.randn(6, 10, dim), torch.randn(6, dim)
    with torch.no_grad():
        assert relative_error(ours(x, vector), theirs(x, temb=vector)) <= RTOL


@pytest.mark.parametrize("changes, message", [
    (dict(ref_latent=None), "ref_latent must be the reference image's latent [1, 16, 1, 8, 16]"),
    (dict(audio_features=torch.zeros(1, 25, 64, 7)), "audio_features must be this clip's wav2vec2 features [1, 25, 64, 8]"),
    (dict(pose_latent=torch.zeros(1, 16, 1, 8, 16)), "pose_latent must be [1, 16, 2, 8, 16]"),
    (dict(motion_latent=torch.zeros(1, 16, 19, 8, 8)), "motion_latent must be [1, 16, 19, 8, 16]"),
    (dict(x=torch.zeros(1, 16, 2, 12, 16), ref_latent=torch.zeros(1, 16, 1, 12, 16)), "multiples of 8"),
    (dict(t=torch.zeros(1, 64)), "one timestep per sample"),
])
def test_bad_s2v_inputs_get_clear_errors(model, changes, message):
    with pytest.raises(ValueError) as error:
        run(model, **changes)
    assert message in str(error.value)


def test_s2v_inputs_to_another_model_are_refused():
    config = tiny_dit_config("t2v")
    t2v = WanDiT(config).eval()
    with pytest.raises(ValueError, match="are S2V inputs; this is a t2v model"):
        t2v(torch.zeros(1, 16, 1, 4, 4), torch.tensor([1]), [torch.zeros(3, config.text_dim)],
            ref_latent=torch.zeros(1, 16, 1, 4, 4))


def test_segments_across_token_chunks_match_one_chunk(monkeypatch):
    """The block's per-token work runs in chunks of CHUNK_TOKENS (block swap's activation
    saving); a chunk boundary inside an S2V segment and one on a segment edge give the same
    numbers as one chunk."""
    import wan_core.dit.model as dit_model

    block, x, mod, context, rope = random_block_and_inputs(tiny_dit_config("s2v"), seed=1)
    with torch.no_grad():
        whole = block(x, mod, context, rope, "sdpa", (12, 8))
        for chunk in (5, 12):
            monkeypatch.setattr(dit_model, "CHUNK_TOKENS", chunk)
            assert relative_error(block(x, mod, context, rope, "sdpa", (12, 8)), whole) <= RTOL, chunk


@pytest.mark.parametrize("pinned", [False, True])
def test_block_swap_gives_the_resident_s2v_output(pinned):
    """S2V's extra weights live outside the blocks (the resident unit); swapping the blocks
    changes nothing, whether their host copies are pinned or streamed."""
    swapped = our_model()
    resident = run(swapped)
    swapped.placement.enable_swap(range(1, SMALL.num_layers), "cpu", prefetch=1, pinned=pinned)
    assert torch.equal(run(swapped), resident)
    assert torch.equal(run(swapped, motion_latent=None, pose_latent=None),
                       run(our_model(), motion_latent=None, pose_latent=None))
