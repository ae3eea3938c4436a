"""Noise and images: the seeded noise, image loading and the I2V / TI2V image conditions.

Facts from the reference (wan/image2video.py, textimage2video.py), in our words:

- Noise: `torch.randn` of the latent shape [C, F, H, W] in float32 from a `torch.Generator` on
  the sampling device seeded with the seed; the same seed gives the same video.
- I2V-A14B: `size` gives the pixel *area*; the output keeps the input image's aspect ratio. The
  latent height is floor(sqrt(area * h / w) / stride / patch) * patch (width likewise with
  w / h), so tokens tile the latent exactly. The image, scaled to [-1, 1], is resized to that
  size with bicubic interpolation (torch's, no antialiasing), followed by frame_num - 1 black
  (zero) frames; the VAE encodes that clip. A 4-channel mask marks the real frame: a per-frame
  mask (1 for frame 0, 0 after) whose first entry is repeated 4 times, so the 4 + (F - 1)
  entries fold into 4 channels per latent frame. `y` = [mask, encoded clip] (4 + 16 channels)
  joins the noise on channels inside the model (16 + 20 = 36 inputs).
- TI2V-5B with an image: the output size is chosen (best_output_size) as the multiple of
  stride * patch = 32 closest in aspect to the image with at most `size`'s area; the image is
  scaled (Lanczos) to cover it and center-cropped. Its VAE latent replaces the first latent
  frame at every step and those tokens get timestep 0 (`sample(first_frame_latent=...)`).
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from wan_core.configs import TaskConfig
from wan_core.pipeline.request import Size, token_multiple, parse_size, resolve_task

if TYPE_CHECKING:
    from PIL import Image as PILImage

ImageInput = Union[str, os.PathLike, "PILImage.Image", torch.Tensor, np.ndarray]


def initial_noise(shape: Sequence[int], seed: int, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Gaussian float32 noise of `shape` drawn by a generator on `device` seeded with `seed`,
    filled in the order the reference draws its [C, F, H, W] noise."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be a whole number in [0, 2**64), got {seed!r}")
    generator = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device=device)


# Pillow modes holding more than 8 bits per sample, with the value that means white. Pillow
# reads 16-bit greyscale PNGs as "I;16" (older versions as "I"); `convert("RGB")` would clip
# them to 0..255, turning a mid-grey into white.
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}
# A float image whose maximum is above this is read as 0..255; at or below it as 0..1, with the
# overshoot of resampling filters (a little below 0 or above 1) clamped.
FLOAT_255_ABOVE = 2.0


def load_image(image: ImageInput, name: str = "image") -> torch.Tensor:
    """An RGB image as a [3, H, W] float32 tensor in [0, 1].

    Accepts a path to any file Pillow reads, a PIL image of any mode (8-bit modes go through
    `convert("RGB")` as in the reference; 16-bit and 32-bit integer modes are divided by 65535,
    float mode "F" follows the float rule below), ComfyUI's IMAGE ([1, H, W, 3] float) or an
    array/tensor [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (alpha dropped) of uint8 (/ 255),
    uint16 (/ 65535), bool, or float: in 0..1, or in 0..255 when its maximum is above 2.
    Anything else, non-finite values included, is a ValueError/TypeError naming `name`."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = _open_image(Path(image), name)
    if isinstance(image, Image.Image):
        return _from_pil(image)
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint16:
            image = image.astype(np.int32)  # torch has no uint16 arithmetic on every version
            return _from_array(torch.from_numpy(np.ascontiguousarray(image)), name, white=65535)
        try:
            image = torch.from_numpy(np.ascontiguousarray(image))
        except TypeError:
            raise TypeError(f"{name}: arrays of {image.dtype} are not images; use uint8, uint16 or float") from None
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be a path, a PIL image, or an [H, W, 3] tensor/array, got {type(image).__name__}")
    return _from_array(image, name)


def _open_image(path: Path, name: str):
    from PIL import Image

    if not path.exists():
        raise FileNotFoundError(f"{name} {path}: file not found")
    if not path.is_file():
        raise ValueError(f"{name} {path} is not a file")
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now: a truncated or corrupt file fails here, not later
            return opened.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name} {path}: not an image Pillow can read ({error}); use a PNG, JPEG or WebP "
                         f"file") from None


def _from_pil(picture) -> torch.Tensor:
    if picture.mode in WIDE_MODES:
        values = torch.from_numpy(np.asarray(picture).astype(np.int64))
        return _from_array(values, f"a mode {picture.mode} image", white=WIDE_MODES[picture.mode])
    if picture.mode == "F":
        return _from_array(torch.from_numpy(np.asarray(picture, dtype=np.float32).copy()), "a mode F image")
    return _from_array(torch.from_numpy(np.array(picture.convert("RGB"))), "image")


def _from_array(image: torch.Tensor, name: str, white: Optional[int] = None) -> torch.Tensor:
    """[3, H, W] in 0..1 from an [H, W(, C)] tensor; `white` is the full-scale integer value."""
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} must be [H, W, 3] RGB (or ComfyUI's [1, H, W, 3]; [H, W] grey and "
                         f"[H, W, 4] RGBA are taken too), got shape {tuple(image.shape)}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name} is empty: {image.shape[1]}x{image.shape[0]} pixels")
    image = image[..., :3] if image.shape[-1] == 4 else image.expand(-1, -1, 3) if image.shape[-1] == 1 else image
    if image.dtype == torch.bool:
        unit = image.float()
    elif image.dtype == torch.uint8:
        unit = image.float() / 255
    elif white is not None and not image.is_floating_point():
        if image.min() < 0 or image.max() > white:
            raise ValueError(f"{name} has values outside 0..{white}")
        unit = image.double().div(white).float()
    elif image.is_floating_point():
        unit = _float_to_unit(image.float(), name)
    else:
        raise TypeError(f"{name} must be uint8, uint16 or float (0..1 or 0..255), got {image.dtype}")
    return unit.permute(2, 0, 1).contiguous()


def _float_to_unit(image: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(image).all():
        raise ValueError(f"{name} has NaN or infinite values")
    low, high = image.min().item(), image.max().item()
    if high > FLOAT_255_ABOVE:
        if low < -0.5 or high > 255.5:
            raise ValueError(f"{name}: float values from {low:g} to {high:g}; expected 0..1 (or 0..255)")
        return (image / 255).clamp(0, 1)
    if low < -0.5:
        raise ValueError(f"{name}: float values from {low:g} to {high:g} look like -1..1; expected 0..1 "
                         f"(map with (x + 1) / 2)")
    return image.clamp(0, 1)


def i2v_pixel_size(image_hw: tuple[int, int], size: Union[str, Size], task: Union[str, TaskConfig]) -> tuple[int, int]:
    """(height, width) in pixels of an I2V video: the area of `size`, the aspect ratio of the
    image, each latent side floored to a whole number of patches (the reference's rounding)."""
    task = resolve_task(task)
    width, height = parse_size(size)
    area = width * height
    image_h, image_w = image_hw
    aspect = image_h / image_w
    _, stride_h, stride_w = task.vae_stride
    _, patch_h, patch_w = task.dit.patch_size
    latent_h = round(math.sqrt(area * aspect) // stride_h // patch_h * patch_h)
    latent_w = round(math.sqrt(area / aspect) // stride_w // patch_w * patch_w)
    if latent_h < patch_h or latent_w < patch_w:
        raise ValueError(f"an image of {image_w}x{image_h} pixels is too narrow for area {width}*{height}: "
                         f"crop it closer to the video's aspect ratio")
    return latent_h * stride_h, latent_w * stride_w


def first_frame_mask(frame_num: int, latent_h: int, latent_w: int) -> torch.Tensor:
    """The I2V mask [4, latent frames, H, W]: 1 where a pixel frame is given (frame 0), else 0.

    The VAE folds frame 0 alone and then 4 frames per latent frame, so the per-frame mask gets
    its first entry repeated 4 times (4 + (F - 1) = 4 * latent frames entries), and each group
    of 4 becomes the 4 channels of one latent frame."""
    per_frame = torch.zeros(frame_num, latent_h, latent_w)
    per_frame[0] = 1
    per_frame = torch.cat([per_frame[:1].repeat(4, 1, 1), per_frame[1:]])
    return per_frame.view(-1, 4, latent_h, latent_w).transpose(0, 1)


def best_output_size(image_w: int, image_h: int, multiple_w: int, multiple_h: int, area: int) -> tuple[int, int]:
    """(width, height), multiples of (multiple_w, multiple_h) with at most `area` pixels, whose
    aspect ratio is closest to the image's: fit the width first or the height first (the other
    side then takes what area is left), keep the better of the two (TI2V-5B, as the reference)."""
    ratio = image_w / image_h
    exact_w = math.sqrt(area * ratio)
    exact_h = area / exact_w
    width_first_w = int(exact_w // multiple_w * multiple_w)
    width_first_h = int(area / width_first_w // multiple_h * multiple_h) if width_first_w else 0
    height_first_h = int(exact_h // multiple_h * multiple_h)
    height_first_w = int(area / height_first_h // multiple_w * multiple_w) if height_first_h else 0

    def ratio_error(w: int, h: int) -> float:  # a side of 0 (a very thin image) never wins
        return max(ratio / (w / h), (w / h) / ratio) if w and h else math.inf

    if ratio_error(width_first_w, width_first_h) < ratio_error(height_first_w, height_first_h):
        return width_first_w, width_first_h
    return height_first_w, height_first_h


def ti2v_pixel_size(image_hw: tuple[int, int], size: Union[str, Size],
                    task: Union[str, TaskConfig]) -> tuple[int, int]:
    """(height, width) in pixels of a TI2V-5B video from an image of `image_hw` (best_output_size)."""
    task = resolve_task(task)
    width, height = parse_size(size)
    image_h, image_w = image_hw
    multiple_h, multiple_w = token_multiple(task)
    out_w, out_h = best_output_size(image_w, image_h, multiple_w, multiple_h, width * height)
    if out_w <= 0 or out_h <= 0:
        raise ValueError(f"an image of {image_w}x{image_h} pixels is too narrow for area {width}*{height}: "
                         f"crop it closer to the video's aspect ratio")
    return out_h, out_w


def ti2v_image(image: ImageInput, size: Union[str, Size], task: Union[str, TaskConfig]) -> torch.Tensor:
    """The TI2V-5B conditioning frame [3, H, W] in [-1, 1]: the image scaled with Lanczos to
    cover `best_output_size` and center-cropped to it (8-bit, as the reference's PIL path)."""
    from PIL import Image

    pixels = (load_image(image) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels)
    out_h, out_w = ti2v_pixel_size((picture.height, picture.width), size, task)
    scale = max(out_w / picture.width, out_h / picture.height)
    picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.LANCZOS)
    left, top = (picture.width - out_w) // 2, (picture.height - out_h) // 2
    picture = picture.crop((left, top, left + out_w, top + out_h))
    return load_image(picture).sub(0.5).div(0.5)


def encode_image_condition(task: Union[str, TaskConfig], vae, image: ImageInput, size: Union[str, Size],
                           frame_num: int) -> torch.Tensor:
    """What the image contributes, on the VAE's device in float32:
    I2V-A14B: `y` [1, 4 + 16, latent frames, H, W] (mask + encoded [image, black frames...]);
    TI2V-5B: the first latent frame [1, 48, 1, H, W] for `sample(first_frame_latent=...)`."""
    task = resolve_task(task)
    if task.dit.model_type == "ti2v":
        frame = ti2v_image(image, size, task)
        return _vae_encode(vae, frame[:, None])
    if task.dit.model_type != "i2v":
        raise ValueError(f"{task.name} takes no image condition")
    pixels = load_image(image)
    out_h, out_w = i2v_pixel_size(tuple(pixels.shape[1:]), size, task)
    frame = F.interpolate(pixels.sub(0.5).div(0.5)[None], size=(out_h, out_w), mode="bicubic")[0]
    clip = torch.cat([frame[:, None], frame.new_zeros(3, frame_num - 1, out_h, out_w)], dim=1)
    encoded = _vae_encode(vae, clip)
    _, stride_h, stride_w = task.vae_stride
    mask = first_frame_mask(frame_num, out_h // stride_h, out_w // stride_w).to(encoded.device)
    return torch.cat([mask[None], encoded], dim=1)


def _vae_encode(vae, video: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> normalised latent [1, z, F', H', W'] in float32."""
    return vae.encode(video[None].to(device=vae.device, dtype=vae.dtype)).float()
