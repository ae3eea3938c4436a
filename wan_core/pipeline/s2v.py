"""Speech-to-video (S2V-14B) end to end, clip by clip, as the reference's wan/speech2video.py.

    audio -> wav2vec2 features -> clips; reference image -> size, ref latent; pose -> latents;
    for each clip r: seed + r noise, a fresh schedule, CFG with zeroed audio features,
    decode behind the ref latent (first clip) or the motion latents, keep the last F frames
    (the first clip: F - 3 of them), refresh the 73-frame motion buffer and re-encode it.

Facts and sharp edges: docs/s2v-facts.md §5. Two that decide the output:

- Frame count: N = F * clips - 3, or F * clips with `init_first_frame` (the reference image as
  the first frames of the motion buffer; no first-clip drop).
- A/V alignment: output frame k was generated with audio frame k + 3 in view (the 3 dropped
  frames), so played from t = 0 the picture leads the sound by 3 frames (0.19 s). That is the
  reference's output and `generate` keeps it; `audio_for_video(..., correct_lead=True)` starts
  the sound 3 frames late instead.

On a GPU the latents, the audio features, the pose pixels and the first motion buffer (gray, or
holding the reference image) are held in the DiT's dtype (bf16), as the reference holds them;
the buffers of later clips (decoded frames) stay float32, as in the reference, which casts them
to its latents' dtype. On the CPU everything is float32.
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from wan_core.configs import TaskConfig
from wan_core.pipeline.images import ImageInput, load_image
from wan_core.pipeline.request import Size, default_size, format_size, parse_size, resolve_task
from wan_core.sampling.schedule import check_solver, check_steps, schedule
from wan_core.sampling.solvers import make_solver

if TYPE_CHECKING:
    from wan_core.dit import WanDiT

SIZE_MULTIPLE = 64      # H and W: the frame packer's 8x8-latent patch times the VAE's stride 8
FIRST_CLIP_DROP = 3     # frames dropped from the first clip (decoded behind the ref latent)
INIT_REF_FRAMES = 6     # with init_first_frame, the reference image fills the buffer's last 6 frames
POSE_BLACK = -1.0       # missing pose frames (after the pose video ends)

PoseInput = Union[str, os.PathLike, torch.Tensor, np.ndarray]
StepCallback = Callable[[int, int, torch.Tensor], None]


# --------------------------------------------------------------------------------------------
# Sizes and preprocessing


def s2v_size(image_hw: tuple[int, int], area: int) -> tuple[int, int]:
    """(H, W) of the video: the largest scale of the image whose sides, each rounded up to a
    multiple of 64, fit `area` (the reference's get_size_less_than_area).

    Scales are tried from sqrt(area / image area) down in 100 steps to the scale at which the
    rounding's worst case still fits (images already within the area: from 1.0 down to 0.1), so
    small images are enlarged and H x W's aspect may differ a little from the image's."""
    height, width = image_hw
    if height * width <= area:
        min_scale, max_scale = 0.1, 1.0
    else:
        d = SIZE_MULTIPLE - 1
        a, b, c = height * width, d * (height + width), d ** 2 - area
        min_scale = (-b + math.sqrt(b ** 2 - 2 * a * c)) / (2 * a)
        max_scale = math.sqrt(area / (height * width))
    for i in range(100):
        scale = max_scale - (max_scale - min_scale) * i / 100
        padded = [_round_up(int(side * scale)) for side in (height, width)]
        if padded[0] * padded[1] <= area:
            return padded[0], padded[1]
    # none fits: the reference's fallback, the image's aspect at the area, rounded down
    aspect = width / height
    out_w = int((area * aspect) ** 0.5 // SIZE_MULTIPLE * SIZE_MULTIPLE)
    out_h = int((area / aspect) ** 0.5 // SIZE_MULTIPLE * SIZE_MULTIPLE)
    if out_w >= width or out_h >= height:
        out_w, out_h = int(width // SIZE_MULTIPLE * SIZE_MULTIPLE), int(height // SIZE_MULTIPLE * SIZE_MULTIPLE)
    return out_h, out_w


def _round_up(side: int) -> int:
    return side + (SIZE_MULTIPLE - side % SIZE_MULTIPLE) % SIZE_MULTIPLE


def _resized_shorter(size: int, height: int, width: int) -> tuple[int, int]:
    """torchvision's Resize(size) target: the shorter side becomes `size`, the longer one scales
    with it, truncated."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's CenterCrop on [..., h, w]: pad with 0 where the image is smaller (left/top
    get the smaller half), then cut the centre (offsets rounded half to even)."""
    h, w = frames.shape[-2:]
    if height > h or width > w:
        pad_w, pad_h = max(width - w, 0), max(height - h, 0)
        frames = F.pad(frames, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        h, w = frames.shape[-2:]
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return frames[..., top:top + height, left:left + width]


def reference_pixels(image: ImageInput, height: int, width: int) -> torch.Tensor:
    """The reference image as the reference prepares it: [3, H, W] in [-1, 1].

    8-bit RGB, the shorter side resized to min(H, W) by PIL's bilinear filter (antialiased),
    then center-cropped to H x W, padding with black where the resized image is narrower."""
    from PIL import Image

    pixels = (load_image(image) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels)
    new_h, new_w = _resized_shorter(min(height, width), picture.height, picture.width)
    if (new_h, new_w) != (picture.height, picture.width):
        picture = picture.resize((new_w, new_h), Image.BILINEAR)
    resized = torch.from_numpy(np.array(picture)).permute(2, 0, 1)
    return center_crop(resized, height, width).float() / 255 * 2 - 1


def pose_frame_indices(source_fps: float, total_frames: int, wanted: int, fps: int = 16) -> list[int]:
    """Frames of a pose video taken for `wanted` output frames: every round(source_fps / fps)-th
    from frame 0 (at 30 fps: every 2nd, i.e. 15 fps), stopping at the video's end."""
    interval = max(1, round(source_fps / fps))
    return [i * interval for i in range(wanted) if i * interval < total_frames]


def read_pose_video(path: Union[str, os.PathLike], wanted: int, fps: int = 16) -> torch.Tensor:
    """The pose frames of a video file for `wanted` output frames: [n <= wanted, h, w, 3] uint8."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pose video not found: {path}")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else float(fps)
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except (av.error.FFmpegError, IndexError) as e:
        raise ValueError(f"{path} is not a readable video ({e})") from None
    indices = pose_frame_indices(rate, len(frames), wanted, fps)
    if not indices:
        raise ValueError(f"{path} holds no video frames")
    return torch.from_numpy(np.stack([frames[i] for i in indices]))


def pose_pixels(pose_video: PoseInput, height: int, width: int, num_frames: int, fps: int = 16) -> torch.Tensor:
    """The pose condition's pixels [3, num_frames, H, W] in [-1, 1]: the frames (a video file,
    or ComfyUI IMAGE frames [n, h, w, 3] in 0..1 taken as 16 fps), shorter side resized to
    min(H, W) (bilinear, antialiased, on the [-1, 1] tensor) and center-cropped (padding with 0,
    which is gray here); frames after the pose video ends are black (-1)."""
    if isinstance(pose_video, (str, os.PathLike)):
        frames = read_pose_video(pose_video, num_frames, fps).float() / 255.0
    else:
        frames = torch.as_tensor(pose_video)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
            raise ValueError(f"pose_video frames must be [frames, height, width, 3] (ComfyUI IMAGE), got shape "
                             f"{tuple(frames.shape)}")
        frames = frames[:num_frames].float() / 255.0 if frames.dtype == torch.uint8 else frames[:num_frames].float()
    frames = frames.permute(0, 3, 1, 2) * 2 - 1.0
    new_h, new_w = _resized_shorter(min(height, width), frames.shape[2], frames.shape[3])
    if (new_h, new_w) != tuple(frames.shape[2:]):
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    frames = center_crop(frames, height, width)
    missing = num_frames - frames.shape[0]
    frames = torch.cat([frames, frames.new_full((missing, 3, height, width), POSE_BLACK)])
    return frames.transpose(0, 1).contiguous()


def encode_pose_clip(vae, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One clip's pose latent [1, 16, F/4, h, w]: its first frame is duplicated in front and the
    first latent (that frame alone) dropped, so latent j covers the clip's frames 4j..4j+3."""
    clip = torch.cat([pixels[:, :1], pixels], dim=1)
    return _vae_encode(vae, clip, dtype)[:, :, 1:]


def _vae_encode(vae, video: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[3, F, H, W] pixels, rounded to `dtype` first (the reference keeps them in the DiT's) ->
    the normalised latent [1, 16, F', h, w] in float32."""
    return vae.encode(video.to(dtype)[None].to(device=vae.device, dtype=vae.dtype)).float()


# --------------------------------------------------------------------------------------------
# Audio that goes with the video


def audio_for_video(waveform: torch.Tensor, sample_rate: int, num_frames: int, fps: int = 16, *,
                    correct_lead: bool = False) -> torch.Tensor:
    """The input audio cut to the video's length (`num_frames` at `fps`), from t = 0 as the
    reference muxes it, or with `correct_lead` from FIRST_CLIP_DROP frames in, which puts each
    frame with the sound it was generated for. waveform [..., samples]; shorter audio is
    padded with silence."""
    start = round(FIRST_CLIP_DROP / fps * sample_rate) if correct_lead else 0
    length = round(num_frames / fps * sample_rate)
    part = waveform[..., start:start + length]
    return F.pad(part, (0, length - part.shape[-1]))


# --------------------------------------------------------------------------------------------
# Requests


def _check_positive_int(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1{' or None' if allow_none else ''}, got {value!r}")


def validate_s2v_request(task: TaskConfig, *, size: Size, image, audio, frames_per_clip: int,
                         num_clips: Optional[int], steps: Optional[int], shift, guide_scale, solver: str,
                         allow_any_size: bool) -> None:
    """Raise a ValueError that says what to change if an S2V request cannot run."""
    if audio is None:
        raise ValueError(f"{task.name} animates speech: pass audio= (a file, an AUDIO dict or (waveform, rate); "
                         f"CLI: --audio PATH)")
    if image is None:
        raise ValueError(f"{task.name} animates a reference image: pass image= (CLI: --image PATH)")
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"size {width}*{height}: width and height must be positive")
    if not allow_any_size and (width, height) not in task.supported_sizes:
        raise ValueError(f"size {width}*{height} is not one of {task.name}'s areas "
                         f"({', '.join(format_size(s) for s in task.supported_sizes)}); only the area counts")
    if width * height < SIZE_MULTIPLE ** 2:
        raise ValueError(f"size {width}*{height}: the area must hold at least one {SIZE_MULTIPLE}x{SIZE_MULTIPLE} "
                         f"block (S2V sizes are multiples of {SIZE_MULTIPLE})")
    _check_positive_int("frames_per_clip", frames_per_clip)
    if frames_per_clip % 4:
        raise ValueError(f"frames_per_clip must be a multiple of 4 (48, 80, ...): the VAE turns 4 frames into one "
                         f"latent, got {frames_per_clip}")
    _check_positive_int("num_clips", num_clips, allow_none=True)
    if steps is not None:
        check_steps(steps)
    if shift is not None and (isinstance(shift, bool) or not isinstance(shift, numbers.Real) or shift <= 0):
        raise ValueError(f"shift must be a number > 0, got {shift!r}")
    if guide_scale is not None and (isinstance(guide_scale, bool) or not isinstance(guide_scale, numbers.Real)
                                    or not math.isfinite(guide_scale)):
        raise ValueError(f"{task.name} takes one guide_scale number, got {guide_scale!r}")
    check_solver(solver)


# --------------------------------------------------------------------------------------------
# Generation


def generate_s2v(task: Union[str, TaskConfig], *, experts: "WanDiT", vae, text_encoder, prompt: str,
                 negative_prompt: Optional[str] = None, image: ImageInput = None, audio=None, audio_encoder=None,
                 pose_video: Optional[PoseInput] = None, num_clips: Optional[int] = None, frames_per_clip: int = 80,
                 init_first_frame: bool = False, size: Union[str, Size, None] = None, steps: Optional[int] = None,
                 shift: Optional[float] = None, guide_scale: Optional[float] = None, solver: str = "unipc",
                 seed: int = 0, callback: Optional[StepCallback] = None, interrupt: Optional[Callable[[], bool]] = None,
                 device: Union[str, torch.device, None] = None, offload_model: bool = False, t5_cpu: bool = False,
                 allow_any_size: bool = False) -> torch.Tensor:
    """A talking video [3, N, H, W] in [-1, 1] (see the module docstring for N and the audio).

    `experts`: the S2V DiT. `audio`: a path, ComfyUI AUDIO or (waveform, rate); `audio_encoder`
    from `wan_core.audio.load_audio_encoder` (runs where it is, the CPU by default as the
    reference). `image`: the reference image. `pose_video`: a video path or IMAGE frames at 16 fps.
    `num_clips`: at most this many clips (None: as many as the audio needs). `size`: the area
    only (default 1280*720). `callback(done, total, latent)` after every step with total =
    clips x steps; `interrupt()` is checked before and after every step. `offload_model`: the
    DiT waits on the CPU while the VAE works between clips (and the text encoder visits `device`
    only to encode, unless `t5_cpu`).
    """
    from wan_core.pipeline.video import _check_experts, _expert_list, encode_prompts

    task = resolve_task(task)
    size = parse_size(size if size is not None else default_size(task))
    validate_s2v_request(task, size=size, image=image, audio=audio, frames_per_clip=frames_per_clip,
                         num_clips=num_clips, steps=steps, shift=shift, guide_scale=guide_scale, solver=solver,
                         allow_any_size=allow_any_size)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    dit = _expert_list(experts)
    _check_experts(task, dit)
    dit = dit[0]
    device = torch.device(device) if device is not None else vae.device
    context, context_null = encode_prompts(text_encoder, prompt, negative_prompt or task.negative_prompt, device,
                                           move_encoder=offload_model and not t5_cpu)

    def place_dit(running: bool) -> None:
        dit.to(device if running or not offload_model else "cpu")

    return s2v_clips(task, dit, vae, context, context_null, image=image, audio=audio, audio_encoder=audio_encoder,
                     pose_video=pose_video, num_clips=num_clips, frames_per_clip=frames_per_clip,
                     init_first_frame=init_first_frame, area=size[0] * size[1], steps=steps, shift=shift,
                     guide_scale=guide_scale, solver=solver, seed=seed, callback=callback, interrupt=interrupt,
                     device=device, place_dit=place_dit)


def s2v_clips(task: TaskConfig, dit: "WanDiT", vae, context: list, context_null: list, *, image: ImageInput, audio,
              audio_encoder, pose_video: Optional[PoseInput], num_clips: Optional[int], frames_per_clip: int,
              init_first_frame: bool, area: int, steps: Optional[int], shift: Optional[float],
              guide_scale: Optional[float], solver: str, seed: int, callback: Optional[StepCallback],
              interrupt: Optional[Callable[[], bool]], device: torch.device,
              place_dit: Callable[[bool], None]) -> torch.Tensor:
    """The clip loop of `generate_s2v` for a checked request and encoded prompts (context,
    context_null: one [L, 4096] embedding each, on `device`). `place_dit(True)` runs before each
    clip's sampling, `place_dit(False)` after it (where the DiT waits while the VAE works)."""
    from wan_core.audio import audio_features, load_audio
    from wan_core.pipeline.video import GenerationInterrupted

    if audio_encoder is None:
        raise ValueError(f"{task.name} needs audio_encoder= (wan_core.audio.load_audio_encoder; the official "
                         f"folder's wav2vec2-large-xlsr-53-english/)")
    steps = task.sample_steps if steps is None else steps
    shift = task.sample_shift if shift is None else shift
    guide_scale = task.sample_guide_scale if guide_scale is None else guide_scale
    work_dtype = dit.dtype if device.type == "cuda" else torch.float32

    def check_interrupt(where: str) -> None:
        if interrupt is not None and interrupt():
            raise GenerationInterrupted(f"generation interrupted {where}")

    check_interrupt("before it started")
    features, audio_clips = audio_features(audio_encoder, load_audio(audio), 16000, frames_per_clip=frames_per_clip,
                                           fps=task.sample_fps)
    clips = audio_clips if num_clips is None else min(num_clips, audio_clips)
    features = features.to(device=device, dtype=work_dtype)

    reference = load_image(image)
    height, width = s2v_size(tuple(reference.shape[1:]), area)
    ref_pixels = reference_pixels(reference.permute(1, 2, 0), height, width)
    ref_latent = _vae_encode(vae, ref_pixels[:, None], torch.float32).to(device)
    pose = None
    if pose_video is not None:
        pixels = pose_pixels(pose_video, height, width, clips * frames_per_clip, task.sample_fps)
        pose = [encode_pose_clip(vae, chunk, work_dtype).to(device)
                for chunk in pixels.split(frames_per_clip, dim=1)]

    motion_frames = dit.config.motion_frames
    buffer = torch.zeros(3, motion_frames, height, width, dtype=work_dtype)
    drop_first_motion = task.extra.get("drop_first_motion", True)
    if init_first_frame:
        drop_first_motion = False
        buffer[:, -INIT_REF_FRAMES:] = ref_pixels[:, None].to(work_dtype)
    # a first clip that drops the motion tokens never reads the first buffer's latents
    motion_latent = None if drop_first_motion else _vae_encode(vae, buffer, work_dtype).to(device)

    total = clips * steps
    out = []
    for r in range(clips):
        first = r == 0 and drop_first_motion
        generator = torch.Generator(device=device).manual_seed(int(seed) + r)
        noise = torch.randn((1, dit.config.out_dim, frames_per_clip // 4, height // 8, width // 8),
                            generator=generator, dtype=work_dtype, device=device)
        clip_audio = features[..., r * frames_per_clip:(r + 1) * frames_per_clip]
        conditions = dict(ref_latent=ref_latent, motion_latent=None if first else motion_latent,
                          pose_latent=None if pose is None else pose[r])
        place_dit(True)
        try:
            latent = _sample_clip(dit, noise, context, context_null, clip_audio, conditions, steps=steps, shift=shift,
                                  guide_scale=guide_scale, solver=solver,
                                  on_step=lambda i, x, before=r * steps: _after_step(callback, check_interrupt,
                                                                                     before + i, total, x))
        finally:
            place_dit(False)
        prefix = ref_latent if first else motion_latent
        frames = vae.decode(torch.cat([prefix, latent.float()], dim=2).to(device=vae.device, dtype=vae.dtype))[0]
        frames = frames[:, -frames_per_clip:]
        if first:
            frames = frames[:, FIRST_CLIP_DROP:]
        out.append(frames.float().cpu())
        if r + 1 < clips:  # the next clip's motion memory: the last 73 decoded frames, re-encoded
            kept = min(motion_frames, frames.shape[1])
            # float32 from here on: the reference casts the buffer to its latents' dtype
            buffer = torch.cat([buffer[:, kept:].float(), frames[:, -kept:].float().to(buffer.device)], dim=1)
            motion_latent = _vae_encode(vae, buffer, buffer.dtype).to(device)
    return torch.cat(out, dim=1)


def _after_step(callback, check_interrupt, done: int, total: int, latent: torch.Tensor) -> None:
    if callback is not None:
        callback(done, total, latent)
    check_interrupt(f"after step {done} of {total}")


def _sample_clip(dit, noise: torch.Tensor, context, context_null, audio: torch.Tensor, conditions: dict, *,
                 steps: int, shift: float, guide_scale: float, solver: str, on_step) -> torch.Tensor:
    """One clip's latent: a fresh schedule, and at each step the conditional flow and, when
    guide_scale > 1, the unconditional one with the negative prompt and the audio features x 0
    (zero features, not absent audio: the encoder's biases and padding token still act)."""
    sigmas, timesteps = schedule(solver, steps, shift)
    stepper = make_solver(solver, sigmas.to(torch.float32))
    latent = noise
    silent = audio * 0.0
    with torch.no_grad():
        for i, t in enumerate(timesteps.tolist()):
            t_model = torch.full((1,), t, dtype=timesteps.dtype, device=latent.device)
            flow = dit(latent, t_model, context, audio_features=audio, **conditions).float()
            if guide_scale > 1:
                uncond = dit(latent, t_model, context_null, audio_features=silent, **conditions).float()
                flow = uncond + guide_scale * (flow - uncond)
            latent = stepper.step(latent, flow).to(noise.dtype)
            on_step(i + 1, latent)
    return latent
