"""The sampling loop: expert choice (MoE hand-off), classifier-free guidance, solver steps.

Follows the reference's generate loops (wan/text2video.py, image2video.py, textimage2video.py):
at each step the expert whose noise range holds t runs on the conditional and, unless its
guidance scale is 1, the unconditional context; the guided flow drives the solver.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Sequence, Union

import torch

from wan_core.offload import release_host_weights, return_freed_host_memory
from wan_core.sampling.schedule import (check_boundary, check_denoise, check_solver, check_steps,
                                        runs_high_noise_expert, schedule)
from wan_core.sampling.guidance import scales_by_expert
from wan_core.sampling.solvers import make_solver

DEFAULT_PATCH_SIZE = (1, 2, 2)

StepCallback = Callable[[int, int, torch.Tensor], None]


def sample(experts: Union[Any, Sequence[Any]], noise: torch.Tensor, context: Any, context_null: Any, *,
           steps: int, shift: float, guide_scale: Union[float, Sequence[float]],
           boundary: Optional[float] = None, solver: str = "unipc", y: Optional[torch.Tensor] = None,
           seed: Optional[int] = None, callback: Optional[StepCallback] = None, denoise: float = 1.0,
           first_frame_latent: Optional[torch.Tensor] = None, latent_image: Optional[torch.Tensor] = None,
           offload_inactive_expert: bool = False, high_noise_steps: Optional[int] = None,
           denoised_callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Denoise `noise` [B, C, F, H, W] into a clean latent with the reference's schedule.

    experts: one model, or (high_noise_expert, low_noise_expert) with `boundary` (fraction of
        the 1000 training timesteps): the high-noise expert runs the steps with t >= boundary * 1000.
        Each is called as model(x, t, context, y=y) and returns the flow prediction like x; one
        that also has `cond_and_uncond(x, t, context, context_null, y=y)` gives both predictions
        of a guided step at once (wan_core.parallel's CFG-parallel).
    context, context_null: the prompt and negative-prompt embeddings (lists of [L_i, 4096],
        one per batch item), passed to the model as they are. context_null may be None when
        every guidance scale is 1 (then no unconditional pass runs).
    guide_scale: one finite scale, or (low_noise_scale, high_noise_scale) like the reference
        config (a `GuideScale` names them). flow = uncond + scale * (cond - uncond).
    solver: "unipc" (the reference's default), "dpm++" or "euler".
    y: the image condition for i2v models (concatenated to x on channels by the model).
    seed: accepted for a stable signature; these solvers are deterministic and draw no random
        numbers, so the result depends only on the inputs (bit-identical on the CPU).
    callback(step, total, latent): after each step, with step = steps done (1..total); an
        exception it raises stops sampling and propagates (that is how interrupts work).
    denoise < 1: refine `latent_image` (required then): the schedule is built for
        floor(steps / denoise) steps and only its last `steps` run.
    latent_image: a clean latent like noise; sampling then starts from
        sigma * noise + (1 - sigma) * latent_image at the first sigma that runs. Without it the
        start is the noise itself, as in the reference.
    first_frame_latent [B or 1, C, 1, H, W]: TI2V image-to-video: the first latent frame is
        held at this clean latent (set before the first step and after every step) and its
        tokens get timestep 0; the model then gets per-token timesteps [B, tokens].
    offload_inactive_expert: keep only the expert in use on the latent's device.
    high_noise_steps: with two experts, an int N in 0..steps sends the first N steps (of those
        that run) to the high-noise expert and the rest to the low-noise one, instead of the
        boundary rule (which is then not needed; a boundary given too is ignored). The 4-step
        Lightning LoRAs' recipe is 2 + 2, which the official boundaries also give at shift 5.
    denoised_callback(step, total, x0): after each step (before `callback`), with that step's
        estimate of the clean latent, x0 = x - sigma * flow (for previews).

    Returns the latent on noise's device, in float32 (float64 if noise is float64).
    """
    experts = _as_expert_list(experts)
    check_steps(steps)
    if high_noise_steps is None:
        _check_experts_and_boundary(experts, boundary)
    else:
        _check_high_noise_steps(high_noise_steps, steps, len(experts))
    check_solver(solver)
    check_denoise(denoise)
    if not isinstance(noise, torch.Tensor) or noise.ndim != 5:
        raise ValueError("noise must be a tensor [batch, channels, frames, height, width], got "
                         f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(step, total, latent), got {callback!r}")
    scales = scales_by_expert(guide_scale, len(experts))
    if context_null is None and any(scale != 1.0 for scale in scales):
        raise ValueError("context_null (the negative prompt's embedding) is needed for guidance scales "
                         f"other than 1, got guide_scale={guide_scale!r}")
    _check_batch("context", context, noise.shape[0])
    _check_batch("context_null", context_null, noise.shape[0])

    sigmas, timesteps = schedule(solver, steps, shift, denoise)
    # The reference keeps its sigma table as float32 and steps with it.
    stepper = make_solver(solver, sigmas.to(torch.float32))

    work_dtype = torch.promote_types(noise.dtype, torch.float32)
    x = _initial_latent(noise, latent_image, denoise, float(stepper.sigmas[0]), work_dtype)
    first_frame = None
    if first_frame_latent is not None:
        first_frame = _check_first_frame(first_frame_latent, x)
        x = _hold_first_frame(x, first_frame)

    active = None
    with torch.no_grad():
        for i, t in enumerate(timesteps.tolist()):
            # experts[0] is the high-noise expert (or the only one)
            if high_noise_steps is not None:
                index = 0 if i < high_noise_steps else 1
            else:
                index = 0 if len(experts) == 1 or runs_high_noise_expert(t, boundary) else 1
            expert, scale = experts[index], scales[index]
            if len(experts) == 2 and expert is not active:
                if offload_inactive_expert:
                    _make_active(expert, experts[1 - index], x.device)
                # only the expert in use keeps its weights in host RAM; the other is mapped
                # from its file again when it next runs
                release_host_weights(experts[1 - index])
            active = expert

            if first_frame is None:
                t_model = torch.full((x.shape[0],), t, dtype=timesteps.dtype, device=x.device)
            else:
                t_model = _per_token_timesteps(t, x, _patch_size(expert), timesteps.dtype)
            flow = _guided_flow(expert, x, t_model, context, context_null, y, scale, work_dtype)
            if denoised_callback is not None:
                denoised_callback(i + 1, steps, x - float(stepper.sigmas[i]) * flow)
            x = stepper.step(x, flow)
            if first_frame is not None:
                x = _hold_first_frame(x, first_frame)
            if callback is not None:
                callback(i + 1, steps, x)
    return_freed_host_memory()
    return x


def _as_expert_list(experts: Any) -> list:
    if isinstance(experts, (list, tuple)):
        if len(experts) not in (1, 2):
            raise ValueError("experts must be one model or (high_noise_expert, low_noise_expert), "
                             f"got {len(experts)} models")
        return list(experts)
    return [experts]


def _check_experts_and_boundary(experts: list, boundary: Optional[float]) -> None:
    if len(experts) == 2 and boundary is None:
        raise ValueError("two experts (high_noise, low_noise) need boundary, the hand-off point as a "
                         "fraction of 1000 timesteps (0.875 for T2V-A14B, 0.9 for I2V-A14B)")
    if len(experts) == 1 and boundary is not None:
        raise ValueError(f"boundary={boundary!r} needs two experts (high_noise, low_noise), but one "
                         "model was given; drop boundary for a single model")
    if boundary is not None:
        check_boundary(boundary)


def _check_high_noise_steps(high_noise_steps: int, steps: int, num_experts: int) -> None:
    if num_experts != 2:
        raise ValueError(f"high_noise_steps={high_noise_steps!r} splits the steps between two experts "
                         "(high_noise, low_noise), but one model was given")
    if isinstance(high_noise_steps, bool) or not isinstance(high_noise_steps, numbers.Integral) \
            or not 0 <= high_noise_steps <= steps:
        raise ValueError(f"high_noise_steps must be a whole number in 0..steps ({steps}): how many of the "
                         f"first steps the high-noise expert runs; got {high_noise_steps!r}")


def _check_batch(name: str, context: Any, batch: int) -> None:
    if isinstance(context, (list, tuple)) and len(context) != batch:
        raise ValueError(f"{name} has {len(context)} entries but noise has batch {batch}; "
                         "give one embedding per batch item")


def _initial_latent(noise: torch.Tensor, latent_image: Optional[torch.Tensor], denoise: float,
                    first_sigma: float, dtype: torch.dtype) -> torch.Tensor:
    if latent_image is None:
        if denoise < 1:
            raise ValueError(f"denoise={denoise!r} refines an existing latent: pass latent_image "
                             "(or use denoise=1 to generate from noise)")
        return noise.to(dtype)  # the reference starts from the noise itself
    if tuple(latent_image.shape) != tuple(noise.shape):
        raise ValueError(f"latent_image has shape {tuple(latent_image.shape)}, noise {tuple(noise.shape)}; "
                         "they must match")
    latent_image = latent_image.to(device=noise.device, dtype=dtype)
    return first_sigma * noise.to(dtype) + (1 - first_sigma) * latent_image


def _check_first_frame(first_frame_latent: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    batch, channels, _, height, width = x.shape
    shape = tuple(first_frame_latent.shape)
    if len(shape) != 5 or shape[0] not in (1, batch) or shape[1:] != (channels, 1, height, width):
        batches = "1" if batch == 1 else f"{batch} or 1"
        raise ValueError(f"first_frame_latent must have shape [{batches}, {channels}, 1, {height}, {width}] "
                         f"(one latent frame like the noise), got {shape}")
    return first_frame_latent.to(device=x.device, dtype=x.dtype)


def _hold_first_frame(x: torch.Tensor, first_frame: torch.Tensor) -> torch.Tensor:
    return torch.cat([first_frame.expand(x.shape[0], -1, -1, -1, -1), x[:, :, 1:]], dim=2)


def _patch_size(expert: Any) -> tuple[int, int, int]:
    config = getattr(expert, "config", None)
    return tuple(getattr(config, "patch_size", DEFAULT_PATCH_SIZE))


def _per_token_timesteps(t: float, x: torch.Tensor, patch_size: tuple[int, int, int],
                         dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """[B, tokens] timesteps, frame-major like the model's patch order; 0 on the first frame's
    tokens, which hold the clean image (the reference's textimage2video)."""
    batch, _, frames, height, width = x.shape
    pt, ph, pw = patch_size
    if frames % pt or height % ph or width % pw:
        raise ValueError(f"latent size {frames}x{height}x{width} (frames x height x width) is not "
                         f"divisible by the model's patch size {patch_size}")
    grid = torch.full((batch, frames // pt, height // ph, width // pw), t, dtype=dtype, device=x.device)
    grid[:, 0] = 0
    return grid.flatten(1)


def _guided_flow(expert: Any, x: torch.Tensor, t: torch.Tensor, context: Any, context_null: Any,
                 y: Optional[torch.Tensor], scale: float, dtype: torch.dtype) -> torch.Tensor:
    if scale != 1.0 and hasattr(expert, "cond_and_uncond"):  # both passes at once (wan_core.parallel)
        cond, uncond = (flow.to(dtype) for flow in expert.cond_and_uncond(x, t, context, context_null, y=y))
        return uncond + scale * (cond - uncond)
    cond = expert(x, t, context, y=y).to(dtype)
    if scale == 1.0:
        return cond  # uncond + 1 * (cond - uncond) is cond: skip the unconditional pass
    uncond = expert(x, t, context_null, y=y).to(dtype)
    return uncond + scale * (cond - uncond)


def _make_active(expert: Any, inactive: Any, device: torch.device) -> None:
    """Two 14B experts in bf16 take about 2 x 28 GB of weights, which with activations do not fit
    one GPU together, and only one runs at a time: the other waits in CPU RAM. The inactive one
    leaves first so the GPU never holds both."""
    inactive.to("cpu")
    expert.to(device)
