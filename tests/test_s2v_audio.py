"""S2V audio (wan_core.audio): loading and resampling against librosa itself, the wav2vec2
encoder against transformers' own model on the same weights in every layout, the real
checkpoint's names and shapes, and each formula of docs/s2v-facts.md §3 written out."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from wan_core.audio import (MIN_SAMPLES, SAMPLE_RATE, audio_features, clip_count, encode_waveform, feature_frames,
                            frame_indices, load_audio, load_audio_encoder, wav2vec2_config, wav2vec_frames)
from wan_core.loading import convert_layout, to_layout
from wan_core.testing import AUDIO_LAYOUTS, tiny_ctc_model, write_audio_encoder_checkpoint

SEED = 4
RTOL = 1e-5


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def speech(seconds: float, rate: int = SAMPLE_RATE, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A voiced-sounding test signal [samples, channels]: a harmonic tone plus noise."""
    t = np.arange(int(round(seconds * rate))) / rate
    tone = 0.3 * np.sin(2 * np.pi * 180 * t) + 0.1 * np.sin(2 * np.pi * 540 * t)
    noise = 0.05 * np.random.default_rng(seed).standard_normal((t.size, channels))
    return (tone[:, None] + noise).astype(np.float32)


@pytest.fixture(scope="module")
def encoder():
    return tiny_ctc_model(SEED).wav2vec2.eval()


# --- the real checkpoint's names and shapes ---------------------------------------------------

def manifest_shapes(manifest_dir) -> dict[str, tuple[int, ...]]:
    tensors = json.loads((manifest_dir / "hf_wav2vec2_large_xlsr_53_english.json").read_text())["tensors"]
    return {k: tuple(shape) for k, (shape, _dtype) in tensors.items()}


def large_config():
    """wav2vec2-large-xlsr-53-english's architecture as its config.json states it."""
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                          conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True, vocab_size=33)


@pytest.mark.parametrize("naming", ["parametrizations", "weight_g/weight_v"])
def test_full_size_names_are_the_manifest_in_either_positional_conv_naming(manifest_dir, naming):
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Model

    with torch.device("meta"):
        ctc = {k: tuple(v.shape) for k, v in Wav2Vec2ForCTC(large_config()).state_dict().items()}
        model = {k: tuple(v.shape) for k, v in Wav2Vec2Model(large_config()).state_dict().items()}
    assert ctc == manifest_shapes(manifest_dir)
    names = manifest_shapes(manifest_dir)
    if naming == "weight_g/weight_v":
        encoder = {k.removeprefix("wav2vec2."): v for k, v in names.items() if k.startswith("wav2vec2.")}
        names = {"wav2vec2." + k: v for k, v in to_layout(encoder, "audio", ["weight_norm_legacy"]).items()}
        assert "wav2vec2.encoder.pos_conv_embed.conv.weight_g" in names
    canonical, layouts = convert_layout(names, "audio")
    assert layouts == (("transformers_ctc",) if naming == "parametrizations" else ("transformers_ctc", "weight_norm_legacy"))
    assert {k: v for k, v in canonical.items() if not k.startswith("lm_head.")} == model


def test_config_read_from_the_real_shapes_is_the_real_one(manifest_dir):
    """A ComfyUI file has no config.json: the architecture is read off the shapes."""
    shapes = convert_layout(manifest_shapes(manifest_dir), "audio")[0]
    got = wav2vec2_config({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    want = large_config()
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim",
                "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm", "do_stable_layer_norm",
                "num_conv_pos_embeddings", "num_conv_pos_embedding_groups"):
        assert getattr(got, key) == getattr(want, key), key


# --- the encoder against transformers' own ------------------------------------------------------

@pytest.fixture(scope="module")
def encoder_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("wav2vec2")
    return {layout: write_audio_encoder_checkpoint(root / layout, layout, seed=SEED) for layout in AUDIO_LAYOUTS}


def test_every_layout_loads_transformers_model_with_the_same_hidden_states(encoder_files):
    from transformers import Wav2Vec2ForCTC

    oracle = Wav2Vec2ForCTC.from_pretrained(encoder_files["transformers"]).eval()
    inputs = torch.from_numpy(speech(0.7)[:, 0])[None]
    with torch.no_grad():
        want = torch.cat(oracle(inputs, output_hidden_states=True).hidden_states)
        fp16 = Wav2Vec2ForCTC.from_pretrained(encoder_files["transformers"]).half().float().eval()
        want_fp16 = torch.cat(fp16(inputs, output_hidden_states=True).hidden_states)
    assert want.shape == (25, wav2vec_frames(inputs.shape[1]), 64)
    for layout, path in encoder_files.items():
        model = load_audio_encoder(path)
        assert type(model).__name__ == "Wav2Vec2Model" and model.dtype == torch.float32
        with torch.no_grad():
            got = torch.cat(model(inputs, output_hidden_states=True).hidden_states)
        # ComfyUI's file is fp16: the same model with its weights rounded to fp16
        assert relative_error(got, want_fp16 if layout == "comfy" else want) <= RTOL, layout


def test_audio_encoder_bad_inputs(encoder_files, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="not a transformers wav2vec2 folder"):
        load_audio_encoder(tmp_path)
    tensors = {k: v for k, v in load_audio_encoder(encoder_files["comfy"]).state_dict().items()
               if k != "encoder.layers.3.attention.q_proj.weight"}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match=r"broken\.safetensors .* 1 missing .*layers\.3\.attention\.q_proj"):
        load_audio_encoder(tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="holds a Wan VAE, not a wav2vec2 audio encoder"):
        from wan_core.testing import write_vae_checkpoint
        load_audio_encoder(write_vae_checkpoint(tmp_path / "vae.safetensors", "2.1", "comfy"))


# --- formulas of the facts sheet §3 ---------------------------------------------------------------

def test_wav2vec2_frame_count_formula_against_transformers():
    from transformers import Wav2Vec2Model

    model = Wav2Vec2Model(tiny_ctc_model(0).config)
    lengths = torch.arange(400, 40_000, 37)
    assert [wav2vec_frames(int(n)) for n in lengths] == model._get_feat_extract_output_lengths(lengths).tolist()
    assert all(wav2vec_frames(n) == (n - 400) // 320 + 1 for n in range(400, 20_000))


@pytest.mark.parametrize("seconds, t50, t30, clips", [
    (0.3, 14, 8, 1), (1.3, 64, 38, 1), (5.0, 249, 149, 1), (5.02, 250, 150, 2), (6.0, 299, 179, 2),
    (10.0, 499, 299, 2), (30.0, 1499, 899, 6)])
def test_audio_frame_and_clip_counts(seconds, t50, t30, clips):
    """The facts sheet's measured table (16 kHz, 80 frames per clip at 16 fps)."""
    samples = int(round(seconds * SAMPLE_RATE))
    assert wav2vec_frames(samples) == t50
    assert feature_frames(t50) == t30
    assert clip_count(t30, 80, 16) == clips


def test_30fps_count_is_the_float_formula_not_the_integer_one():
    assert feature_frames(204) == 204 * 3 // 5
    assert feature_frames(205) == 122 and 205 * 3 // 5 == 123  # the first disagreement
    disagree = sum(feature_frames(t) != t * 3 // 5 for t in range(1, 200_001))
    assert disagree == 546


def test_frame_picks_round_half_to_even():
    picks = frame_indices(80, 16)
    assert picks[12] == 22 and picks[4] == 8 and picks[20] == 38 and picks[28] == 52  # halves: even neighbour
    assert picks[1] == 2 and picks[3] == 6 and picks[5] == 9  # 1.875, 5.625, 9.375
    assert np.array_equal(picks, np.round(np.arange(80) * 1.875).astype(int))
    assert np.array_equal(frame_indices(160, 16)[:80], picks)


def test_features_pick_the_30fps_frames_and_are_zero_past_the_end(encoder):
    """0.3 s: T30 = 8 frames of audio; video frames whose pick is >= 8 get zeros (not the last frame)."""
    waveform = speech(0.3)[:, 0]
    features, clips = audio_features(encoder, waveform, SAMPLE_RATE, frames_per_clip=80)
    assert features.shape == (1, 25, 64, 80) and clips == 1 and features.dtype == torch.float32
    states = encode_waveform(encoder, waveform)
    resampled = torch.nn.functional.interpolate(states.transpose(1, 2), size=8, mode="linear",
                                                align_corners=True).transpose(1, 2)
    picks = frame_indices(80, 16)
    for i, pick in enumerate(picks):
        if pick < 8:
            assert torch.equal(features[0, :, :, i], resampled[:, pick]), i
        else:
            assert not features[0, :, :, i].any(), i
    assert (picks < 8).sum() == 4 and features[0, :, :, 3].any()  # frames 0..3 take 0, 2, 4, 6


def test_normalisation_is_biased_variance_plus_1e7(encoder):
    """What the encoder gets: (x - mean) / sqrt(var + 1e-7), var with 1/N (the reference's
    Wav2Vec2FeatureExtractor), so an offset and a gain change nothing."""
    waveform = speech(0.5)[:, 0]
    a = encode_waveform(encoder, waveform)
    b = encode_waveform(encoder, 3 * waveform + 0.2)
    assert relative_error(b, a) < 1e-4
    x = waveform.astype(np.float64)
    normalised = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    with torch.no_grad():
        c = torch.cat(encoder(torch.from_numpy(normalised).float()[None], output_hidden_states=True).hidden_states)
    assert relative_error(a, c) < 1e-5


def test_clips_of_a_longer_audio(encoder):
    """5.02 s -> 2 clips of 80 (the second mostly past the audio: zeros there)."""
    features, clips = audio_features(encoder, speech(5.02)[:, 0], SAMPLE_RATE, frames_per_clip=80)
    assert clips == 2 and features.shape[-1] == 160
    assert features[..., :80].abs().sum(dim=(0, 1, 2)).min() > 0
    assert features[..., 81:].abs().sum() == 0  # frame 80 takes pick 150 = T30: past the end


# --- loading and resampling -------------------------------------------------------------------------

def test_stereo_44k_file_matches_librosa_and_the_comfy_audio_dict(tmp_path):
    import librosa

    stereo = speech(1.0, rate=44100, channels=2)
    stereo[:, 1] *= 0.3
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 44100, subtype="FLOAT")
    from_file = load_audio(path)
    assert from_file.dtype == np.float32 and from_file.shape == (16000,)
    assert np.array_equal(from_file, librosa.load(path, sr=16000)[0])  # the reference's call
    # channels are averaged before resampling (soxr HQ, librosa's default)
    assert np.allclose(from_file, librosa.resample(stereo.mean(axis=1), orig_sr=44100, target_sr=16000), atol=1e-6)
    comfy = {"waveform": torch.from_numpy(stereo.T.copy())[None], "sample_rate": 44100}
    assert np.allclose(load_audio(comfy), from_file, atol=1e-6)
    assert np.allclose(load_audio((stereo.T, 44100)), from_file, atol=1e-6)
    mono16 = speech(0.5)[:, 0]
    assert np.array_equal(load_audio((torch.from_numpy(mono16), 16000)), mono16)  # nothing to do


def test_silent_and_very_short_audio(encoder, caplog):
    with caplog.at_level(logging.WARNING, logger="wan_core"):
        features, clips = audio_features(encoder, np.zeros(8000, np.float32), SAMPLE_RATE, frames_per_clip=80)
    assert "silent" in caplog.text and clips == 1 and torch.isfinite(features).all()
    features, clips = audio_features(encoder, speech(0.1)[:, 0], SAMPLE_RATE, frames_per_clip=80)
    assert clips == 1 and features[..., :2].abs().sum() > 0 and features[..., 2:].abs().sum() == 0
    with pytest.raises(ValueError, match=r"the audio is 0\.020 s long; speech-to-video needs at least 0\.045 s"):
        audio_features(encoder, speech(0.02)[:, 0], SAMPLE_RATE)
    assert MIN_SAMPLES == 720


@pytest.mark.parametrize("source, error, message", [
    (None, ValueError, "no audio: speech-to-video needs the speech"),
    ({"waveform": torch.zeros(2, 1, 100), "sample_rate": 16000}, ValueError, "a batch of 2 clips"),
    ({"waveform": torch.zeros(1, 100)}, ValueError, "needs 'waveform'"),
    ((np.zeros(0, np.float32), 16000), ValueError, "holds no audio samples"),
    ((np.full(100, np.nan, np.float32), 16000), ValueError, "NaN or infinite"),
    ((np.zeros(100, np.float32), 0), ValueError, "sample_rate must be a positive"),
    ((np.zeros(100, np.int16), 16000), TypeError, "float tensor or array"),
    (3.5, TypeError, "audio must be a file path"),
])
def test_bad_audio_gets_clear_errors(source, error, message):
    with pytest.raises(error, match=message):
        load_audio(source)


def test_unreadable_and_missing_audio_files(tmp_path):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00garbage, not audio")
    with pytest.raises(ValueError, match=r"broken\.wav is not a readable audio file"):
        load_audio(broken)
    with pytest.raises(FileNotFoundError, match="audio file not found"):
        load_audio(tmp_path / "absent.wav")
