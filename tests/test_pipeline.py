"""wan_core.pipeline: request checks, the reference's sizes and masks, official-folder loading,
reproducibility, interrupts and offloading, on tiny random checkpoints in the official layout."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wan_core.configs import TASKS
from wan_core.pipeline import (GenerationInterrupted, best_output_size, checkpoint_files, first_frame_mask,
                               generate, i2v_pixel_size, latent_shape, load_task_models, validate_request)



def test_latent_shape_follows_frames_and_vae_stride():
    assert latent_shape("t2v-A14B", (1280, 720), 81) == (1, 16, 21, 90, 160)
    assert latent_shape("ti2v-5B", "1280*704", 121, batch=2) == (2, 48, 31, 44, 80)
    assert latent_shape("i2v-A14B", (832, 480), 1) == (1, 16, 1, 60, 104)


# --- clear errors ------------------------------------------------------------------------------

BAD_REQUESTS = [
    (dict(task="t2v-A14B", size=(1280, 704)), "size 1280*704 is not supported by t2v-A14B; supported sizes"),
    (dict(task="ti2v-5B", size=(1280, 720)), "1280*704"),
    (dict(task="t2v-A14B", frame_num=80), "frame_num must be 4n+1"),
    (dict(task="t2v-A14B", frame_num=0), "frame_num must be 4n+1"),
    (dict(task="i2v-A14B"), "i2v-A14B animates an image: pass image"),
    (dict(task="t2v-A14B", image="x.png"), "t2v-A14B takes no image"),
    (dict(task="t2v-A14B", steps=0), "steps must be a whole number >= 1"),
    (dict(task="t2v-A14B", steps=2.5), "steps must be a whole number >= 1"),
    (dict(task="t2v-A14B", boundary=0.0), "boundary must be a fraction in (0, 1)"),
    (dict(task="t2v-A14B", boundary=1.0), "boundary must be a fraction in (0, 1)"),
    (dict(task="i2v-A14B", image="x.png", boundary=1.5), "boundary must be a fraction in (0, 1)"),
    (dict(task="ti2v-5B", size=(1280, 704), boundary=0.5), "boundary: ti2v-5B runs one model; the boundary"),
    (dict(task="ti2v-5B", size=(1280, 704), guide_scale=(3.0, 4.0)), "guide_scale: one model runs every step, so it takes one scale"),
    (dict(task="t2v-A14B", shift=0), "shift must be a finite number > 0"),
    (dict(task="t2v-A14B", solver="ddim"), "unknown solver 'ddim'"),
    (dict(task="t2v-A14B", size=(100, 64), allow_any_size=True), "width a multiple of 16"),
    (dict(task="t2v-A14B", size="1280x"), "is not WIDTH*HEIGHT"),
]


@pytest.mark.parametrize("request_args, message", BAD_REQUESTS)
def test_bad_requests_get_clear_errors(request_args, message):
    args = dict(size=(1280, 720), frame_num=81)
    args.update(request_args)
    with pytest.raises(ValueError) as error:
        validate_request(args.pop("task"), **args)
    assert message in str(error.value)


def test_unsupported_size_lists_the_supported_ones():
    with pytest.raises(ValueError) as error:
        validate_request("t2v-A14B", size=(640, 640), frame_num=81)
    for width, height in TASKS["t2v-A14B"].supported_sizes:
        assert f"{width}*{height}" in str(error.value)


def test_good_requests_pass(tmp_path):
    from PIL import Image

    validate_request("t2v-A14B", size=(832, 480), frame_num=81, steps=40, shift=12.0, guide_scale=(3.0, 4.0),
                     boundary=0.875)
    Image.new("RGB", (48, 32), (200, 10, 10)).save(tmp_path / "x.png")
    validate_request("i2v-A14B", size="480*832", frame_num=1, image=tmp_path / "x.png")
    validate_request("ti2v-5B", size=(704, 1280), frame_num=121, guide_scale=5.0)
    validate_request("ti2v-5B", size=(64, 32), frame_num=5, allow_any_size=True)


# --- the reference's image sizes and mask ------------------------------------------------------

@pytest.mark.parametrize("image_hw, size", [((720, 1280), (1280, 720)), ((1080, 1440), (832, 480)),
                                            ((600, 400), (1280, 720)), ((333, 517), (480, 832))])
def test_i2v_size_keeps_the_image_aspect_within_the_area(image_hw, size):
    out_h, out_w = i2v_pixel_size(image_hw, size, "i2v-A14B")
    # the reference: latent side = floor(sqrt(area * aspect) / 8 / 2) * 2, pixels = latent * 8
    area, aspect = size[0] * size[1], image_hw[0] / image_hw[1]
    assert out_h == 8 * (2 * math.floor(math.sqrt(area * aspect) / 8 / 2))
    assert out_w == 8 * (2 * math.floor(math.sqrt(area / aspect) / 8 / 2))
    assert out_h % 16 == 0 and out_w % 16 == 0 and out_h * out_w <= area


def test_i2v_mask_marks_the_given_frame_on_all_four_channels():
    mask = first_frame_mask(17, 3, 5)
    assert mask.shape == (4, 5, 3, 5)
    expected = torch.zeros(4, 5, 3, 5)
    expected[:, 0] = 1  # frame 0 is the only given frame; latent frame 0 holds it alone
    assert torch.equal(mask, expected)


def test_ti2v_output_size_is_the_closer_aspect_of_width_first_and_height_first():
    # 1280x720 into 1280*704 (multiples of 32): width first gives 1248x704 (ratio 1.773),
    # height first 1280x704 (1.818); the image's 1.778 is closer to the first.
    assert best_output_size(1280, 720, 32, 32, 1280 * 704) == (1248, 704)
    for image in [(1280, 704), (704, 1280), (500, 500), (1920, 800), (333, 999)]:
        w, h = best_output_size(*image, 32, 32, 1280 * 704)
        assert w % 32 == 0 and h % 32 == 0 and w * h <= 1280 * 704
    assert best_output_size(1280, 704, 32, 32, 1280 * 704) == (1280, 704)


# --- official folders --------------------------------------------------------------------------

def test_missing_checkpoint_files_are_named(tmp_path, tiny_folders):
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        checkpoint_files("t2v-A14B", tmp_path / "nowhere")
    (tmp_path / "high_noise_model").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        checkpoint_files("t2v-A14B", tmp_path)
    message = str(error.value)
    for name in ("high_noise_model/", "low_noise_model/", "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth",
                 "google/umt5-xxl/"):
        assert name in message
    with pytest.raises(FileNotFoundError, match="Wan2.2_VAE.pth"):
        checkpoint_files("ti2v-5B", tmp_path)
    assert set(checkpoint_files("ti2v-5B", tiny_folders["ti2v-5B"])) == {"dit", "text_encoder", "tokenizer", "vae"}


def test_wrong_folder_for_the_task_is_refused_before_any_model_loads(tiny_folders, monkeypatch):
    import wan_core.loading
    import wan_core.vae

    loaded = []
    for module, function in ((wan_core.loading, "load_dit"), (wan_core.vae, "load_vae")):
        real = getattr(module, function)
        monkeypatch.setattr(module, function, lambda *a, real=real, function=function, **k: (loaded.append(function),
                                                                                           real(*a, **k))[1])
    with pytest.raises(ValueError, match="holds a t2v DiT, but i2v-A14B needs i2v"):
        load_task_models("i2v-A14B", tiny_folders["t2v-A14B"], dtype=torch.float32, device="cpu")
    assert loaded == []
    files = checkpoint_files("t2v-A14B", tiny_folders["t2v-A14B"])
    assert wan_core.loading.read_dit_config(files["low_noise"]) == wan_core.loading.load_dit(files["low_noise"]).config


# --- generation --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def t2v_models(tiny_folders):
    return load_task_models("t2v-A14B", tiny_folders["t2v-A14B"], dtype=torch.float32, device="cpu")


T2V_REQUEST = dict(prompt="a fox in the snow", size=(64, 32), frame_num=5, steps=6, allow_any_size=True)


def test_same_seed_gives_bit_identical_latents_and_another_seed_does_not(t2v_models):
    first = t2v_models.generate(**T2V_REQUEST, seed=7, output="latent")
    again = t2v_models.generate(**T2V_REQUEST, seed=7, output="latent")
    other = t2v_models.generate(**T2V_REQUEST, seed=8, output="latent")
    assert first.shape == (1, 16, 2, 4, 8)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_callback_sees_every_step_and_interrupt_stops(t2v_models):
    seen = []
    video = t2v_models.generate(**T2V_REQUEST, seed=1, callback=lambda step, total, latent: seen.append((step, total)))
    assert seen == [(i, 6) for i in range(1, 7)]
    assert video.shape == (3, 5, 32, 64) and video.min() >= -1 and video.max() <= 1

    seen.clear()
    with pytest.raises(GenerationInterrupted, match="after step 2 of 6"):
        t2v_models.generate(**T2V_REQUEST, seed=1, callback=lambda step, total, latent: seen.append(step),
                            interrupt=lambda: len(seen) >= 2)
    assert seen == [1, 2]


def test_offloading_gives_the_same_latent(t2v_models, tiny_folders):
    offloaded = load_task_models("t2v-A14B", tiny_folders["t2v-A14B"], dtype=torch.float32, device="cpu",
                                 offload_model=True, t5_cpu=True)
    assert torch.equal(t2v_models.generate(**T2V_REQUEST, seed=3, output="latent"),
                       offloaded.generate(**T2V_REQUEST, seed=3, output="latent"))


def test_i2v_video_takes_the_image_aspect(tiny_folders):
    models = load_task_models("i2v-A14B", tiny_folders["i2v-A14B"], dtype=torch.float32, device="cpu")
    image = (np.random.default_rng(0).random((90, 200, 3)) * 255).astype(np.uint8)  # wide image
    video = models.generate(prompt="waves", image=image, size=(64, 64), frame_num=5, steps=2, seed=0,
                            allow_any_size=True)
    out_h, out_w = i2v_pixel_size((90, 200), (64, 64), "i2v-A14B")
    assert (out_h, out_w) == (32, 80)  # sqrt(4096 / 0.45) = 95.4 -> 11 latent -> 10 (whole patches)
    assert video.shape == (3, 5, out_h, out_w)


def test_ti2v_image_holds_the_first_latent_frame(tiny_folders):
    models = load_task_models("ti2v-5B", tiny_folders["ti2v-5B"], dtype=torch.float32, device="cpu")
    from wan_core.pipeline import encode_image_condition

    image = torch.rand(1, 48, 80, 3)  # ComfyUI's IMAGE layout
    latent = models.generate(prompt="paint", image=image, size=(64, 32), frame_num=9, steps=3, seed=0,
                             allow_any_size=True, output="latent")
    first = encode_image_condition("ti2v-5B", models.vae, image, (64, 32), 9)
    assert latent.shape == (1, 48, 3, 2, 4)
    assert torch.equal(latent[:, :, :1], first)
    assert not torch.allclose(latent[:, :, 1:2], first)


def test_generate_refuses_wrong_models(t2v_models):
    with pytest.raises(ValueError, match=r"t2v-A14B needs \(high_noise_expert, low_noise_expert\)"):
        generate("t2v-A14B", experts=t2v_models.experts[0], vae=t2v_models.vae,
                 text_encoder=t2v_models.text_encoder, **T2V_REQUEST)
    with pytest.raises(ValueError, match="i2v-A14B needs i2v DiT experts, got a t2v model"):
        generate("i2v-A14B", experts=t2v_models.experts, vae=t2v_models.vae, text_encoder=t2v_models.text_encoder,
                 image=torch.rand(32, 64, 3), **T2V_REQUEST)
