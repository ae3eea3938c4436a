"""S2V against the reference's own code: its WanModel_S2V forward and its audio feature
recipe (AudioEncoder.extract_audio_feat + get_audio_embed_bucket_fps), fp32, same weights.

The official Wan2.2 code is on no registry: set WAN22_OFFICIAL_CODE to a checkout (the folder
holding wan/; the tests import only its model and audio modules, see
wan_core.testing.official). Without it these tests skip.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch

from wan_core.testing import dit_state_dict, tiny_ctc_model, tiny_dit_config
from wan_core.testing.official import OFFICIAL_CODE_ENV, build_official_s2v, official_s2v_class, official_s2v_forward

CHECKOUT = os.environ.get(OFFICIAL_CODE_ENV)
pytestmark = pytest.mark.skipif(not CHECKOUT, reason=f"set {OFFICIAL_CODE_ENV} to a checkout of the official Wan2.2 "
                                                     f"code to compare with the reference's S2V model")
RTOL = 1e-5

CONFIGS = {
    "14B injection list, 40 blocks": tiny_dit_config("s2v"),
    "5 blocks [0, 2, 4]": replace(tiny_dit_config("s2v"), num_layers=5, audio_inject_layers=(0, 2, 4)),
    # the reference's substring quirk: [0, 1, 4] over 12 blocks builds 5 injectors
    "12 blocks [0, 1, 4]": replace(tiny_dit_config("s2v"), num_layers=12, audio_inject_layers=(0, 1, 4)),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("case", ["later clip with pose", "first clip without pose", "7 motion latents"])
def test_forward_matches_the_reference_model(name, case):
    from wan_core.dit import WanDiT

    config = CONFIGS[name]
    state_dict = dit_state_dict(config, seed=3)
    ours = WanDiT(config)
    ours.load_state_dict(state_dict)
    ours.eval()
    theirs = build_official_s2v(CHECKOUT, config, state_dict)
    g = torch.Generator().manual_seed(1)
    frames, height, width = 3, 8, 16
    x = torch.randn(1, 16, frames, height, width, generator=g)
    args = dict(ref_latent=torch.randn(1, 16, 1, height, width, generator=g),
                motion_latent=torch.randn(1, 16, 7 if case == "7 motion latents" else 19, height, width, generator=g),
                pose_latent=torch.randn(1, 16, frames, height, width, generator=g),
                audio_features=torch.randn(1, 25, config.audio_dim, 4 * frames, generator=g))
    if case == "first clip without pose":
        args.update(motion_latent=None, pose_latent=None)
    context = [torch.randn(7, config.text_dim, generator=g)]
    t = torch.tensor([637])
    with torch.no_grad():
        got = ours(x, t, context, **args)
        want = official_s2v_forward(theirs, x, t, context, **args)
    error = ((got - want).abs().max() / want.abs().max()).item()
    assert error <= RTOL, error


@pytest.mark.parametrize("seconds, rate, channels, frames_per_clip", [
    (0.3, 16000, 1, 80), (1.3, 44100, 2, 80), (5.0, 16000, 1, 80), (5.02, 22050, 1, 80), (6.0, 48000, 2, 48)])
def test_audio_features_match_the_reference_recipe(tmp_path, seconds, rate, channels, frames_per_clip):
    from transformers import Wav2Vec2FeatureExtractor

    from wan_core.audio import audio_features, load_audio

    official_s2v_class(CHECKOUT)  # sets up the stand-in packages
    reference = importlib.import_module("wan.modules.s2v.audio_encoder").AudioEncoder.__new__(
        importlib.import_module("wan.modules.s2v.audio_encoder").AudioEncoder)
    # what its __init__ loads from the folder: the processor (feature extractor part) and the CTC model
    reference.processor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                                   do_normalize=True, return_attention_mask=True)
    reference.model = tiny_ctc_model(4)
    reference.video_rate = 30
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    signal = 0.3 * np.sin(2 * np.pi * 220 * t)[:, None] + 0.05 * np.random.default_rng(0).standard_normal((n, channels))
    path = tmp_path / "speech.wav"
    sf.write(path, signal.astype(np.float32), rate, subtype="PCM_16")
    states = reference.extract_audio_feat(str(path), return_all_layers=True)
    bucket, clips = reference.get_audio_embed_bucket_fps(states, fps=16, batch_frames=frames_per_clip, m=0)
    want = bucket.unsqueeze(0).permute(0, 2, 3, 1)
    got, our_clips = audio_features(tiny_ctc_model(4).wav2vec2, load_audio(path), 16000,
                                    frames_per_clip=frames_per_clip)
    assert our_clips == clips and got.shape == want.shape
    assert torch.equal(got, want.float())
