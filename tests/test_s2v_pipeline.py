"""S2V generation end to end on tiny official-layout weights (wan_core.pipeline.s2v), the CLI,
and the preprocessing formulas of docs/s2v-facts.md §5: the size search, the reference image's
resize and black bars, pose sampling at 30 fps, the clip and frame counts, seed + r, CFG with
zeroed audio, the first-clip trim and the motion buffer, init_first_frame, and bad input."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from wan_core.configs import TASKS
from wan_core.pipeline import (GenerationInterrupted, audio_for_video, generate, load_task_models, pose_frame_indices,
                               pose_pixels, reference_pixels, s2v_size)
from wan_core.testing import tiny_dit_config

TASK = TASKS["s2v-14B"]
SMALL = replace(tiny_dit_config("s2v"), num_layers=5, audio_inject_layers=(0, 2, 4))
F = 8        # frames per clip
STEPS = 2
AREA = (64, 64)


def write_speech(path, seconds: float, rate: int = 22050, channels: int = 2):
    t = np.arange(int(round(seconds * rate))) / rate
    tone = 0.3 * np.sin(2 * np.pi * 200 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    sf.write(path, np.stack([tone * (1 - 0.3 * c) for c in range(channels)], axis=1).astype(np.float32), rate)
    return path


def write_reference(path, width: int = 80, height: int = 64):
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([np.sin(7 * x) * 0.5 + 0.5, np.cos(4 * y) * 0.5 + 0.5, (x + y) / 2], axis=-1)
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def s2v_folder(tmp_path_factory):
    """An official Wan2.2-S2V-14B folder: the 5-block DiT (its config.json names the injection
    layers), umt5, the Wan2.1 VAE and the wav2vec2 folder, tiny and random."""
    from wan_core.demo import _tiny_configs, write_tiny_task_folder

    configs = _tiny_configs()
    configs["dit"] = {**configs["dit"], "s2v": SMALL}
    return write_tiny_task_folder(tmp_path_factory.mktemp("s2v") / "Wan2.2-S2V-14B", TASK, configs)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2v_inputs")
    # 0.6 s at 16 fps with 8 frames per clip: T30 = 17 -> 2 clips
    return {"audio": write_speech(root / "speech.wav", 0.6), "image": write_reference(root / "ref.png")}


class Recording:
    """The DiT as generate calls it, with each call's inputs noted (the real model computes)."""

    def __init__(self, model):
        self.model, self.config, self.calls = model, model.config, []

    @property
    def dtype(self):
        return self.model.dtype

    def to(self, device):
        self.model.to(device)
        return self

    def __call__(self, x, t, context, **conditions):
        self.calls.append({"t": int(t[0]), "context": context, "audio": conditions["audio_features"].clone(),
                           "motion": conditions["motion_latent"], "pose": conditions["pose_latent"]})
        return self.model(x, t, context, **conditions)


@pytest.fixture(scope="module")
def models(s2v_folder):
    return load_task_models(TASK, s2v_folder, dtype=torch.float32, device="cpu")


def run(models, inputs, **request):
    dit = Recording(models.experts)
    steps = []
    args = dict(prompt="a woman talks", image=inputs["image"], audio=inputs["audio"], frames_per_clip=F, size=AREA,
                steps=STEPS, seed=7, allow_any_size=True, audio_encoder=models.audio_encoder,
                callback=lambda done, total, latent: steps.append((done, total)))
    video = generate(TASK, experts=dit, vae=models.vae, text_encoder=models.text_encoder, **{**args, **request})
    return video, dit.calls, steps


@pytest.fixture(scope="module")
def one_clip(models, inputs):
    return run(models, inputs, num_clips=1)


@pytest.fixture(scope="module")
def two_clips(models, inputs):
    return run(models, inputs)


def test_one_clip_drops_three_frames_and_guides_with_zeroed_audio(one_clip, models):
    video, calls, steps = one_clip
    assert video.shape == (3, F - 3, 64, 64) and video.dtype == torch.float32
    assert video.abs().max() <= 1 and video.std() > 0
    assert steps == [(1, STEPS), (2, STEPS)]
    assert len(calls) == 2 * STEPS  # conditional and unconditional pass per step (guide 4.5 > 1)
    context = models.text_encoder.encode(["a woman talks"])[0]
    negative = models.text_encoder.encode([TASK.negative_prompt])[0]  # S2V's own default negative prompt
    for cond, uncond in zip(calls[::2], calls[1::2]):
        assert cond["t"] == uncond["t"]
        assert torch.allclose(cond["context"][0], context, atol=1e-6)
        assert torch.allclose(uncond["context"][0], negative, atol=1e-6)
        assert cond["audio"].abs().sum() > 0 and not uncond["audio"].any()  # zeros, same shape
        assert cond["audio"].shape == (1, 25, 64, F)
        assert cond["motion"] is None and cond["pose"] is None  # first clip: no motion tokens
    assert calls[0]["t"] > calls[2]["t"]


def test_clips_follow_the_audio_with_seed_plus_r_and_the_motion_buffer(one_clip, two_clips):
    video, calls, steps = two_clips
    assert video.shape[1] == 2 * F - 3
    assert [total for _, total in steps] == [2 * STEPS] * (2 * STEPS) and steps[-1][0] == 2 * STEPS
    # clip 0 is the one-clip video: same seed, same audio slice, a fresh schedule per clip
    assert torch.allclose(video[:, :F - 3], one_clip[0], atol=1e-5)
    first, second = calls[:2 * STEPS], calls[2 * STEPS:]
    assert [c["t"] for c in first] == [c["t"] for c in second]
    assert all(c["motion"] is None for c in first)
    assert all(c["motion"] is not None and c["motion"].shape == (1, 16, 19, 8, 8) for c in second)
    # clip 1 hears the audio's frames F..2F-1, which run past the 0.6 s of speech (zeros there)
    assert not torch.equal(first[0]["audio"], second[0]["audio"])
    assert second[0]["audio"][..., 2:].abs().sum() == 0


def test_num_clips_never_exceeds_the_audio(models, inputs):
    from wan_core.audio import audio_features, load_audio

    _, clips = audio_features(models.audio_encoder, load_audio(inputs["audio"]), 16000, frames_per_clip=F)
    assert clips == 2  # T30 = 17 for 0.6 s: int(17 / 15) + 1


def test_init_first_frame_keeps_every_frame_and_starts_from_the_reference(models, inputs, one_clip):
    video, calls, _ = run(models, inputs, num_clips=1, init_first_frame=True)
    assert video.shape[1] == F  # no first-clip drop
    assert all(c["motion"] is not None for c in calls)  # the buffer's last 6 frames hold the reference
    assert not torch.allclose(video[:, 3:], one_clip[0], atol=1e-3)


def test_pose_video_shorter_and_of_another_size(models, inputs, one_clip):
    frames = torch.rand(5, 40, 100, 3, generator=torch.Generator().manual_seed(2))  # 5 of 8 frames, wide
    video, calls, _ = run(models, inputs, num_clips=1, pose_video=frames)
    assert video.shape == one_clip[0].shape
    assert all(c["pose"] is not None and c["pose"].shape == (1, 16, 2, 8, 8) for c in calls)
    assert not torch.allclose(video, one_clip[0], atol=1e-3)


def test_interrupt_stops_within_a_step(models, inputs):
    asked = []

    def interrupt():
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(GenerationInterrupted, match="after step 2 of"):
        run(models, inputs, num_clips=1, interrupt=interrupt)


# --- preprocessing formulas ------------------------------------------------------------------------

@pytest.mark.parametrize("image_hw, area, expected", [
    ((375, 500), 1280 * 720, (384, 512)),     # small images are enlarged: 500x375 -> 512x384
    ((1920, 1080), 1280 * 720, (1280, 704)),  # 1080x1920 -> 704x1280 (with black bars, below)
    ((1920, 1080), 1024 * 704, (1088, 640)),  # -> 640x1088 without bars
    ((720, 1280), 1280 * 720, (704, 1280)),
    ((704, 1024), 1024 * 704, (704, 1024)),
])
def test_size_search_rounds_up_to_multiples_of_64(image_hw, area, expected):
    height, width = s2v_size(image_hw, area)
    assert (height, width) == expected and height % 64 == 0 and width % 64 == 0 and height * width <= area


def test_reference_resize_and_black_bars():
    image = np.full((1920, 1080, 3), 200, np.uint8)
    pixels = reference_pixels(image, 1280, 704)  # the shorter side to 704: 704 x 1251, then 1280 rows
    assert pixels.shape == (3, 1280, 704)
    assert (pixels[:, :14] == -1).all() and (pixels[:, -15:] == -1).all()  # black, 14 above and 15 below
    assert torch.allclose(pixels[:, 14:-15], torch.tensor(200 / 255 * 2 - 1))
    no_bars = reference_pixels(image, 1088, 640)
    assert no_bars.shape == (3, 1088, 640) and (no_bars > -1).all()


@pytest.mark.parametrize("fps, interval", [(30, 2), (25, 2), (16, 1), (60, 4), (8, 1)])
def test_pose_frames_are_stepped_from_the_start(fps, interval):
    assert pose_frame_indices(fps, 1000, 10) == [i * interval for i in range(10)]
    assert pose_frame_indices(fps, 7, 10) == [i * interval for i in range(10) if i * interval < 7]


def test_pose_video_file_at_30fps_is_read_at_15(tmp_path):
    import av

    path = tmp_path / "pose.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.options = {"crf": "0"}
        for i in range(20):
            frame = np.full((64, 64, 3), i * 12, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    pixels = pose_pixels(path, 64, 64, 16)
    assert pixels.shape == (3, 16, 64, 64)
    levels = ((pixels[0, :, 32, 32] + 1) / 2 * 255).round()
    assert torch.allclose(levels[:10], torch.arange(0, 20, 2) * 12.0, atol=3)  # every 2nd frame from 0
    assert (pixels[:, 10:] == -1).all()  # after the 20 frames run out: black


def test_pose_of_another_size_is_resized_and_center_cropped_with_gray_padding():
    pixels = pose_pixels(torch.ones(3, 30, 100, 3), 64, 128, 4)  # white 100x30 -> 213x64, cut to 128 wide
    assert pixels.shape == (3, 4, 64, 128)
    assert torch.allclose(pixels[:, :3], torch.ones(3, 3, 64, 128)) and (pixels[:, 3] == -1).all()
    tall = pose_pixels(torch.ones(2, 200, 40, 3), 64, 128, 2)  # 40x200 -> 64x320: narrower than 128
    assert torch.allclose(tall[..., 32:96], torch.ones(3, 2, 64, 64))
    assert (tall[..., :32] == 0).all() and (tall[..., 96:] == 0).all()  # padded with 0: gray in [-1, 1]


def test_audio_for_video_cut_and_lead():
    waveform = torch.arange(32000.0)[None]
    assert torch.equal(audio_for_video(waveform, 16000, 13, 16), waveform[:, :13000])
    assert torch.equal(audio_for_video(waveform, 16000, 13, 16, correct_lead=True), waveform[:, 3000:16000])
    padded = audio_for_video(waveform[:, :5000], 16000, 13, 16)
    assert padded.shape == (1, 13000) and not padded[:, 5000:].any()


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    (dict(audio=None), "animates speech: pass audio="),
    (dict(image=None), "animates a reference image: pass image="),
    (dict(frames_per_clip=10), "frames_per_clip must be a multiple of 4"),
    (dict(num_clips=0), "num_clips must be a whole number >= 1 or None"),
    (dict(size=(32, 32)), "at least one 64x64 block"),
    (dict(size=(640, 480), allow_any_size=False), "not one of s2v-14B's areas"),
    (dict(guide_scale=(4.0, 5.0)), "takes one guide_scale number"),
    (dict(frame_num=81), "frame_num, boundary, output and request do not apply"),
    (dict(audio_encoder=None), "needs audio_encoder="),
])
def test_bad_requests_get_clear_errors(models, inputs, changes, message):
    with pytest.raises(ValueError, match=message):
        run(models, inputs, **changes)


def test_models_of_the_wrong_task_are_refused(models, inputs, tiny_folders, s2v_folder):
    from wan_core.dit import WanDiT

    t2v = WanDiT(tiny_dit_config("t2v")).eval()
    with pytest.raises(ValueError, match="s2v-14B needs s2v DiT experts, got a t2v model"):
        generate(TASK, experts=t2v, vae=models.vae, text_encoder=models.text_encoder, prompt="x",
                 image=inputs["image"], audio=inputs["audio"], audio_encoder=models.audio_encoder, size=AREA,
                 allow_any_size=True)
    with pytest.raises(ValueError, match="t2v-A14B needs t2v DiT experts, got a s2v model"):
        generate("t2v-A14B", experts=(models.experts, models.experts), vae=models.vae,
                 text_encoder=models.text_encoder, prompt="x")
    with pytest.raises(TypeError, match=r"inputs \['audio'\] that only s2v-14B takes"):
        generate("ti2v-5B", experts=models.experts, vae=models.vae, text_encoder=models.text_encoder, prompt="x",
                 audio=inputs["audio"])
    with pytest.raises(FileNotFoundError, match="not a complete official s2v-14B folder; missing: .*wav2vec2"):
        load_task_models(TASK, tiny_folders["ti2v-5B"])


def test_pose_video_of_the_wrong_shape(models, inputs):
    with pytest.raises(ValueError, match=r"pose_video frames must be \[frames, height, width, 3\]"):
        run(models, inputs, num_clips=1, pose_video=torch.zeros(4, 32, 32))


# --- the CLI ------------------------------------------------------------------------------------

def test_cli_writes_the_video_with_the_speech(s2v_folder, inputs, tmp_path):
    from wan_core.cli import main
    from wan_core.video import read_audio_track, read_video

    out = tmp_path / "talk.mp4"
    rc = main(["generate", "--task", "s2v-14B", "--ckpt_dir", str(s2v_folder), "--prompt", "a woman talks",
               "--image", str(inputs["image"]), "--audio", str(inputs["audio"]), "--size", "64*64",
               "--allow_any_size", "--infer_frames", str(F), "--sample_steps", "1", "--num_clip", "1",
               "--base_seed", "3", "--save_file", str(out)])
    assert rc == 0
    frames, fps = read_video(out)
    assert frames.shape == (F - 3, 64, 64, 3) and fps == 16
    sound, rate = read_audio_track(out)
    assert rate == 22050 and sound.shape[0] == 2
    assert abs(sound.shape[1] / rate - (F - 3) / 16) < 0.1  # AAC pads a frame or two
    assert np.abs(sound).max() > 0.05


def test_cli_ends_with_the_shorter_of_video_and_audio(s2v_folder, inputs, tmp_path):
    from wan_core.cli import main
    from wan_core.video import read_video

    out = tmp_path / "short.mp4"
    rc = main(["generate", "--task", "s2v-14B", "--ckpt_dir", str(s2v_folder), "--prompt", "x", "--image",
               str(inputs["image"]), "--audio", str(inputs["audio"]), "--size", "64*64", "--allow_any_size",
               "--infer_frames", "16", "--sample_steps", "1", "--sample_guide_scale", "1.0", "--save_file",
               str(out)])
    assert rc == 0
    frames, _ = read_video(out)
    assert len(frames) == math.ceil(0.6 * 16) < 16 - 3  # one clip makes 13 frames, the speech lasts 9.6


@pytest.mark.parametrize("flags, message", [
    ([], "s2v-14B animates speech: pass audio="),
    (["--audio", "missing.wav"], "--audio missing.wav: file not found"),
    (["--audio", "{audio}", "--infer_frames", "30"], "frames_per_clip must be a multiple of 4"),
    (["--audio", "{audio}", "--frame_num", "81"], "drop --frame_num / --boundary"),
])
def test_cli_errors(s2v_folder, inputs, capsys, flags, message):
    from wan_core.cli import main

    flags = [f.format(audio=inputs["audio"]) for f in flags]
    rc = main(["generate", "--task", "s2v-14B", "--ckpt_dir", str(s2v_folder), "--prompt", "x", "--image",
               str(inputs["image"]), "--size", "64*64", "--allow_any_size", *flags])
    assert rc == 2 and message in capsys.readouterr().err
