"""Requests: task lookup, sizes, frame counts, and the one layer of checks a request passes
before anything heavy loads.

Sizes are (width, height) like the reference's ``--size W*H``.

`Request.check(task, ...)` checks everything a generation takes (video size and length, the
image, steps, shift, guidance, boundary, solver, denoise, seed), fills in the task's defaults
and returns a frozen `Request`; `check_sampling` is its sampling half (what a sampler node takes)
and `check_device` checks a device string. Every message names the input the way the caller
shows it: `names` maps a field ("frame_num") to the caller's name for it ("length" on the video
latent node, "--frame_num" in the CLI); unnamed fields keep the Python argument's name. A task
family with inputs of its own (S2V) subclasses `Request`, adds fields and extends `check`.
`Request.workload()` says up front how many DiT forwards and how much memory a request needs.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import torch

from wan_core.configs import TASKS, DiTConfig, TaskConfig, get_task
from wan_core.sampling.guidance import GuideScale, check_guide_scale
from wan_core.sampling.schedule import check_boundary, check_denoise, check_shift, check_solver, check_steps

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


MAX_SEED = 2 ** 64 - 1
Names = Mapping[str, str]


def _named(names: Optional[Names], field: str) -> str:
    return (names or {}).get(field, field)


def _renamed(error: ValueError, field: str, names: Optional[Names]) -> ValueError:
    """The same message with the library's name for an input replaced by the caller's."""
    shown = _named(names, field)
    message = str(error)
    if shown != field and message.startswith(field):
        message = shown + message[len(field):]
    return ValueError(message)


def check_seed(seed, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} must be a whole number in 0..{MAX_SEED} (2**64 - 1), got {seed!r}")
    return int(seed)


def check_device(device: Union[str, torch.device, None], name: str = "device") -> torch.device:
    """A torch device that exists here: "cpu", "cuda", "cuda:N" (N below the GPU count), "mps".
    None means CUDA when there is a GPU, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {device}: this machine has no CUDA GPU that torch can use (torch "
                             f"{torch.__version__}); use cpu, or install a CUDA build of torch")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {device}: only {torch.cuda.device_count()} CUDA device(s) here "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif parsed.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"{name} {device}: no Apple GPU (MPS) here; use cpu")
    elif parsed.type != "cpu":
        raise ValueError(f"{name} {device}: unsupported device type {parsed.type!r}; use cpu or cuda")
    return parsed


@dataclass(frozen=True)
class SamplingSettings:
    """The sampler's settings after checking, the task's defaults filled in. `guide_scale` is
    one float, or a GuideScale (low_noise, high_noise) for two experts; `boundary` is None for
    one model."""

    steps: int
    shift: float
    guide_scale: Union[float, GuideScale]
    boundary: Optional[float]
    solver: str
    seed: int
    denoise: float = 1.0


def check_sampling(task: Union[str, TaskConfig], *, steps: Optional[int] = None, shift: Optional[float] = None,
                   guide_scale=None, boundary: Optional[float] = None, solver: str = "unipc", seed: int = 0,
                   denoise: float = 1.0, experts: Optional[int] = None,
                   names: Optional[Names] = None) -> SamplingSettings:
    """Check the sampling half of a request (see the module docstring). `experts`: how many
    experts will run (default: two for the MoE tasks, one otherwise)."""
    task = resolve_task(task)
    experts = (2 if task.is_moe else 1) if experts is None else experts
    checks = (("steps", steps, check_steps), ("shift", shift, check_shift), ("solver", solver, check_solver),
              ("denoise", denoise, check_denoise))
    for field, value, check in checks:
        if value is not None:
            try:
                check(value)
            except ValueError as error:
                raise _renamed(error, field, names) from None
    if boundary is not None:
        if experts != 2:
            moe = ", ".join(name for name, t in TASKS.items() if t.is_moe)
            raise ValueError(f"{_named(names, 'boundary')}: {task.name} runs one model; the boundary (the "
                             f"hand-off between two experts) applies only to {moe}")
        try:
            check_boundary(boundary)
        except ValueError as error:
            raise _renamed(error, "boundary", names) from None
    guide_scale = task.sample_guide_scale if guide_scale is None else guide_scale
    checked_scale = check_guide_scale(guide_scale, pair_allowed=experts == 2, name=_named(names, "guide_scale"))
    return SamplingSettings(
        steps=task.sample_steps if steps is None else int(steps),
        shift=task.sample_shift if shift is None else float(shift),
        guide_scale=checked_scale,
        boundary=(task.boundary if boundary is None else float(boundary)) if experts == 2 else None,
        solver=solver, seed=check_seed(seed, _named(names, "seed")), denoise=float(denoise))


@dataclass(frozen=True)
class Workload:
    """What a request costs, estimated from the model's shape before anything loads."""

    tokens: int  # DiT tokens per forward
    forwards: int  # DiT forward passes (a CFG step runs two)
    parameters: int  # per expert
    flops: float  # all forwards, matmuls and attention
    activation_bytes: int  # peak per forward in bf16, roughly (one block's widest tensors)
    video_bytes: int  # the decoded float32 video
    trained_tokens: int  # one video's tokens at the task's largest trained size and default length
    batch: int = 1  # videos sampled together

    @property
    def oversized(self) -> float:
        """How many times the largest trained video's tokens one video of this request has."""
        return self.tokens / self.batch / max(1, self.trained_tokens)

    def describe(self) -> str:
        return (f"{self.forwards} DiT forwards over {self.tokens:,} tokens each (~{_scaled(self.flops, FLOP_UNITS)} "
                f"in all); ~{_scaled(self.activation_bytes, BYTE_UNITS)} of activations per forward besides the "
                f"weights ({_scaled(self.parameters, COUNT_UNITS)} parameters per expert); the decoded video takes "
                f"{_scaled(self.video_bytes, BYTE_UNITS)}")


FLOP_UNITS = ((1e18, "EFLOP"), (1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1.0, "FLOP"))
COUNT_UNITS = ((1e9, "B"), (1e6, "M"), (1e3, "k"), (1.0, ""))
BYTE_UNITS = ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB"), (1, "bytes"))


def _scaled(value: float, units: tuple[tuple[float, str], ...]) -> str:
    size, name = next(((size, name) for size, name in units if value >= size), units[-1])
    return f"{value / size:,.1f} {name}"


@dataclass(frozen=True)
class Request:
    """One checked generation request (see the module docstring). `image` is the loaded start
    image [3, H, W] in 0..1 or None; `video_size` the (width, height) the video will have (with
    an image, `size` gives only the area and the image the aspect ratio)."""

    task: TaskConfig
    size: Size
    video_size: Size
    frame_num: int
    sampling: SamplingSettings
    image: Optional[torch.Tensor] = None
    allow_any_size: bool = False

    @classmethod
    def check(cls, task: Union[str, TaskConfig], *, size: Union[str, Size, None] = None,
              frame_num: Optional[int] = None, image: Optional["ImageInput"] = None, steps: Optional[int] = None,
              shift: Optional[float] = None, guide_scale=None, boundary: Optional[float] = None,
              solver: str = "unipc", seed: int = 0, denoise: float = 1.0, allow_any_size: bool = False,
              names: Optional[Names] = None) -> "Request":
        """Raise a ValueError (FileNotFoundError for a missing image) that says what to change
        if the request cannot run; else the checked request with the task's defaults filled in.

        Sizes are the task's trained ones (the reference's SUPPORTED_SIZES) unless
        `allow_any_size`, which takes any width and height whose latent splits into whole
        patches. `None` means "the task's default" for size, frame_num, steps, shift,
        guide_scale and boundary."""
        task = resolve_task(task)
        size = check_size(task, size, has_image=image is not None, allow_any_size=allow_any_size, names=names)
        frame_num = task.frame_num if frame_num is None else frame_num
        check_frame_num(task, frame_num, names)
        sampling = check_sampling(task, steps=steps, shift=shift, guide_scale=guide_scale, boundary=boundary,
                                  solver=solver, seed=seed, denoise=denoise, names=names)
        loaded, video_size = check_image(task, image, size, names)
        return cls(task=task, size=size, video_size=video_size, frame_num=frame_num, sampling=sampling,
                   image=loaded, allow_any_size=allow_any_size)

    def with_sampling(self, **changes) -> "Request":
        return replace(self, sampling=replace(self.sampling, **changes))

    def latent_shape(self, batch: int = 1) -> tuple[int, int, int, int, int]:
        return latent_shape(self.task, self.video_size, self.frame_num, batch)

    def workload(self) -> Workload:
        """The request's cost (see Workload)."""
        return estimate_workload(self.task, self.latent_shape(), self.sampling.steps, self.sampling.guide_scale)


def estimate_workload(task: TaskConfig, shape: Sequence[int], steps: int, guide_scale: Union[float, GuideScale],
                      dit: Optional[DiTConfig] = None) -> Workload:
    """What sampling a latent of `shape` [B, C, F, H, W] for `steps` costs (Workload): each
    step runs the conditional pass and, unless every guidance scale is 1, the unconditional one.
    `dit`: the loaded model's shape (default: the task's full-size one)."""
    scales = tuple(guide_scale) if isinstance(guide_scale, GuideScale) else (guide_scale,)
    forwards = steps * (1 if all(scale == 1.0 for scale in scales) else 2)
    dit = dit or task.dit
    batch, _, frames, height, width = shape
    pt, ph, pw = dit.patch_size
    tokens = batch * (frames // pt) * (height // ph) * (width // pw)
    # per block: self-attention q, k, v, o and cross-attention q, k, v, o (dim x dim each),
    # the two FFN matrices (dim x ffn_dim each)
    parameters = dit.num_layers * (8 * dit.dim ** 2 + 2 * dit.dim * dit.ffn_dim)
    attention = 4 * tokens ** 2 * dit.dim * dit.num_layers // batch  # QK^T and AV per video, 2 flops per MAC
    flops_per_forward = 2 * parameters * tokens + attention
    activation = tokens * (dit.ffn_dim * 2 + dit.dim * 4 * 4)  # FFN hidden in bf16 + fp32 residual streams
    _, _, tf, th, tw = latent_shape(task, default_size(task), task.frame_num)
    _, stride_h, stride_w = task.vae_stride
    video_frames = (frames - 1) * task.vae_stride[0] + 1
    return Workload(tokens=tokens, forwards=forwards, parameters=parameters, flops=forwards * flops_per_forward,
                    activation_bytes=activation,
                    video_bytes=batch * 3 * video_frames * height * stride_h * width * stride_w * 4,
                    trained_tokens=(tf // pt) * (th // ph) * (tw // pw), batch=batch)


def check_size(task: TaskConfig, size: Union[str, Size, None], *, has_image: bool = False,
               allow_any_size: bool = False, names: Optional[Names] = None) -> Size:
    """(width, height) of a request, checked; None is the task's default size."""
    name = _named(names, "size")
    try:
        width, height = parse_size(size if size is not None else default_size(task))
    except ValueError as error:
        raise _renamed(error, "size", names) from None
    if width <= 0 or height <= 0:
        raise ValueError(f"{name} {width}*{height}: width and height must be positive")
    if not allow_any_size and (width, height) not in task.supported_sizes:
        raise ValueError(f"{name} {width}*{height} is not supported by {task.name}; supported sizes (width*height): "
                         f"{', '.join(format_size(s) for s in task.supported_sizes)}")
    multiple_h, multiple_w = token_multiple(task)
    if not has_image and (width % multiple_w or height % multiple_h):  # with an image only the area counts
        raise ValueError(f"{name} {width}*{height}: {task.name} needs width a multiple of {multiple_w} and height a "
                         f"multiple of {multiple_h} (VAE stride x patch size)")
    return width, height


def check_frame_num(task: TaskConfig, frame_num, names: Optional[Names] = None) -> int:
    if isinstance(frame_num, bool) or not isinstance(frame_num, numbers.Integral) or frame_num < 1 \
            or (frame_num - 1) % task.vae_stride[0]:
        raise ValueError(f"{_named(names, 'frame_num')} must be 4n+1 (1, 5, ..., 81, ..., 121) frames, got "
                         f"{frame_num!r}: the VAE encodes the first frame alone and then groups of 4")
    return int(frame_num)


def check_image(task: TaskConfig, image: Optional["ImageInput"], size: Size,
                names: Optional[Names] = None) -> tuple[Optional[torch.Tensor], Size]:
    """(the image loaded as [3, H, W] in 0..1 or None, the video's (width, height))."""
    from wan_core.pipeline.images import i2v_pixel_size, load_image, ti2v_pixel_size

    name = _named(names, "image")
    model_type = task.dit.model_type
    if image is None:
        if model_type == "i2v":
            raise ValueError(f"{task.name} animates an image: pass {name}")
        return None, size
    if model_type not in ("i2v", "ti2v"):
        raise ValueError(f"{task.name} takes no image ({name}); use i2v-A14B or ti2v-5B for image-to-video")
    loaded = load_image(image, name)
    pixel_size = i2v_pixel_size if model_type == "i2v" else ti2v_pixel_size
    out_h, out_w = pixel_size(tuple(loaded.shape[1:]), size, task)
    return loaded, (out_w, out_h)


def validate_request(task: Union[str, TaskConfig], *, size: Union[str, Size], frame_num: int,
                     image: Optional["ImageInput"] = None, steps: Optional[int] = None,
                     shift: Optional[float] = None, guide_scale=None, boundary: Optional[float] = None,
                     solver: str = "unipc", allow_any_size: bool = False, names: Optional[Names] = None) -> None:
    """`Request.check` for callers that only want the error (the image is read to check it)."""
    Request.check(task, size=size, frame_num=frame_num, image=image, steps=steps, shift=shift,
                  guide_scale=guide_scale, boundary=boundary, solver=solver, allow_any_size=allow_any_size,
                  names=names)
