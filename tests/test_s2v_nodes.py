"""The S2V nodes without ComfyUI: the audio encoder loader and Wan2.2 Speech to Video on tiny
random checkpoints under the release's file names (ComfyUI's S2V fp8 file, its wav2vec2 fp16
file). The node must produce what wan_core.pipeline.generate produces from the same models."""
from __future__ import annotations

import importlib
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from wan_core import pipeline
from wan_core.configs import S2V_NEGATIVE_PROMPT, TASKS
from wan_core.testing import (write_audio_encoder_checkpoint, write_dit_checkpoint, write_text_encoder_checkpoint,
                              write_vae_checkpoint)


pack = runpy.run_path(str(Path(__file__).with_name("test_workflows.py")))["load_pack"]()  # as ComfyUI imports it
host = importlib.import_module("comfyui_wan22_pack.nodes.host")
nodes = pack.NODE_CLASS_MAPPINGS

S2V_FILE = "wan2.2_s2v_14B_fp8_scaled.safetensors"
AUDIO_FILE = "wav2vec2_large_english_fp16.safetensors"
FRAMES, STEPS, SEED = 8, 1, 5


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2v_models")
    write_dit_checkpoint(root / "diffusion_models" / S2V_FILE, "s2v", "comfy_fp8_scaled", dtype=torch.bfloat16, seed=2)
    write_dit_checkpoint(root / "diffusion_models" / "wan2.2_ti2v_5B_fp16.safetensors", "ti2v", "comfy",
                         dtype=torch.float16, seed=3)
    write_audio_encoder_checkpoint(root / "audio_encoders" / AUDIO_FILE, "comfy", seed=4)
    write_text_encoder_checkpoint(root / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                                  "comfy_fp8_scaled", dtype=torch.bfloat16, seed=6)
    write_vae_checkpoint(root / "vae" / "wan_2.1_vae.safetensors", "2.1", "comfy", seed=7)
    return root


@pytest.fixture
def loaded(models_root, monkeypatch):
    monkeypatch.setattr(host, "_plain_folders", {})
    for kind in ("diffusion_models", "audio_encoders", "text_encoders", "vae"):
        host.set_model_folders(kind, [models_root / kind])
    model = nodes["W22ModelLoader"]().load(S2V_FILE, "fp32", "none", "sdpa")["result"][0]
    text_encoder = nodes["W22TextEncoderLoader"]().load("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "fp32", "default")[0]
    vae = nodes["W22VAELoader"]().load("wan_2.1_vae.safetensors", "fp32")["result"][0]
    audio_encoder = nodes["W22AudioEncoderLoader"]().load(AUDIO_FILE, "fp32", "cpu")[0]
    conditioning = nodes["W22TextEncode"]().encode(text_encoder, "a man speaks", S2V_NEGATIVE_PROMPT)[0]
    return dict(model=model, text_encoder=text_encoder, vae=vae, audio_encoder=audio_encoder,
                conditioning=conditioning)


def speech(seconds: float = 0.6, rate: int = 24000) -> dict:
    t = torch.arange(int(seconds * rate)) / rate
    wave = 0.3 * torch.sin(2 * torch.pi * 190 * t) * (0.7 + 0.3 * torch.sin(2 * torch.pi * 4 * t))
    return {"waveform": torch.stack([wave, 0.5 * wave])[None], "sample_rate": rate}


def ref_image() -> torch.Tensor:
    y, x = np.mgrid[0:64, 0:80] / 80
    rgb = np.stack([np.sin(6 * x) * 0.5 + 0.5, np.cos(5 * y) * 0.5 + 0.5, (x + y) / 2], axis=-1)
    return torch.from_numpy((rgb * 255).astype(np.uint8)).float()[None] / 255


def run_node(loaded, **changes):
    args = dict(model=loaded["model"], conditioning=loaded["conditioning"], vae=loaded["vae"],
                audio_encoder=loaded["audio_encoder"], audio=speech(), ref_image=ref_image(), width=64, height=64,
                num_clips=1, frames_per_clip=FRAMES, steps=STEPS, cfg=4.5, shift=3.0, seed=SEED, solver="unipc",
                init_first_frame=False, correct_audio_lead=False)
    return nodes["W22SpeechToVideo"]().run(**{**args, **changes})


def test_speech_to_video_node_is_the_library_and_returns_the_audio_cut_to_it(loaded, monkeypatch):
    reported = []
    plain = host.progress_callback

    def recording():
        callback = plain()

        def on_progress(done, total, *rest):
            reported.append((done, total))
            callback(done, total, *rest)
        return on_progress

    monkeypatch.setattr(host, "progress_callback", recording)
    images, audio = run_node(loaded)
    frames = FRAMES - 3
    assert images.shape == (frames, 64, 64, 3) and images.min() >= 0 and images.max() <= 1
    assert reported == [(1, STEPS)]
    rate = audio["sample_rate"]
    assert rate == 24000 and audio["waveform"].shape == (1, 2, round(frames / 16 * rate))
    assert torch.equal(audio["waveform"], speech()["waveform"][..., :round(frames / 16 * rate)])

    text = loaded["text_encoder"]
    video = pipeline.generate(
        TASKS["s2v-14B"], experts=loaded["model"].module, vae=loaded["vae"].vae, text_encoder=text.hosted.model,
        prompt="a man speaks", negative_prompt=S2V_NEGATIVE_PROMPT, image=ref_image()[0], audio=speech(),
        audio_encoder=loaded["audio_encoder"].model, num_clips=1, frames_per_clip=FRAMES, size=(64, 64), steps=STEPS,
        shift=3.0, guide_scale=4.5, seed=SEED, allow_any_size=True)
    assert torch.allclose(images, (video.permute(1, 2, 3, 0) + 1) / 2, atol=1e-5)


def test_speech_to_video_node_bad_inputs(loaded):
    ti2v = nodes["W22ModelLoader"]().load("wan2.2_ti2v_5B_fp16.safetensors", "fp32", "none", "sdpa")["result"][0]
    with pytest.raises(ValueError, match="needs the S2V-14B DiT"):
        run_node(loaded, model=ti2v)
    with pytest.raises(ValueError, match="frames_per_clip must be a multiple of 4"):
        run_node(loaded, frames_per_clip=10)
    with pytest.raises(TypeError, match="audio must be an AUDIO"):
        run_node(loaded, audio=torch.zeros(1, 100))
    with pytest.raises(ValueError, match=r"ref_image must be a ComfyUI IMAGE"):
        run_node(loaded, ref_image=torch.zeros(64, 64))
    with pytest.raises(TypeError, match="audio_encoder must come from Wan2.2 Audio Encoder Loader"):
        run_node(loaded, audio_encoder="wav2vec2")
    # the S2V model is not one the MoE sampler runs
    latent = {"samples": torch.zeros(1, 16, 2, 8, 8)}
    with pytest.raises(ValueError, match="this node samples t2v, i2v, ti2v models"):
        nodes["W22MoESampler"]().run(loaded["model"], loaded["conditioning"], latent, 0, 1, 3.0, 4.5, 1.0, 0.0,
                                     "unipc", 1.0)


def test_audio_encoder_loader_caches_and_explains_missing_files(loaded):
    again = nodes["W22AudioEncoderLoader"]().load(AUDIO_FILE, "fp32", "cpu")[0]
    assert again is loaded["audio_encoder"] and loaded["audio_encoder"].model.dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="not found in models/audio_encoders; put the file there"):
        nodes["W22AudioEncoderLoader"]().load("absent.safetensors", "fp32", "cpu")
    with pytest.raises(ValueError, match="device='gpu' is not one of"):
        nodes["W22AudioEncoderLoader"]().load(AUDIO_FILE, "fp32", "gpu")
