"""Requests: task lookup, sizes, frame counts and the checks a request passes before anything runs.

Sizes are (width, height) like the reference's ``--size W*H``.
"""
from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Optional, Sequence, Union

from wan_core.configs import TASKS, TaskConfig, get_task
from wan_core.sampling.schedule import check_boundary, check_solver, check_steps

if TYPE_CHECKING:
    from wan_core.pipeline.images import ImageInput

Size = tuple[int, int]  # (width, height), as the reference's --size W*H


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


def token_multiple(task: TaskConfig) -> tuple[int, int]:
    """Pixel (height, width) multiples whose latents tile into whole patches."""
    return task.vae_stride[1] * task.dit.patch_size[1], task.vae_stride[2] * task.dit.patch_size[2]


def _needs_image(task: TaskConfig) -> bool:
    return task.dit.model_type == "i2v"


def _takes_image(task: TaskConfig) -> bool:
    return task.dit.model_type in ("i2v", "ti2v")


def validate_request(task: Union[str, TaskConfig], *, size: Union[str, Size], frame_num: int,
                     image: Optional["ImageInput"] = None, steps: Optional[int] = None,
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
    multiple_h, multiple_w = token_multiple(task)
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
