"""The Wan VAEs: parity with diffusers' AutoencoderKLWan, real names and shapes, every layout,
and clear errors for bad input."""
from __future__ import annotations

import json

import pytest
import torch

from wan_core.loading import convert_layout, to_layout
from wan_core.testing import (VAE_LAYOUTS, tiny_vae_config, vae_state_dict, write_dit_checkpoint,
                              write_text_encoder_checkpoint, write_vae_checkpoint)
from wan_core.testing.compare import PLACEMENT_TOLERANCE, max_relative_error
from wan_core.testing.vae import diffusers_vae_config
from wan_core.vae import VAE_CONFIGS, Tiling, WanVAE, detect_vae_config, load_vae

VERSIONS = ("2.1", "2.2")
PARITY_TOLERANCE = 1e-5  # max |ours - diffusers| / max |diffusers|, fp32


def rel_err(ours: torch.Tensor, oracle: torch.Tensor) -> float:
    return ((ours - oracle).abs().max() / oracle.abs().max()).item()


def tiny_vae(version: str, seed: int = 1) -> WanVAE:
    config = tiny_vae_config(version)
    vae = WanVAE(config)
    vae.load_state_dict(vae_state_dict(config, seed=seed), strict=True)
    return vae.eval()


# ------------------------------------------------------------------------------------ parity


@pytest.fixture(scope="module", params=VERSIONS)
def vae_pair(request):
    """Our tiny VAE and diffusers' AutoencoderKLWan holding the same random weights."""
    diffusers = pytest.importorskip("diffusers")
    version = request.param
    ours = tiny_vae(version)
    config = {k: v for k, v in diffusers_vae_config(ours.config).items() if not k.startswith("_")}
    oracle = diffusers.AutoencoderKLWan.from_config(config)
    oracle.load_state_dict(to_layout(ours.state_dict(), "vae", [f"diffusers_{version}"]), strict=True)
    return ours, oracle.eval()


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_matches_diffusers(vae_pair, frames):
    ours, oracle = vae_pair
    s = ours.stride[1]
    video = torch.rand(1, 3, frames, 2 * s, 3 * s, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    latent = ours.encode(video)
    with torch.no_grad():
        mu = oracle.encode(video).latent_dist.mean
    mean = torch.tensor(oracle.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(oracle.config.latents_std).view(1, -1, 1, 1, 1)
    assert latent.shape == (1, ours.z_dim, (frames - 1) // 4 + 1, 2, 3)
    assert rel_err(latent, (mu - mean) / std) <= PARITY_TOLERANCE


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_decode_matches_diffusers(vae_pair, frames):
    ours, oracle = vae_pair
    latent_frames = (frames - 1) // 4 + 1
    latent = torch.randn(1, ours.z_dim, latent_frames, 2, 3, generator=torch.Generator().manual_seed(frames))
    video = ours.decode(latent)
    mean = torch.tensor(oracle.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(oracle.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        expected = oracle.decode(latent * std + mean).sample
    s = ours.stride[1]
    assert video.shape == (1, 3, frames, 2 * s, 3 * s)
    assert video.abs().max() <= 1.0
    assert rel_err(video, expected) <= PARITY_TOLERANCE


def test_batch_items_are_independent():
    vae = tiny_vae("2.1")
    latent = torch.randn(2, 16, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    both = vae.decode(latent)
    # batched convolutions round differently, hence a tolerance rather than equality
    assert rel_err(both[1:], vae.decode(latent[1:])) <= PARITY_TOLERANCE


# ------------------------------------------------------------------------- names and shapes


def _manifest(manifest_dir, name: str) -> dict[str, tuple[int, ...]]:
    tensors = json.loads((manifest_dir / f"{name}.json").read_text())["tensors"]
    return {k: tuple(shape) for k, (shape, _dtype) in tensors.items()}


@pytest.mark.parametrize("version", VERSIONS)
def test_full_size_names_and_shapes_match_manifests(manifest_dir, version):
    with torch.device("meta"):
        vae = WanVAE(VAE_CONFIGS[version])
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    tag = version.replace(".", "_")
    assert shapes == _manifest(manifest_dir, f"official_vae_{tag}")
    assert to_layout(shapes, "vae", [f"diffusers_{version}"]) == _manifest(manifest_dir, f"diffusers_vae_{tag}")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_full_size_version_detected_from_manifest(manifest_dir, version, layout):
    shapes, found = convert_layout(_manifest(manifest_dir, f"{layout}_vae_{version.replace('.', '_')}"), "vae")
    assert found == (() if layout == "official" else (f"diffusers_{version}",))
    assert detect_vae_config(shapes) == VAE_CONFIGS[version]


# ---------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("version", VERSIONS)
def test_every_layout_loads_to_identical_outputs(tmp_path, version):
    latent = torch.randn(1, VAE_CONFIGS[version].z_dim, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    reference = tiny_vae(version, seed=0)
    expected_weights = reference.state_dict()
    expected = reference.decode(latent)
    for layout in VAE_LAYOUTS:
        vae = load_vae(write_vae_checkpoint(tmp_path / layout, version, layout), dtype=torch.float32)
        assert (vae.version, vae.z_dim, vae.stride) == (version, reference.z_dim, reference.stride)
        assert vae.state_dict().keys() == expected_weights.keys()
        assert all(torch.equal(v, expected_weights[k]) for k, v in vae.state_dict().items()), layout
        # the same weights memory-mapped from another layout: equal to MKL's alignment-dependent rounding
        assert max_relative_error(vae.decode(latent), expected) <= PLACEMENT_TOLERANCE, layout


def test_dtype_and_device_are_honoured(tmp_path):
    path = write_vae_checkpoint(tmp_path / "vae_bf16", "2.2", "comfy", dtype=torch.bfloat16)
    vae = load_vae(path, dtype=torch.bfloat16, device="cpu")
    assert vae.dtype == torch.bfloat16 and vae.device == torch.device("cpu")
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in vae.parameters())
    video = vae.decode(torch.randn(1, 48, 1, 1, 1))
    assert video.dtype == torch.float32 and video.shape == (1, 3, 1, 16, 16)
    as_fp32 = load_vae(path, dtype=torch.float32)
    assert as_fp32.dtype == torch.float32
    assert torch.equal(as_fp32.conv2.weight, vae.conv2.weight.float())


def test_load_vae_is_exported_lazily():
    import wan_core

    assert wan_core.load_vae is load_vae


# -------------------------------------------------------------------------------- bad input


def test_dit_file_is_refused(tmp_path):
    path = write_dit_checkpoint(tmp_path / "dit.safetensors", "t2v", "comfy")
    with pytest.raises(ValueError, match=r"dit\.safetensors holds a Wan diffusion transformer.*not a Wan VAE"):
        load_vae(path)


def test_text_encoder_file_is_refused(tmp_path):
    path = write_text_encoder_checkpoint(tmp_path / "umt5.pth", "official")
    with pytest.raises(ValueError, match=r"holds a umt5 text encoder, not a Wan VAE"):
        load_vae(path)


@pytest.mark.parametrize("layout", ["official", "comfy"])
def test_truncated_file_is_refused(tmp_path, layout):
    path = write_vae_checkpoint(tmp_path / "vae", "2.1", layout)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated or corrupt"):
        load_vae(path)


def test_missing_tensor_is_named():
    state_dict = vae_state_dict(tiny_vae_config("2.1"))
    del state_dict["decoder.upsamples.3.time_conv.weight"]
    with pytest.raises(ValueError, match=r"1 missing \(e\.g\. \['decoder\.upsamples\.3\.time_conv\.weight'\]\)"):
        load_vae(state_dict)


def test_fp8_dtype_is_refused():
    with pytest.raises(ValueError, match=r"dtype must be"):
        load_vae(vae_state_dict(tiny_vae_config("2.1")), dtype=torch.float8_e4m3fn)


@pytest.fixture(scope="module")
def vae21() -> WanVAE:
    return tiny_vae("2.1")


@pytest.mark.parametrize("frames, valid", [(8, "5 or 9"), (2, "1 or 5"), (0, "1")])
def test_frame_count_must_be_4n_plus_1(vae21, frames, valid):
    with pytest.raises(ValueError, match=rf"video has {frames} frames; .* 4n\+1 frames .*: use {valid}$"):
        vae21.encode(torch.zeros(1, 3, frames, 16, 16))


@pytest.mark.parametrize("height, width, message", [
    (20, 16, r"video height 20 is not a multiple of 8, the Wan2.1 VAE's spatial stride: resize or crop to 16 or 24"),
    (16, 4, r"video width 4 is not a multiple of 8, .*: resize or crop to 8$"),
])
def test_size_must_be_a_multiple_of_the_stride(vae21, height, width, message):
    with pytest.raises(ValueError, match=message):
        vae21.encode(torch.zeros(1, 3, 1, height, width))


def test_wan22_stride_is_16():
    vae = tiny_vae("2.2")
    with pytest.raises(ValueError, match=r"height 24 is not a multiple of 16, the Wan2.2 VAE's .* 16 or 32"):
        vae.encode(torch.zeros(1, 3, 1, 24, 32))


@pytest.mark.parametrize("bad, error, message", [
    (torch.zeros(1, 4, 1, 16, 16), ValueError, r"video has 4 channels in dimension 1; the Wan2.1 VAE encodes RGB"),
    (torch.zeros(3, 1, 16, 16), ValueError, r"got shape \(3, 1, 16, 16\) \(add the batch dimension: video\[None\]\)"),
    (torch.zeros(1, 3, 1, 16, 16, dtype=torch.uint8), TypeError, r"floats in \[-1, 1\], got dtype torch.uint8"),
    ([[0.0]], TypeError, r"video must be a torch.Tensor"),
])
def test_bad_video(vae21, bad, error, message):
    with pytest.raises(error, match=message):
        vae21.encode(bad)


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(1, 48, 1, 2, 2), r"latent has 48 channels but the Wan2.1 VAE takes 16; a 48-channel latent belongs "
                                  r"to the Wan2.2 VAE"),
    (torch.zeros(16, 1, 2, 2), r"latent must be \[B, 16, T, h, w\]; got shape \(16, 1, 2, 2\) \(add the batch"),
    (torch.zeros(1, 16, 0, 2, 2), r"latent has an empty dimension"),
])
def test_bad_latent(vae21, bad, message):
    with pytest.raises(ValueError, match=message):
        vae21.decode(bad)


@pytest.mark.parametrize("tiling, message", [
    (Tiling((100, 64), (16, 16)), r"Tiling tile_size height 100 is not a multiple of 8, the Wan2.1 VAE's spatial "
                                  r"stride: use 96 or 104"),
    (Tiling((64, 64), (16, 12)), r"Tiling overlap width 12 is not a multiple of 8.*: use 8 or 16"),
])
def test_tiling_must_fit_the_stride(vae21, tiling, message):
    with pytest.raises(ValueError, match=message):
        vae21.decode(torch.zeros(1, 16, 1, 2, 2), tile=tiling)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(tile_size=(64, 64), overlap=(64, 0)), ValueError, r"overlap 64 must be smaller than the tile height 64"),
    (dict(tile_size=(0, 64)), ValueError, r"positive tile sizes"),
    (dict(tile_size=64), TypeError, r"two ints \(height, width\)"),
])
def test_bad_tiling(kwargs, error, message):
    with pytest.raises(error, match=message):
        Tiling(**kwargs)
