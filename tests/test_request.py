"""One validation layer (issue 15, item 2): wan_core.pipeline.Request and its parts.

Images of any mode and bit depth come out with the right values (a 16-bit mid-grey is grey, not
white; a float image in 0..255 is scaled, not clamped); unreadable files, non-finite numbers,
bad seeds and devices get clear errors naming the caller's input; guidance scales have one
order, (low_noise, high_noise), from the CLI flag to the expert that uses them; a huge request
says up front what it costs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from wan_core.cli import CLI_NAMES, _guide_scale
from wan_core.pipeline import MAX_SEED, Request, check_device, check_sampling, load_image
from wan_core.sampling import GuideScale, sample, scales_by_expert


# --- images ------------------------------------------------------------------------------------------------

def test_a_16_bit_grey_png_comes_out_grey_not_white(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 12), 32768, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")  # what Pillow makes of it: 16-bit integers
    image = load_image(path)
    assert image.shape == (3, 8, 12)
    torch.testing.assert_close(image, torch.full((3, 8, 12), 32768 / 65535), rtol=0, atol=1e-7)


def test_float_images_in_0_255_are_scaled_and_in_0_1_kept():
    ramp = np.linspace(0, 255, 16, dtype=np.float32).reshape(4, 4)
    rgb = np.stack([ramp, ramp / 2, 255 - ramp], axis=-1)
    torch.testing.assert_close(load_image(rgb), torch.from_numpy(rgb / 255).permute(2, 0, 1).float(),
                               rtol=0, atol=1e-7)
    unit = torch.rand(1, 6, 5, 3)  # ComfyUI's IMAGE
    torch.testing.assert_close(load_image(unit), unit[0].permute(2, 0, 1), rtol=0, atol=0)
    overshoot = unit.clone()
    overshoot[0, 0, 0] = 1.03  # a resampling filter's overshoot is clamped, not read as 0..255
    assert load_image(overshoot).max() == 1.0 and torch.equal(load_image(overshoot)[:, 1:], unit[0, 1:].permute(2, 0, 1))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "CMYK", "I;16", "I", "F"])
def test_every_pillow_mode_becomes_rgb_in_0_1(mode):
    base = Image.new("RGB", (6, 4), (128, 64, 200))
    if mode == "I;16":
        picture = Image.fromarray(np.full((4, 6), 65535, dtype=np.uint16))
        expected = torch.ones(3, 4, 6)
    elif mode == "I":
        picture = Image.fromarray(np.full((4, 6), 13107, dtype=np.int32), mode="I")
        expected = torch.full((3, 4, 6), 13107 / 65535)
    elif mode == "F":
        picture = Image.fromarray(np.full((4, 6), 0.25, dtype=np.float32), mode="F")
        expected = torch.full((3, 4, 6), 0.25)
    else:
        picture = base.convert(mode)
        expected = torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1).float() / 255
    image = load_image(picture)
    assert image.shape == (3, 4, 6) and image.dtype == torch.float32
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-7)


def test_arrays_of_every_shape_and_depth():
    grey = np.full((4, 5), 51, dtype=np.uint8)
    assert torch.allclose(load_image(grey), torch.full((3, 4, 5), 0.2))
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 7
    assert load_image(rgba)[0].min() == 1 and load_image(rgba)[1:].max() == 0  # alpha dropped
    deep = np.full((4, 5, 3), 65535 // 4, dtype=np.uint16)
    assert torch.allclose(load_image(deep), torch.full((3, 4, 5), (65535 // 4) / 65535))


@pytest.mark.parametrize("content, message", [
    (b"<svg xmlns='http://www.w3.org/2000/svg' width='4' height='4'/>", "not an image Pillow can read"),
    (b"not an image at all", "not an image Pillow can read"),
    ("TRUNCATED", "not an image Pillow can read"),
])
def test_unreadable_image_files_name_the_input(content, message, tmp_path):
    path = tmp_path / "start.png"
    if content == "TRUNCATED":
        Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=f"--image {path}: {message}"):
        Request.check("i2v-A14B", size=(832, 480), image=path, names=CLI_NAMES)


@pytest.mark.parametrize("image, error, message", [
    (np.full((4, 4, 3), np.nan, dtype=np.float32), ValueError, "start_image has NaN or infinite values"),
    (np.full((4, 4, 3), 300.0, dtype=np.float32), ValueError, "float values from 300 to 300; expected 0..1"),
    (np.full((4, 4, 3), -1.0, dtype=np.float32), ValueError, "look like -1..1"),
    (np.zeros((4, 4, 2), dtype=np.uint8), ValueError, "must be \\[H, W, 3\\] RGB"),
    (np.zeros((4, 4, 3), dtype=np.int64), TypeError, "must be uint8, uint16 or float"),
    (np.zeros((0, 4, 3), dtype=np.uint8), ValueError, "start_image is empty"),
    ("DIR", ValueError, "is not a file"),
])
def test_bad_images_are_clear_errors(image, error, message, tmp_path):
    with pytest.raises(error, match=message):
        load_image(tmp_path if isinstance(image, str) else image, "start_image")


def test_a_very_thin_image_is_a_clear_error_not_a_division_by_zero():
    thin = np.zeros((2, 2000, 3), dtype=np.uint8)  # 2000 wide, 2 high
    with pytest.raises(ValueError, match="an image of 2000x2 pixels is too narrow for area 1280\\*704"):
        Request.check("ti2v-5B", size=(1280, 704), image=thin)
    # I2V's rounding (the reference's) still finds whole patches: one 16-pixel row of latents
    assert Request.check("i2v-A14B", size=(832, 480), image=thin).video_size == (19968, 16)


def test_the_video_size_follows_the_image_before_anything_loads():
    wide = np.zeros((100, 250, 3), dtype=np.uint8)
    request = Request.check("ti2v-5B", size=(1280, 704), image=wide)
    width, height = request.video_size  # multiples of 32 closest to 2.5:1 within 1280*704
    assert (width, height) == (1472, 608) and width * height <= 1280 * 704
    assert request.latent_shape() == (1, 48, 31, 38, 92)
    assert request.image.shape == (3, 100, 250)


# --- numbers, seeds, devices, names --------------------------------------------------------------------------

NODE_NAMES = {"frame_num": "length", "size": "width x height", "guide_scale": "cfg", "seed": "seed"}


@pytest.mark.parametrize("overrides, message", [
    (dict(shift=float("inf")), "shift must be a finite number > 0"),
    (dict(shift=float("-inf")), "shift must be a finite number > 0"),
    (dict(guide_scale=float("nan")), "cfg must be a finite number or a (low_noise, high_noise) pair"),
    (dict(guide_scale=(3.0, float("nan"))), "cfg must be a finite number"),
    (dict(boundary=float("nan")), "boundary must be a fraction in (0, 1)"),
    (dict(denoise=float("nan")), "denoise must be in (0, 1]"),
    (dict(seed=-1), "seed must be a whole number in 0..18446744073709551615"),
    (dict(seed=MAX_SEED + 1), "seed must be a whole number"),
    (dict(seed=1.5), "seed must be a whole number"),
    (dict(frame_num=80), "length must be 4n+1"),
    (dict(size=(1000, 480), allow_any_size=True), "width x height 1000*480: t2v-A14B needs width a multiple of 16"),
    (dict(size=(0, 480), allow_any_size=True), "width x height 0*480: width and height must be positive"),
])
def test_every_bad_number_is_refused_with_the_callers_name(overrides, message):
    with pytest.raises(ValueError) as error:
        Request.check("t2v-A14B", **{"size": (832, 480), **overrides}, names=NODE_NAMES)
    assert message in str(error.value)


def test_defaults_are_filled_in_and_a_good_request_passes():
    request = Request.check("t2v-A14B")
    assert request.size == request.video_size == (1280, 720) and request.frame_num == 81
    settings = request.sampling
    assert (settings.steps, settings.shift, settings.boundary, settings.solver) == (40, 12.0, 0.875, "unipc")
    assert settings.guide_scale == GuideScale(low_noise=3.0, high_noise=4.0)
    assert check_sampling("ti2v-5B").guide_scale == 5.0 and check_sampling("ti2v-5B").boundary is None


def test_devices_that_do_not_exist_here_are_refused():
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(None).type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda:1: this machine has no CUDA GPU"):
            check_device("cuda:1", "--device")
    with pytest.raises(ValueError, match="'tpu' is not a device|unsupported device type"):
        check_device("tpu")


# --- guidance: one order end to end --------------------------------------------------------------------------

class ScaleProbe(torch.nn.Module):
    """A flow model whose conditional output differs from the unconditional one by a constant,
    so the guided flow reveals the scale it was given: uncond + s * (cond - uncond) = s."""

    def __init__(self, seen: list, name: str):
        super().__init__()
        self.seen, self.name = seen, name

    def forward(self, x, t, context, y=None):
        self.seen.append(self.name)
        return torch.full_like(x, 1.0 if context[0].sum() > 0 else 0.0)


def test_guidance_pairs_are_low_high_from_the_cli_to_the_experts():
    flag = _guide_scale("3.0,4.0")
    assert flag == GuideScale(low_noise=3.0, high_noise=4.0)
    assert scales_by_expert(flag, 2) == (4.0, 3.0)  # experts run (high_noise, low_noise)
    seen, flows = [], []
    high, low = ScaleProbe(seen, "high"), ScaleProbe(seen, "low")
    sample((high, low), torch.zeros(1, 4, 1, 2, 2), [torch.ones(2, 8)], [torch.zeros(2, 8)], steps=4, shift=1.0,
           guide_scale=flag, boundary=0.6, solver="euler", denoised_callback=lambda s, n, x0: flows.append(-x0))
    # euler at shift 1: timesteps 1000, 750, 500, 250 -> two high-noise steps, then two low-noise ones.
    # The first step starts at x = 0, so its x0 = -sigma * flow = -1 * scale.
    assert seen[::2] == ["high", "high", "low", "low"]
    assert flows[0].mean().item() == pytest.approx(4.0, rel=1e-5)  # the high-noise expert's scale


# --- the cost of a request ------------------------------------------------------------------------------------

def test_workload_counts_tokens_forwards_and_flops_up_front():
    request = Request.check("t2v-A14B", size=(1280, 720))
    work = request.workload()
    assert work.tokens == 21 * 45 * 80  # latent 21 x 90 x 160, 2x2 patches
    assert work.forwards == 80  # 40 steps, conditional and unconditional
    assert work.parameters == pytest.approx(14.0e9, rel=0.02)  # each A14B expert has ~14B parameters
    assert work.oversized == 1.0
    huge = Request.check("t2v-A14B", size="4096*4096", allow_any_size=True).workload()
    assert huge.tokens == 21 * 256 * 256 and huge.oversized == pytest.approx(18.2, rel=0.01)
    assert huge.flops > 100 * work.flops  # attention grows with the square of the tokens
    text = huge.describe()
    assert "80 DiT forwards over 1,376,256 tokens each" in text and "GiB of activations" in text
    one_pass = Request.check("ti2v-5B", guide_scale=1.0).workload()
    assert one_pass.forwards == 50  # a scale of 1 skips the unconditional pass
