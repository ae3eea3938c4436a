"""Text-to-video, image-to-video and text-image-to-video generation, end to end.

    request checks -> text embeddings -> seeded noise (+ image condition) -> sample -> VAE decode

Follows the reference's wan/text2video.py, image2video.py and textimage2video.py. An empty
negative prompt means the task's default (the Chinese one the models were trained with).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch

from wan_core.configs import TaskConfig
from wan_core.pipeline.images import ImageInput, encode_image_condition, initial_noise
from wan_core.pipeline.request import Request, Size, resolve_task

if TYPE_CHECKING:
    from wan_core.dit import WanDiT

Experts = Union["WanDiT", Sequence["WanDiT"]]
StepCallback = Callable[[int, int, torch.Tensor], None]


class GenerationInterrupted(RuntimeError):
    """Raised when the interrupt check asks generation to stop; nothing is returned."""


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
             output: str = "video", request: Optional[Request] = None,
             decode_callback: Optional[Callable[[int, int], None]] = None, **s2v_inputs) -> torch.Tensor:
    """Generate one video; returns [3, F, H, W] in [-1, 1] (or with output="latent" the final
    latent [1, C, F', H', W'] before decoding).

    task: "t2v-A14B", "i2v-A14B" or "ti2v-5B" (or a TaskConfig). experts: (high_noise,
    low_noise) for the A14B tasks, one model for TI2V-5B. `size` (width, height) or "W*H",
    `frame_num`, `steps`, `shift`, `guide_scale` ((low_noise, high_noise) or one number) and
    `boundary` default to the task's reference values. `image`: required for i2v-A14B, optional
    for ti2v-5B (see `load_image` for the accepted kinds). `seed`: the noise seed (same seed,
    same video). Everything is checked (`Request.check`) before any work; a caller that checked
    already passes `request=` instead of the request's arguments. `callback(step, total,
    latent)` runs after every step and may raise to stop; `decode_callback(done, total)` during
    the VAE decode. `interrupt()` is checked before sampling, after every step and during the
    decode and, when it returns True, stops generation with `GenerationInterrupted`.
    `device`: where sampling runs (default: the VAE's device). `offload_model`: keep the DiTs
    (and, unless `t5_cpu`, the text encoder) on the CPU and move each to `device` only while it
    runs. `t5_cpu`: the text encoder runs where it is (the CPU) and only its output moves.

    s2v-14B takes its own inputs (audio, audio_encoder, pose_video, num_clips, frames_per_clip,
    init_first_frame) instead of frame_num and boundary: `wan_core.pipeline.s2v.generate_s2v`.
    """
    from wan_core.sampling import sample

    task = request.task if request is not None else resolve_task(task)
    if task.dit.model_type == "s2v":
        from wan_core.pipeline.s2v import generate_s2v

        if frame_num is not None or boundary is not None or output != "video" or request is not None:
            raise ValueError(f"{task.name} sets its length with frames_per_clip and num_clips, runs one model and "
                             f"checks its own request: frame_num, boundary, output and request do not apply")
        return generate_s2v(task, experts=experts, vae=vae, text_encoder=text_encoder, prompt=prompt,
                            negative_prompt=negative_prompt, image=image, size=size, steps=steps, shift=shift,
                            guide_scale=guide_scale, solver=solver, seed=seed, callback=callback, interrupt=interrupt,
                            device=device, offload_model=offload_model, t5_cpu=t5_cpu,
                            allow_any_size=allow_any_size, **s2v_inputs)
    if s2v_inputs:
        raise TypeError(f"generate() got inputs {sorted(s2v_inputs)} that only s2v-14B takes")
    if request is None:
        request = Request.check(task, size=size, frame_num=frame_num, image=image, steps=steps, shift=shift,
                                guide_scale=guide_scale, boundary=boundary, solver=solver, seed=seed,
                                allow_any_size=allow_any_size)
    task, settings, frame_num = request.task, request.sampling, request.frame_num
    if output not in ("video", "latent"):
        raise ValueError(f"output must be 'video' or 'latent', got {output!r}")
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
    if request.image is not None:
        picture = request.image.permute(1, 2, 0)  # [H, W, 3] in 0..1
        condition = encode_image_condition(task, vae, picture, request.size, frame_num).to(device)
        if task.dit.model_type == "i2v":
            y = condition
        else:
            first_frame_latent = condition
    noise = initial_noise(request.latent_shape(), settings.seed, device)

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
                        context_null, steps=settings.steps, shift=settings.shift, guide_scale=settings.guide_scale,
                        boundary=settings.boundary, solver=settings.solver, y=y, seed=settings.seed,
                        callback=on_step, first_frame_latent=first_frame_latent,
                        offload_inactive_expert=offload_model and len(expert_list) == 2)
    finally:
        if offload_model:
            for expert in expert_list:
                expert.to("cpu")
    if output == "latent":
        return latent

    def on_decode(done: int, total: int) -> None:
        if decode_callback is not None:
            decode_callback(done, total)
        check_interrupt(f"while decoding ({done} of {total} latent frames done)")

    return vae.decode(latent.to(device=vae.device, dtype=vae.dtype), callback=on_decode)[0]
