"""End-to-end latent parity with diffusers' Wan pipelines (issue 4, test 6(d)).

Both sides get the same tiny random weights (our official-layout checkpoints, renamed to
diffusers' names and loaded into WanTransformer3DModel / AutoencoderKLWan), the same initial
noise (`latents=`), the same prompt embeddings (our umt5 output, zero-padded to 512 tokens as
the reference pads them, passed as prompt_embeds) and the reference's sigma table written into
diffusers' scheduler, since diffusers' own flow schedule is not the reference's. For I2V and
TI2V the image goes through diffusers' own image path (preprocess, VAE encode, mask); the image
is given at the output size so the one step that differs on purpose (the reference's bicubic
resize, and its area/aspect rounding, which diffusers leaves to the caller) is the identity.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wan_core.configs import TEXT_LEN, get_task
from wan_core.loading import to_layout
from wan_core.pipeline import initial_noise, latent_shape, load_task_models
from wan_core.sampling import handoff_index, schedule
from wan_core.testing import write_dit_checkpoint, write_vae_checkpoint

TOLERANCE = 1e-4  # max |ours - diffusers| / max |diffusers| over the final latent, fp32
PROMPT, NEGATIVE = "a white cat sits on a wooden windowsill", "blurry, static"
SIZE, FRAMES, STEPS, SEED = (64, 32), 5, 6, 11



def diffusers_transformer(expert, folder):
    """diffusers' WanTransformer3DModel holding `expert`'s weights under diffusers' names."""
    from diffusers import WanTransformer3DModel

    config_folder = write_dit_checkpoint(folder, expert.config.model_type, "diffusers", config=expert.config)
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(config_folder))
    model.load_state_dict(to_layout(expert.state_dict(), "dit", ["diffusers"]), strict=True)
    return model.eval()


def diffusers_vae(vae, folder):
    """diffusers' AutoencoderKLWan holding our VAE's weights."""
    from diffusers import AutoencoderKLWan

    config_folder = write_vae_checkpoint(folder, vae.version, "diffusers", config=vae.config)
    model = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(config_folder))
    model.load_state_dict(to_layout(vae.state_dict(), "vae", [f"diffusers_{vae.version}"]), strict=True)
    return model.eval()


def scheduler_with_our_table(solver: str, steps: int, shift: float):
    """diffusers' multistep scheduler with the reference's solver settings, whose set_timesteps
    (called by the pipeline) ends by writing the reference's sigmas and timesteps into it."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    common = dict(use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=2, lower_order_final=True,
                  final_sigmas_type="zero")
    if solver == "unipc":
        scheduler = UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, **common)
    else:
        scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **common)
    sigmas, timesteps = schedule(solver, steps, shift)
    own_set_timesteps = scheduler.set_timesteps

    def set_timesteps(num_inference_steps, device=None, **kwargs):
        assert num_inference_steps == steps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            own_set_timesteps(num_inference_steps, device=device, **kwargs)
        scheduler.sigmas = sigmas.to(torch.float32)  # the reference steps with a float32 table
        scheduler.timesteps = timesteps.clone()

    scheduler.set_timesteps = set_timesteps
    return scheduler


def padded_embeddings(text_encoder, prompt: str) -> torch.Tensor:
    embedding = text_encoder.encode([prompt])[0].float()
    return F.pad(embedding, (0, 0, 0, TEXT_LEN - embedding.shape[0]))[None]


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def random_image(width: int, height: int) -> Image.Image:
    pixels = (np.random.default_rng(5).random((height, width, 3)) * 255).astype(np.uint8)
    return Image.fromarray(pixels)


def run_both(task_name, folders, tmp_path, *, solver="unipc", image=None):
    """(our final latent, diffusers' final latent) for one request at the task's defaults."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    task = get_task(task_name)
    models = load_task_models(task, folders[task_name], dtype=torch.float32, device="cpu")
    request = dict(prompt=PROMPT, negative_prompt=NEGATIVE, size=SIZE, frame_num=FRAMES, steps=STEPS,
                   solver=solver, seed=SEED, image=image, allow_any_size=True)
    ours = models.generate(**request, output="latent")

    experts = models.experts if task.is_moe else (models.experts,)
    transformers = [diffusers_transformer(e, tmp_path / f"dit{i}") for i, e in enumerate(experts)]
    if task.is_moe:
        low, high = task.sample_guide_scale
        guidance = dict(guidance_scale=high, guidance_scale_2=low)  # diffusers: transformer = high-noise expert
    else:
        guidance = dict(guidance_scale=task.sample_guide_scale)
    components = dict(tokenizer=None, text_encoder=None,
                      scheduler=scheduler_with_our_table(solver, STEPS, task.sample_shift),
                      transformer=transformers[0], transformer_2=transformers[1] if task.is_moe else None,
                      boundary_ratio=task.boundary, expand_timesteps=task.dit.model_type == "ti2v")
    call = dict(prompt_embeds=padded_embeddings(models.text_encoder, PROMPT),
                negative_prompt_embeds=padded_embeddings(models.text_encoder, NEGATIVE),
                height=SIZE[1], width=SIZE[0], num_frames=FRAMES, num_inference_steps=STEPS,
                latents=initial_noise(latent_shape(task, SIZE, FRAMES), SEED), output_type="latent",
                return_dict=False, **guidance)
    if image is None:
        pipeline = WanPipeline(vae=None, **components)
    else:
        pipeline = WanImageToVideoPipeline(vae=diffusers_vae(models.vae, tmp_path / "vae"), **components)
        call["image"] = image
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipeline(**call)[0]
    return ours, theirs


@pytest.mark.parametrize("task_name", ["t2v-A14B", "i2v-A14B"])
def test_both_experts_run_in_these_requests(task_name):
    task = get_task(task_name)
    _, timesteps = schedule("unipc", STEPS, task.sample_shift)
    assert 0 < handoff_index(timesteps, task.boundary) < STEPS


@pytest.mark.parametrize("task, solver, with_image, oracle", [
    ("t2v-A14B", "unipc", False, "WanPipeline, two transformers"),
    ("t2v-A14B", "dpm++", False, "WanPipeline, two transformers"),
    ("i2v-A14B", "unipc", True, "WanImageToVideoPipeline, two transformers"),
    ("ti2v-5B", "unipc", False, "WanPipeline, expand_timesteps"),
    ("ti2v-5B", "unipc", True, "WanImageToVideoPipeline, expand_timesteps"),
])
def test_latents_match_diffusers_pipelines(tiny_folders, tmp_path, task, solver, with_image, oracle):
    image = random_image(*SIZE) if with_image else None
    ours, theirs = run_both(task, tiny_folders, tmp_path, solver=solver, image=image)
    error = relative_error(ours, theirs)
    print(f"{task} {solver}{' with image' if with_image else ''} vs {oracle}: max relative error {error:.2e}")
    assert error <= TOLERANCE
