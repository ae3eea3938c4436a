"""Text-to-video, image-to-video and text-image-to-video generation, end to end.

One code path serves the CLI, the demo and the ComfyUI nodes:

    request checks -> text embeddings -> seeded noise (+ image condition) -> sample -> VAE decode

Facts from the reference (wan/text2video.py, image2video.py, textimage2video.py), in our words:

- Latent shape: (frames - 1) / 4 + 1 latent frames; height and width divided by the VAE stride
  (8 for the Wan2.1 VAE of the A14B tasks, 16 for the Wan2.2 VAE of TI2V-5B).
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
- An empty negative prompt means the task's default (the Chinese one the models were trained
  with).
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from wan_core.configs import TASKS, TaskConfig, get_task
from wan_core.loading import INDEX_SUFFIX, SAFETENSORS_SUFFIXES
from wan_core.sampling.schedule import check_boundary, check_solver, check_steps

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from wan_core.dit import WanDiT

ImageInput = Union[str, os.PathLike, "PILImage.Image", torch.Tensor, np.ndarray]
Size = tuple[int, int]  # (width, height), as the reference's --size W*H
Experts = Union["WanDiT", Sequence["WanDiT"]]
StepCallback = Callable[[int, int, torch.Tensor], None]

TOKENIZER_DIR = Path("google") / "umt5-xxl"  # beside the .pth in every official folder


class GenerationInterrupted(RuntimeError):
    """Raised when the interrupt check asks generation to stop; nothing is returned."""


# --------------------------------------------------------------------------------------------
# Requests


def resolve_task(task: Union[str, TaskConfig]) -> TaskConfig:
    return task if isinstance(task, TaskConfig) else get_task(task)


def official_folder_name(task: Union[str, TaskConfig]) -> str:
    """The name of the task's official release folder, e.g. "Wan2.2-T2V-A14B"."""
    kind, scale = resolve_task(task).name.split("-")
    return f"Wan2.2-{kind.upper()}-{scale}"


def default_size(task: Union[str, TaskConfig]) -> Size:
    """The task's largest landscape size (the reference's default --size is 1280*720)."""
    return max(resolve_task(task).supported_sizes, key=lambda s: (s[0] * s[1], s[0]))


def format_size(size: Size) -> str:
    return f"{size[0]}*{size[1]}"


def parse_size(size: Union[str, Sequence[int]]) -> Size:
    """(width, height) from "W*H" (the reference's --size) or a pair of ints."""
    if isinstance(size, str):
        parts = size.lower().replace("x", "*").split("*")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            return int(parts[0]), int(parts[1])
        raise ValueError(f"size {size!r} is not WIDTH*HEIGHT, e.g. 1280*720")
    if (isinstance(size, Sequence) and len(size) == 2
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in size)):
        return int(size[0]), int(size[1])
    raise ValueError(f"size must be (width, height) or 'WIDTH*HEIGHT', got {size!r}")


def latent_frames(frame_num: int, task: Union[str, TaskConfig]) -> int:
    return (frame_num - 1) // resolve_task(task).vae_stride[0] + 1


def latent_shape(task: Union[str, TaskConfig], size: Union[str, Size], frame_num: int,
                 batch: int = 1) -> tuple[int, int, int, int, int]:
    """[B, C, F, H, W] of the latent for a `size` = (width, height) video of `frame_num` frames
    (text-to-video; image-to-video sizes come from the image, see `i2v_pixel_size`)."""
    task = resolve_task(task)
    width, height = parse_size(size)
    _, sh, sw = task.vae_stride
    return batch, task.latent_channels, latent_frames(frame_num, task), height // sh, width // sw


def _token_multiple(task: TaskConfig) -> tuple[int, int]:
    """Pixel (height, width) multiples whose latents tile into whole patches."""
    return task.vae_stride[1] * task.dit.patch_size[1], task.vae_stride[2] * task.dit.patch_size[2]


def _needs_image(task: TaskConfig) -> bool:
    return task.dit.model_type == "i2v"


def _takes_image(task: TaskConfig) -> bool:
    return task.dit.model_type in ("i2v", "ti2v")


def validate_request(task: Union[str, TaskConfig], *, size: Union[str, Size], frame_num: int,
                     image: Optional[ImageInput] = None, steps: Optional[int] = None,
                     shift: Optional[float] = None, guide_scale=None, boundary: Optional[float] = None,
                     solver: str = "unipc", allow_any_size: bool = False) -> None:
    """Raise a ValueError that says what to change if a request cannot run.

    Sizes are the task's trained ones (the reference's SUPPORTED_SIZES) unless `allow_any_size`,
    which takes any width and height whose latent splits into whole patches (for tiny test
    models and experiments). `None` means "the task's default" for steps, shift, guide_scale and
    boundary.
    """
    task = resolve_task(task)
    width, height = parse_size(size)
    if not allow_any_size and (width, height) not in task.supported_sizes:
        raise ValueError(f"size {width}*{height} is not supported by {task.name}; supported sizes (width*height): "
                         f"{', '.join(format_size(s) for s in task.supported_sizes)}")
    if width <= 0 or height <= 0:
        raise ValueError(f"size {width}*{height}: width and height must be positive")
    multiple_h, multiple_w = _token_multiple(task)
    area_only = image is not None  # with an image, size gives only the area; the sides follow the image
    if not area_only and (width % multiple_w or height % multiple_h):
        raise ValueError(f"size {width}*{height}: {task.name} needs width a multiple of {multiple_w} and height a "
                         f"multiple of {multiple_h} (VAE stride x patch size)")
    if isinstance(frame_num, bool) or not isinstance(frame_num, numbers.Integral) or frame_num < 1 \
            or (frame_num - 1) % task.vae_stride[0]:
        raise ValueError(f"frame_num must be 4n+1 (1, 5, ..., 81, ..., 121), got {frame_num!r}: the VAE encodes "
                         f"the first frame alone and then groups of 4")
    if image is None and _needs_image(task):
        raise ValueError(f"{task.name} animates an image: pass image= (CLI: --image PATH)")
    if image is not None and not _takes_image(task):
        raise ValueError(f"{task.name} takes no image; use i2v-A14B or ti2v-5B for image-to-video")
    if steps is not None:
        check_steps(steps)
    if shift is not None and (isinstance(shift, bool) or not isinstance(shift, numbers.Real) or shift <= 0):
        raise ValueError(f"shift must be a number > 0, got {shift!r}")
    check_solver(solver)
    if boundary is not None:
        if not task.is_moe:
            raise ValueError(f"{task.name} runs one model; boundary (the hand-off between two experts) applies "
                             f"only to {', '.join(name for name, t in TASKS.items() if t.is_moe)}")
        check_boundary(boundary)
    if guide_scale is not None:
        _check_guide_scale(guide_scale, task)


def _check_guide_scale(guide_scale, task: TaskConfig) -> None:
    def is_number(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    if is_number(guide_scale):
        return
    if isinstance(guide_scale, Sequence) and len(guide_scale) == 2 and all(map(is_number, guide_scale)):
        if not task.is_moe:
            raise ValueError(f"{task.name} runs one model: guide_scale must be one number, got {guide_scale!r}")
        return
    raise ValueError(f"guide_scale must be a number or a (low_noise, high_noise) pair, got {guide_scale!r}")


# --------------------------------------------------------------------------------------------
# Noise and images


def initial_noise(shape: Sequence[int], seed: int, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Gaussian float32 noise of `shape` drawn by a generator on `device` seeded with `seed`,
    filled in the order the reference draws its [C, F, H, W] noise."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be a whole number in [0, 2**64), got {seed!r}")
    generator = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device=device)


def load_image(image: ImageInput) -> torch.Tensor:
    """An RGB image as a [3, H, W] float32 tensor in [0, 1].

    Accepts a path, a PIL image, ComfyUI's IMAGE ([1, H, W, 3] or [H, W, 3] float in [0, 1]) or
    a uint8 [H, W, 3] array. 8-bit inputs are divided by 255 (the reference's to_tensor)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a path, a PIL image, or an [H, W, 3] tensor/array, got {type(image).__name__}")
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3] RGB (or ComfyUI's [1, H, W, 3]), got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        image = image.float() / 255
    elif image.is_floating_point():
        image = image.float().clamp(0, 1)
    else:
        raise TypeError(f"image must be uint8 or float in [0, 1], got {image.dtype}")
    return image.permute(2, 0, 1).contiguous()


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
    width_first_h = int(area / width_first_w // multiple_h * multiple_h)
    height_first_h = int(exact_h // multiple_h * multiple_h)
    height_first_w = int(area / height_first_h // multiple_w * multiple_w)

    def ratio_error(w: int, h: int) -> float:
        return max(ratio / (w / h), (w / h) / ratio)

    if ratio_error(width_first_w, width_first_h) < ratio_error(height_first_w, height_first_h):
        return width_first_w, width_first_h
    return height_first_w, height_first_h


def ti2v_image(image: ImageInput, size: Union[str, Size], task: Union[str, TaskConfig]) -> torch.Tensor:
    """The TI2V-5B conditioning frame [3, H, W] in [-1, 1]: the image scaled with Lanczos to
    cover `best_output_size` and center-cropped to it (8-bit, as the reference's PIL path)."""
    from PIL import Image

    task = resolve_task(task)
    width, height = parse_size(size)
    pixels = (load_image(image) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels)
    multiple_h, multiple_w = _token_multiple(task)
    out_w, out_h = best_output_size(picture.width, picture.height, multiple_w, multiple_h, width * height)
    if out_w <= 0 or out_h <= 0:
        raise ValueError(f"an image of {picture.width}x{picture.height} pixels is too narrow for area "
                         f"{width}*{height}: crop it closer to the video's aspect ratio")
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


# --------------------------------------------------------------------------------------------
# Generation


def _expert_list(experts: Experts) -> list:
    return list(experts) if isinstance(experts, Sequence) else [experts]


def _check_experts(task: TaskConfig, experts: list) -> None:
    wanted = 2 if task.is_moe else 1
    if len(experts) != wanted:
        what = "(high_noise_expert, low_noise_expert)" if task.is_moe else "one model"
        raise ValueError(f"{task.name} needs {what}, got {len(experts)} model(s)")
    for expert in experts:
        model_type = getattr(getattr(expert, "config", None), "model_type", None)
        if model_type != task.dit.model_type:
            raise ValueError(f"{task.name} needs {task.dit.model_type} DiT experts, got a {model_type} model; "
                             f"load the matching checkpoint")


def encode_prompts(text_encoder, prompt: str, negative_prompt: str, device: torch.device, *,
                   move_encoder: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(context, context_null), one [L, dim] embedding each, on `device`. With `move_encoder`
    the encoder visits `device` for the encoding and returns to the CPU (offloading)."""
    if move_encoder:
        text_encoder.to(device)
    try:
        context = text_encoder.encode([prompt])
        context_null = text_encoder.encode([negative_prompt])
    finally:
        if move_encoder:
            text_encoder.to("cpu")
    return [c.to(device) for c in context], [c.to(device) for c in context_null]


def generate(task: Union[str, TaskConfig], *, experts: Experts, vae, text_encoder, prompt: str,
             negative_prompt: Optional[str] = None, size: Union[str, Size, None] = None,
             frame_num: Optional[int] = None, image: Optional[ImageInput] = None, steps: Optional[int] = None,
             shift: Optional[float] = None, guide_scale=None, boundary: Optional[float] = None,
             solver: str = "unipc", seed: int = 0, callback: Optional[StepCallback] = None,
             interrupt: Optional[Callable[[], bool]] = None, device: Union[str, torch.device, None] = None,
             offload_model: bool = False, t5_cpu: bool = False, allow_any_size: bool = False,
             output: str = "video") -> torch.Tensor:
    """Generate one video; returns [3, F, H, W] in [-1, 1] (or with output="latent" the final
    latent [1, C, F', H', W'] before decoding).

    task: "t2v-A14B", "i2v-A14B" or "ti2v-5B" (or a TaskConfig). experts: (high_noise,
    low_noise) for the A14B tasks, one model for TI2V-5B. `size` (width, height) or "W*H",
    `frame_num`, `steps`, `shift`, `guide_scale` ((low, high) or one number) and `boundary`
    default to the task's reference values. `image`: required for i2v-A14B, optional for
    ti2v-5B (see `load_image` for the accepted kinds). `seed`: the noise seed (same seed, same
    video). `callback(step, total, latent)` runs after every step and may raise to stop;
    `interrupt()` is checked before sampling and after every step and, when it returns True,
    stops generation with `GenerationInterrupted`.
    `device`: where sampling runs (default: the VAE's device). `offload_model`: keep the DiTs
    (and, unless `t5_cpu`, the text encoder) on the CPU and move each to `device` only while it
    runs. `t5_cpu`: the text encoder runs where it is (the CPU) and only its output moves.
    """
    from wan_core.sampling import sample

    task = resolve_task(task)
    size = parse_size(size if size is not None else default_size(task))
    frame_num = task.frame_num if frame_num is None else frame_num
    validate_request(task, size=size, frame_num=frame_num, image=image, steps=steps, shift=shift,
                     guide_scale=guide_scale, boundary=boundary, solver=solver, allow_any_size=allow_any_size)
    if output not in ("video", "latent"):
        raise ValueError(f"output must be 'video' or 'latent', got {output!r}")
    steps = task.sample_steps if steps is None else steps
    shift = task.sample_shift if shift is None else shift
    guide_scale = task.sample_guide_scale if guide_scale is None else guide_scale
    boundary = task.boundary if boundary is None else boundary
    negative_prompt = negative_prompt or task.negative_prompt
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    expert_list = _expert_list(experts)
    _check_experts(task, expert_list)
    device = torch.device(device) if device is not None else vae.device

    def check_interrupt(where: str) -> None:
        if interrupt is not None and interrupt():
            raise GenerationInterrupted(f"generation interrupted {where}")

    check_interrupt("before it started")
    context, context_null = encode_prompts(text_encoder, prompt, negative_prompt, device,
                                           move_encoder=offload_model and not t5_cpu)

    y = first_frame_latent = None
    if image is not None:
        condition = encode_image_condition(task, vae, image, size, frame_num).to(device)
        if task.dit.model_type == "i2v":
            y = condition
            shape = (1, task.latent_channels, *condition.shape[2:])
        else:
            first_frame_latent = condition
            shape = (1, task.latent_channels, latent_frames(frame_num, task), *condition.shape[3:])
    else:
        shape = latent_shape(task, size, frame_num)
    noise = initial_noise(shape, seed, device)

    def on_step(step: int, total: int, latent: torch.Tensor) -> None:
        if callback is not None:
            callback(step, total, latent)
        check_interrupt(f"after step {step} of {total}")

    if offload_model and len(expert_list) == 1:
        expert_list[0].to(device)  # one model: no hand-off, it stays on the device while sampling
    elif not offload_model:
        for expert in expert_list:
            expert.to(device)
    try:
        latent = sample(expert_list[0] if len(expert_list) == 1 else tuple(expert_list), noise, context,
                        context_null, steps=steps, shift=shift, guide_scale=guide_scale,
                        boundary=boundary if task.is_moe else None, solver=solver, y=y, seed=seed,
                        callback=on_step, first_frame_latent=first_frame_latent,
                        offload_inactive_expert=offload_model and len(expert_list) == 2)
    finally:
        if offload_model:
            for expert in expert_list:
                expert.to("cpu")
    if output == "latent":
        return latent
    return vae.decode(latent.to(device=vae.device, dtype=vae.dtype))[0]


# --------------------------------------------------------------------------------------------
# Loading a task's models from the official checkpoint folder


@dataclass
class TaskModels:
    """A task's loaded models and where they run; `generate(**request)` runs one request."""

    task: TaskConfig
    experts: Union["WanDiT", tuple["WanDiT", "WanDiT"]]
    vae: object
    text_encoder: object
    device: torch.device
    offload_model: bool = False
    t5_cpu: bool = False

    def compile_blocks(self) -> None:
        """torch.compile every expert's transformer blocks (`WanDiT.compile_blocks`)."""
        for expert in _expert_list(self.experts):
            expert.compile_blocks()

    def generate(self, **request) -> torch.Tensor:
        return generate(self.task, experts=self.experts, vae=self.vae, text_encoder=self.text_encoder,
                        device=self.device, offload_model=self.offload_model, t5_cpu=self.t5_cpu, **request)


def _has_dit_weights(folder: Path) -> bool:
    return folder.is_dir() and any(p.name.lower().endswith((INDEX_SUFFIX,) + SAFETENSORS_SUFFIXES)
                                   for p in folder.iterdir())


def checkpoint_files(task: Union[str, TaskConfig], ckpt_dir: Union[str, os.PathLike]) -> dict[str, Path]:
    """The parts of an official checkpoint folder for `task`, by role, after checking they are
    there: "high_noise"/"low_noise" expert folders (A14B) or "dit" (the 5B's folder itself),
    "text_encoder" (.pth), "tokenizer" (google/umt5-xxl/), "vae" (.pth). A FileNotFoundError
    names every missing one."""
    task = resolve_task(task)
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {root} (--ckpt_dir takes the official folder, "
                                f"e.g. {official_folder_name(task)})")
    if task.is_moe:
        dits = {"high_noise": root / task.high_noise_checkpoint, "low_noise": root / task.low_noise_checkpoint}
    else:
        dits = {"dit": root}
    files = {**dits, "text_encoder": root / task.t5_checkpoint, "tokenizer": root / TOKENIZER_DIR,
             "vae": root / task.vae_checkpoint}
    missing = [f"{path.name}/ (a folder of diffusion_pytorch_model*.safetensors shards)" if role != "dit"
               else f"diffusion_pytorch_model*.safetensors (the {task.name} DiT shards)"
               for role, path in dits.items() if not _has_dit_weights(path)]
    missing += [path.name for path in (files["text_encoder"], files["vae"]) if not path.is_file()]
    if not files["tokenizer"].is_dir():
        missing.append(f"{TOKENIZER_DIR.as_posix()}/ (the umt5 tokenizer folder)")
    if missing:
        raise FileNotFoundError(f"{root} is not a complete official {task.name} folder; missing: "
                                f"{'; '.join(missing)}. Download the whole Wan2.2 {task.name} release into it")
    return files


def load_task_models(task: Union[str, TaskConfig], ckpt_dir: Union[str, os.PathLike], *,
                     dtype: torch.dtype = torch.bfloat16, device: Union[str, torch.device, None] = None,
                     t5_cpu: bool = False, offload_model: bool = False, quant: Optional[str] = None,
                     text_dtype: torch.dtype = torch.bfloat16, vae_dtype: torch.dtype = torch.float32) -> TaskModels:
    """Load a task's DiT expert(s), text encoder and VAE from the official folder layout.

    `dtype`: the DiTs' weight dtype (`quant` "fp8_e4m3fn"/"fp8_e5m2" keeps their block linears
    in fp8). `device`: where sampling runs (default CUDA when available, else CPU).
    `offload_model`: the DiTs, and unless `t5_cpu` the text encoder, wait on the CPU and visit
    `device` only while they run (the VAE stays on `device`). `t5_cpu`: the text encoder
    always runs on the CPU (the reference's --t5_cpu). The reference keeps the text encoder in
    bf16 and the VAE in float32 (`text_dtype`, `vae_dtype`).
    """
    from wan_core.loading import load_dit
    from wan_core.text import load_text_encoder
    from wan_core.vae import load_vae

    task = resolve_task(task)
    if task.dit.model_type not in ("t2v", "i2v", "ti2v"):
        raise ValueError(f"{task.name} is not supported by this pipeline yet; choose t2v-A14B, i2v-A14B or ti2v-5B")
    files = checkpoint_files(task, ckpt_dir)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu = torch.device("cpu")
    dit_device = cpu if offload_model else device
    roles = ("high_noise", "low_noise") if task.is_moe else ("dit",)
    experts = tuple(load_dit(files[role], dtype=dtype, device=dit_device, quant=quant) for role in roles)
    for role, expert in zip(roles, experts):
        if expert.config.model_type != task.dit.model_type:
            raise ValueError(f"{files[role]} holds a {expert.config.model_type} DiT, but {task.name} needs "
                             f"{task.dit.model_type}: is --ckpt_dir the {task.name} folder?")
    text_encoder = load_text_encoder(files["text_encoder"], dtype=text_dtype,
                                     device=cpu if (t5_cpu or offload_model) else device,
                                     tokenizer=files["tokenizer"])
    vae = load_vae(files["vae"], dtype=vae_dtype, device=device)
    if vae.version != task.vae_version:
        raise ValueError(f"{files['vae']} is a Wan{vae.version} VAE; {task.name} needs the Wan{task.vae_version} VAE")
    return TaskModels(task=task, experts=experts if task.is_moe else experts[0], vae=vae,
                      text_encoder=text_encoder, device=device, offload_model=offload_model, t5_cpu=t5_cpu)
