"""Text encode, video latent set-up, the MoE sampler, decode, and the sampler's memory settings.

Each node checks its inputs, calls wan_core (the pipeline's pieces and the sampler), and hands
back ComfyUI's own formats: LATENT is {"samples": [B, C, F, H, W]} (in the reference's
normalised latent space; decode it with Wan2.2 Decode), IMAGE is [frames, H, W, 3] in 0..1.
The video latent node stores what the sampler needs besides the noise (the i2v conditioning
`y`, the TI2V first-frame latent) in the LATENT dict under CONDITION_KEY.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from wan_core import pipeline
from wan_core.configs import DEFAULT_NEGATIVE_PROMPT
from wan_core.offload import AUTO, HOST_MEMORY_MODES, activation_bytes, device_bytes_needed, release_host_weights
from wan_core.preview import latent_to_rgb
from wan_core.sampling import SOLVERS, GuideScale, sample
from wan_core.vae import Tiling

from . import host
from .loaders import WanModel, WanTextEncoder, WanVAE
from .parallel import sample_on_workers

log = logging.getLogger(__name__)
CONDITION_KEY = "wan22"
MAX_SEED = 0xFFFFFFFFFFFFFFFF
MAX_SIZE = 4096
MAX_LENGTH = 1025
SAMPLED_TYPES = ("t2v", "i2v", "ti2v")
SPLITS = ("boundary", "steps")
# The node inputs that wan_core's request checks speak of (wan_core.pipeline.Request's fields).
LATENT_NAMES = {"size": "width x height", "frame_num": "length", "image": "start_image"}
SAMPLER_NAMES = {"guide_scale": "cfg_high_noise / cfg_low_noise", "boundary": "boundary"}
MAX_BLOCKS = 40  # the A14B experts' layer count (the 5B has 30; the sampler checks per model)
MAX_PREFETCH = 8


class W22TextEncode:
    DESCRIPTION = ("Encodes the positive and negative prompts with the umt5 text encoder. Prompts "
                   "already encoded by the same encoder are taken from its cache, so changing one "
                   "prompt does not re-encode the other.")
    CATEGORY = "Wan2.2/conditioning"
    RETURN_TYPES = ("WANCONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The prompt embeddings for the MoE sampler.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("WANTEXTENCODER", {"tooltip": "From Wan2.2 Text Encoder Loader."}),
            "positive": ("STRING", {
                "multiline": True, "default": "",
                "tooltip": "What the video shows: subject, scene, motion, camera, style. Wan2.2 was "
                           "trained on long, detailed prompts (Chinese or English)."}),
            "negative": ("STRING", {
                "multiline": True, "default": DEFAULT_NEGATIVE_PROMPT,
                "tooltip": "What to steer away from (used when CFG > 1). Pre-filled with the "
                           "reference's default negative prompt, which the models were trained "
                           "with; left empty, that default is used (as the reference does)."}),
        }}

    def encode(self, text_encoder: WanTextEncoder, positive: str, negative: str):
        _check_type("text_encoder", text_encoder, WanTextEncoder, "Wan2.2 Text Encoder Loader")
        for name, value in (("positive", positive), ("negative", negative)):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {type(value).__name__}")
        context, context_null = text_encoder.embed([positive, negative or DEFAULT_NEGATIVE_PROMPT])
        return ({"context": context, "context_null": context_null},)


class W22VideoLatent:
    DESCRIPTION = ("Sets up the video to generate: its size and length, and for image-to-video the "
                   "start image. I2V-A14B needs a start image (the video keeps its aspect ratio "
                   "at the area of width x height, as the reference does); TI2V-5B takes one "
                   "optionally; T2V-A14B takes none.")
    CATEGORY = "Wan2.2/conditioning"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("An empty video latent [batch, channels, frames, height, width] carrying the "
                       "image conditioning, for the MoE sampler.",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("WANMODEL", {
                    "tooltip": "The model that will sample this latent (its variant decides the "
                               "latent's channels and the image conditioning)."}),
                "width": ("INT", {
                    "default": 832, "min": 16, "max": MAX_SIZE, "step": 16,
                    "tooltip": "Video width in pixels: a multiple of 16 (32 for TI2V-5B). Trained "
                               "sizes: 832x480 / 1280x720 (A14B), 1280x704 (5B)."}),
                "height": ("INT", {
                    "default": 480, "min": 16, "max": MAX_SIZE, "step": 16,
                    "tooltip": "Video height in pixels: a multiple of 16 (32 for TI2V-5B)."}),
                "length": ("INT", {
                    "default": 81, "min": 1, "max": MAX_LENGTH, "step": 4,
                    "tooltip": "Number of frames, 4k+1 (81 = 5 s at 16 fps for A14B; 121 = 5 s at "
                               "24 fps for the 5B)."}),
                "batch_size": ("INT", {
                    "default": 1, "min": 1, "max": 64,
                    "tooltip": "Videos generated at once with the same prompt (different noise)."}),
            },
            "optional": {
                "vae": ("WANVAE", {
                    "tooltip": "The VAE that encodes the start image (needed with start_image)."}),
                "start_image": ("IMAGE", {
                    "tooltip": "The first frame of the video (I2V-A14B: required; TI2V-5B: optional; "
                               "only the first image of a batch is used)."}),
            },
        }

    def make(self, model: WanModel, width: int, height: int, length: int, batch_size: int,
             vae: Optional[WanVAE] = None, start_image: Optional[torch.Tensor] = None):
        _check_type("model", model, WanModel, "Wan2.2 Model Loader")
        _check_sampled(model, "model")
        task = model.task
        if start_image is None and task.dit.model_type == "i2v":
            raise ValueError(f"{task.name} animates an image: connect a Load Image node to start_image "
                             f"(and the VAE to vae)")
        if start_image is not None:
            _check_type("vae", vae, WanVAE, "Wan2.2 VAE Loader (needed to encode start_image)")
            _check_image("start_image", start_image)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        if vae is not None:
            _check_type("vae", vae, WanVAE, "Wan2.2 VAE Loader")
            _check_vae_fits(vae, task)  # before sampling, not at decode
        pipeline.Request.check(task, size=(width, height), frame_num=length,
                               image=None if start_image is None else start_image[:1], allow_any_size=True,
                               names=LATENT_NAMES)
        condition: dict[str, Any] = {"task": task.name, "y": None, "first_frame_latent": None}
        if start_image is None:
            shape = pipeline.latent_shape(task, (width, height), length, batch_size)
        else:
            host.load_to_compute([vae.hosted])
            encoded = pipeline.encode_image_condition(task, vae.vae, start_image[:1], (width, height), length).cpu()
            if task.dit.model_type == "i2v":
                condition["y"] = encoded
                shape = (batch_size, task.latent_channels, *encoded.shape[2:])
            else:
                condition["first_frame_latent"] = encoded
                shape = (batch_size, task.latent_channels, pipeline.latent_frames(length, task), *encoded.shape[3:])
        return ({"samples": torch.zeros(shape), CONDITION_KEY: condition},)


class W22MemorySettings:
    DESCRIPTION = ("Memory settings for the MoE sampler. With offload_inactive_expert the expert "
                   "that is not running waits in CPU memory, so only one 14B expert occupies the GPU "
                   "at a time (the reference's --offload_model); without it both stay loaded when "
                   "they fit, and the hand-off costs nothing. Block swap keeps some transformer "
                   "blocks in CPU memory and copies each to the GPU for its turn while the previous "
                   "one computes: a 14B expert at 720p fits a 12 GB card (bench/RESULTS.md).")
    CATEGORY = "Wan2.2/sampling"
    RETURN_TYPES = ("WANMEMORY",)
    RETURN_NAMES = ("memory",)
    OUTPUT_TOOLTIPS = ("Connect to the memory input of Wan2.2 MoE Sampler.",)
    FUNCTION = "settings"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "offload_inactive_expert": ("BOOLEAN", {
                "default": True,
                "tooltip": "Move the high-noise expert to the CPU when the low-noise one takes over "
                           "(and keep the low-noise one off the GPU until then)."}),
            "blocks_to_swap": ([AUTO, *(str(n) for n in range(MAX_BLOCKS + 1))], {
                "default": AUTO,
                "tooltip": "Transformer blocks kept in CPU memory and streamed to the GPU each step "
                           "(0: none; an A14B expert has 40, the 5B 30). auto: the fewest that fit the "
                           "GPU's free memory for this video's size and length. Swapping all 40 costs a "
                           "few percent of step time."}),
            "prefetch_blocks": ("INT", {
                "default": 1, "min": 0, "max": MAX_PREFETCH,
                "tooltip": "Swapped blocks copied ahead while the current one computes (each takes "
                           "one block of GPU memory: 0.7 GB bf16, 0.35 GB fp8 at 14B)."}),
        }, "optional": {
            "swap_host_memory": (list(HOST_MEMORY_MODES), {
                "default": "auto",
                "tooltip": "Where swapped blocks wait. pinned: copied once into page-locked RAM "
                           "(fastest; takes their size in RAM). staged: read from the memory-mapped "
                           "file through small page-locked buffers (for machines without the RAM). "
                           "auto: pinned when RAM allows."}),
        }}

    def settings(self, offload_inactive_expert: bool, blocks_to_swap: str = AUTO, prefetch_blocks: int = 1,
                 swap_host_memory: str = "auto"):
        if not isinstance(offload_inactive_expert, bool):
            raise TypeError(f"offload_inactive_expert must be true or false, got {offload_inactive_expert!r}")
        if blocks_to_swap != AUTO:
            try:
                blocks_to_swap = int(blocks_to_swap)
            except (TypeError, ValueError):
                blocks_to_swap = -1
            if not 0 <= blocks_to_swap <= MAX_BLOCKS:
                raise ValueError(f"blocks_to_swap must be 'auto' or a whole number 0..{MAX_BLOCKS}, got "
                                 f"{blocks_to_swap!r}")
        if isinstance(prefetch_blocks, bool) or not isinstance(prefetch_blocks, int) or \
                not 0 <= prefetch_blocks <= MAX_PREFETCH:
            raise ValueError(f"prefetch_blocks must be a whole number 0..{MAX_PREFETCH}, got {prefetch_blocks!r}")
        if swap_host_memory not in HOST_MEMORY_MODES:
            raise ValueError(f"swap_host_memory must be one of {list(HOST_MEMORY_MODES)}, got {swap_host_memory!r}")
        return ({"offload_inactive_expert": offload_inactive_expert, "blocks_to_swap": blocks_to_swap,
                 "prefetch_blocks": prefetch_blocks, "swap_host_memory": swap_host_memory},)


class W22MoESampler:
    DESCRIPTION = ("Samples the video latent. For the A14B models the high-noise expert runs the "
                   "steps whose timestep is at or above boundary x 1000, the low-noise expert the "
                   "rest, each with its own CFG scale (the graph editor shows the hand-off step); "
                   "split = steps gives the high-noise expert a fixed number of first steps instead. "
                   "CFG 1.0 skips the negative prompt (one forward per step). TI2V-5B is one model: "
                   "connect it to high_noise_model and leave low_noise_model empty.")
    CATEGORY = "Wan2.2/sampling"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The denoised video latent, for Wan2.2 Decode.",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "high_noise_model": ("WANMODEL", {
                    "tooltip": "The high-noise expert (wan2.2_*_high_noise_14B), or the only model "
                               "(TI2V-5B)."}),
                "conditioning": ("WANCONDITIONING", {"tooltip": "From Wan2.2 Text Encode."}),
                "latent": ("LATENT", {"tooltip": "From Wan2.2 Video Latent."}),
                "seed": ("INT", {
                    "default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                    "tooltip": "Seed of the initial noise; the same seed gives the same video."}),
                "steps": ("INT", {
                    "default": 40, "min": 1, "max": 1000,
                    "tooltip": "Sampling steps (reference: 40 for A14B, 50 for the 5B)."}),
                "shift": ("FLOAT", {
                    "default": 12.0, "min": 0.01, "max": 100.0, "step": 0.1,
                    "tooltip": "Noise schedule shift; higher spends more steps at high noise "
                               "(reference: 12 for T2V-A14B, 5 for I2V-A14B and the 5B)."}),
                "cfg_high_noise": ("FLOAT", {
                    "default": 4.0, "min": 0.0, "max": 30.0, "step": 0.1,
                    "tooltip": "CFG scale of the high-noise expert's steps, and of every step for a "
                               "single model (reference: 4.0 T2V, 3.5 I2V, 5.0 5B). 1.0 skips the "
                               "negative prompt."}),
                "cfg_low_noise": ("FLOAT", {
                    "default": 3.0, "min": 0.0, "max": 30.0, "step": 0.1,
                    "tooltip": "CFG scale of the low-noise expert's steps (reference: 3.0 T2V, 3.5 I2V; "
                               "unused by the 5B)."}),
                "boundary": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 0.999, "step": 0.005,
                    "tooltip": "MoE hand-off as a fraction of the 1000 training timesteps: the "
                               "high-noise expert runs while t >= boundary x 1000. 0 = the detected "
                               "model's own (0.875 T2V, 0.9 I2V; none for the 5B)."}),
                "solver": (list(SOLVERS), {
                    "default": "unipc",
                    "tooltip": "unipc is the reference's default; dpm++ is its alternative; euler is "
                               "first order (needs more steps)."}),
                "denoise": ("FLOAT", {
                    "default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                    "tooltip": "1.0 generates from pure noise. Below 1 the input latent's video is "
                               "kept in part: the schedule is built for steps / denoise steps and "
                               "only its last `steps` run."}),
            },
            "optional": {
                "low_noise_model": ("WANMODEL", {
                    "tooltip": "The low-noise expert (wan2.2_*_low_noise_14B). Leave empty for the 5B; "
                               "empty for an A14B model, the high-noise expert runs every step."}),
                "memory": ("WANMEMORY", {"tooltip": "From Wan2.2 Memory Settings (optional)."}),
                "split": (list(SPLITS), {
                    "default": "boundary",
                    "tooltip": "How the steps are shared between the experts. boundary: the reference's "
                               "rule (t >= boundary x 1000 runs the high-noise expert). steps: the first "
                               "high_noise_steps steps run the high-noise expert, the rest the low-noise one "
                               "(for few-step LoRAs; 4-step Lightning at shift 5: 2 + 2, which the boundary "
                               "rule also gives)."}),
                "high_noise_steps": ("INT", {
                    "default": 2, "min": 0, "max": 1000,
                    "tooltip": "With split = steps: how many of the first steps the high-noise expert runs."}),
                "parallel": ("WANPARALLEL", {"tooltip": "From Wan2.2 Multi-GPU (optional): sample on several GPUs."}),
            },
        }

    def run(self, high_noise_model: WanModel, conditioning: dict, latent: dict, seed: int, steps: int,
            shift: float, cfg_high_noise: float, cfg_low_noise: float, boundary: float, solver: str,
            denoise: float, low_noise_model: Optional[WanModel] = None, memory: Optional[dict] = None,
            split: str = "boundary", high_noise_steps: int = 2, parallel: Optional[dict] = None):
        _check_type("high_noise_model", high_noise_model, WanModel, "Wan2.2 Model Loader")
        _check_sampled(high_noise_model, "high_noise_model")
        task = high_noise_model.task
        if low_noise_model is not None:
            _check_type("low_noise_model", low_noise_model, WanModel, "Wan2.2 Model Loader")
            if low_noise_model.config.model_type != high_noise_model.config.model_type:
                raise ValueError(f"high_noise_model is {task.name} but low_noise_model is "
                                 f"{low_noise_model.task.name}: connect the two experts of one model")
        if not isinstance(conditioning, dict) or "context" not in conditioning:
            raise TypeError("conditioning must come from Wan2.2 Text Encode")
        samples, condition = _check_latent(latent, task)
        if isinstance(boundary, bool) or not isinstance(boundary, (int, float)) or not 0 <= boundary < 1:
            raise ValueError(f"boundary must be 0 (the model's own) or a fraction in (0, 1), got {boundary!r}")
        hand_off = boundary if boundary > 0 else task.boundary
        if hand_off is None and low_noise_model is not None:
            raise ValueError(f"{task.name} is one model with no expert hand-off: disconnect "
                             f"low_noise_model, or set boundary > 0 to switch models at that timestep")
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {list(SPLITS)}")
        if split == "steps" and hand_off is None:
            raise ValueError(f"split='steps' shares the steps between two experts, but {task.name} is one "
                             f"model: use split='boundary'")
        two = hand_off is not None
        settings = pipeline.check_sampling(
            task, steps=steps, shift=shift, boundary=hand_off, solver=solver, seed=seed, denoise=denoise,
            guide_scale=GuideScale(low_noise=cfg_low_noise, high_noise=cfg_high_noise) if two else cfg_high_noise,
            experts=2 if two else 1, names=SAMPLER_NAMES)
        memory = memory or {}

        models = [high_noise_model, low_noise_model or high_noise_model] if two else [high_noise_model]
        device = models[0].hosted.device
        batch = samples.shape[0]
        work = pipeline.estimate_workload(task, tuple(samples.shape), settings.steps, settings.guide_scale,
                                          high_noise_model.config)
        log.info("Wan2.2 sampling: %s", work.describe())
        if work.oversized > 1:
            log.warning("Wan2.2 sampling: %.1fx the tokens of %s's largest trained video: expect that many times the "
                        "time per step or more", work.oversized, task.name)
        sample_inputs = dict(
            noise=pipeline.initial_noise(tuple(samples.shape), settings.seed, device),
            context=[conditioning["context"].to(device)] * batch,
            context_null=[conditioning["context_null"].to(device)] * batch,
            steps=settings.steps, shift=settings.shift, guide_scale=settings.guide_scale,
            boundary=settings.boundary, solver=settings.solver, seed=settings.seed, denoise=settings.denoise,
            latent_image=samples.to(device) if denoise < 1 else None,
            y=_batched(condition.get("y"), batch, device),
            first_frame_latent=_batched(condition.get("first_frame_latent"), batch, device),
            high_noise_steps=high_noise_steps if split == "steps" else None)
        if parallel is not None:  # the worker processes load and place the models themselves
            offload = memory.get("offload_inactive_expert", False)
            return ({**latent, "samples": sample_on_workers(parallel, models,
                                                            {**sample_inputs, "offload_inactive_expert": offload})},)
        experts = _ExpertPlacement(models, memory, tuple(samples.shape)).experts
        on_step, on_denoised = _sampling_progress()
        result = sample(experts if two else experts[0], **sample_inputs, callback=on_step, denoised_callback=on_denoised)
        return ({**latent, "samples": result.cpu()},)


class W22Decode:
    DESCRIPTION = ("Decodes a video latent into frames with the Wan VAE (wan_2.1_vae for A14B, "
                   "wan2.2_vae for the 5B). Tiling decodes the frames in overlapping spatial tiles "
                   "to bound memory at large sizes.")
    CATEGORY = "Wan2.2/decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The video frames [frames, height, width, 3] in 0..1 (videos of a batch one "
                       "after another), for Create Video / Save Video / Preview Image.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("WANVAE", {"tooltip": "From Wan2.2 VAE Loader; the same VAE family as the model."}),
            "latent": ("LATENT", {"tooltip": "From Wan2.2 MoE Sampler."}),
            "tiled": ("BOOLEAN", {
                "default": False,
                "tooltip": "Decode in overlapping spatial tiles: much less memory at 720p, a tiny "
                           "difference at tile seams."}),
            "tile_size": ("INT", {
                "default": 256, "min": 64, "max": MAX_SIZE, "step": 16,
                "tooltip": "Tile width and height in pixels (used when tiled). 720p x 81 frames fits a 12 GB "
                           "card with 512 (overlap 64: 9.6 GiB peak with the fp32 VAE, measured on an H200; "
                           "640 needs about 13 GiB); 256 needs about 3 GiB and takes longer."}),
            "tile_overlap": ("INT", {
                "default": 64, "min": 0, "max": MAX_SIZE // 2, "step": 16,
                "tooltip": "Overlap between neighbouring tiles in pixels, blended linearly (used when "
                           "tiled)."}),
        }}

    def decode(self, vae: WanVAE, latent: dict, tiled: bool, tile_size: int, tile_overlap: int):
        _check_type("vae", vae, WanVAE, "Wan2.2 VAE Loader")
        samples = _latent_samples(latent)
        if samples.shape[1] != vae.vae.z_dim:
            raise ValueError(f"the latent has {samples.shape[1]} channels but the Wan{vae.vae.version} VAE "
                             f"decodes {vae.vae.z_dim}: use wan_2.1_vae with the A14B models and "
                             f"wan2.2_vae with TI2V-5B")
        tile = Tiling(tile_size=(tile_size, tile_size), overlap=(tile_overlap, tile_overlap)) if tiled else None
        host.load_to_compute([vae.hosted])
        video = vae.vae.decode(samples, tile=tile, callback=host.progress_callback("Wan2.2 decoding"))
        return (_video_to_images(video),)


# --- plumbing between ComfyUI's formats and wan_core's --------------------------------------------

def _sampling_progress():
    """(callback, denoised_callback) for `sample`: the bar and console line after each step,
    with a preview of that step's denoised estimate when the host shows previews."""
    progress = host.progress_callback("Wan2.2 sampling")
    if not host.previews_enabled():
        return progress, None
    latest = {}

    def on_denoised(step: int, total: int, x0: torch.Tensor) -> None:
        latest["picture"] = latent_to_rgb(x0)

    def on_step(step: int, total: int, *_args) -> None:
        progress(step, total, preview=latest.pop("picture", None))

    return on_step, on_denoised


class _ExpertPlacement:
    """Puts each expert on its compute device when its steps begin.

    The sampler calls the experts in order (all high-noise steps, then all low-noise ones), so
    an expert is placed on its first call. With `offload_inactive` the expert that stops
    running is sent to its offload device first, so the two never share the GPU; either way it
    gives its host RAM back (mapped from its file again when next used). On a GPU the block
    swap is set up first (`memory`'s blocks_to_swap; "auto" after the host freed what it could
    for the whole model), then the host is told the device bytes and the activation memory.
    Placement goes through the host, so ComfyUI's model manager knows where every model is.
    """

    def __init__(self, models: list[WanModel], memory: dict, latent_shape: tuple[int, ...]):
        self.offload_inactive = memory.get("offload_inactive_expert", False)
        self.blocks_to_swap = memory.get("blocks_to_swap", 0)
        self.prefetch = memory.get("prefetch_blocks", 1)
        self.host_memory = memory.get("swap_host_memory", "auto")
        self.latent_shape = latent_shape
        self.active: Optional[host.HostedModel] = None
        self.experts = [_PlacedExpert(self, m) for m in models]

    def activate(self, hosted: host.HostedModel) -> None:
        if self.active is hosted:
            return
        if self.active is not None:
            if self.offload_inactive:
                host.offload([self.active])
            release_host_weights(self.active.module)
        activations = self._set_up_swap(hosted)
        host.load_to_compute([hosted], memory_required=activations)
        self.active = hosted

    def _set_up_swap(self, hosted: host.HostedModel) -> int:
        """Configure the expert's block swap for its device; returns its activation bytes."""
        module, device = hosted.module, hosted.device
        if device.type != "cuda":
            return 0
        activations = activation_bytes(module, self.latent_shape)
        free = None
        if self.blocks_to_swap == AUTO:
            whole = device_bytes_needed(module, 0, prefetch=self.prefetch, activation_bytes=activations)
            host.free_device_memory(whole, device, keep=[hosted])
            free = host.device_free_bytes(device) + module.placement.device_bytes()
        swapped = module.enable_block_swap(self.blocks_to_swap, device=device, prefetch=self.prefetch,
                                           host_memory=self.host_memory, latent_shape=self.latent_shape,
                                           free_memory=free, place=False)
        hosted.set_device_bytes(device_bytes_needed(module, swapped, prefetch=self.prefetch, activation_bytes=0))
        return activations


class _PlacedExpert:
    """An expert as the sampler calls it: `expert(x, t, context, y=...)`, with its `config`
    (the model's weights with the LoRAs of its handle)."""

    def __init__(self, placement: _ExpertPlacement, model: WanModel):
        self.placement = placement
        self.hosted = model.hosted
        self.model = model.runnable()
        self.config = self.model.config

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context, **kwargs) -> torch.Tensor:
        self.placement.activate(self.hosted)
        return self.model(x, t, context, **kwargs)


def _video_to_images(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] in [-1, 1] -> ComfyUI IMAGE [B*F, H, W, 3] in [0, 1] on the CPU."""
    frames = (video.float().clamp(-1, 1) + 1) / 2
    return frames.permute(0, 2, 3, 4, 1).flatten(0, 1).cpu().contiguous()


def _check_image(name: str, images: Any) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a ComfyUI IMAGE [batch, height, width, 3], got {shape}")


def _latent_samples(latent: dict) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 5:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else None
        raise ValueError(f"latent must be a video LATENT with samples [batch, channels, frames, height, "
                         f"width] (from Wan2.2 Video Latent or MoE Sampler), got samples of shape {shape}")
    return samples


def _check_latent(latent: dict, task) -> tuple[torch.Tensor, dict]:
    samples = _latent_samples(latent)
    condition = latent.get(CONDITION_KEY) or {}
    made_for = condition.get("task")
    if made_for is not None and made_for != task.name:
        raise ValueError(f"the latent was set up for {made_for} but the model is {task.name}: connect "
                         f"the same model to Wan2.2 Video Latent and the sampler")
    if samples.shape[1] != task.latent_channels:
        raise ValueError(f"the latent has {samples.shape[1]} channels; {task.name} samples "
                         f"{task.latent_channels}. Make it with Wan2.2 Video Latent from this model")
    return samples, condition


def _check_vae_fits(vae: WanVAE, task) -> None:
    if vae.vae.version != task.vae_version:
        raise ValueError(f"{task.name} works with the Wan{task.vae_version} VAE but the vae input is "
                         f"Wan{vae.vae.version} ({vae.name})")


def _check_sampled(model: WanModel, name: str) -> None:
    if model.config.model_type not in SAMPLED_TYPES:
        raise ValueError(f"{name} is a {model.task.name} model; this node samples "
                         f"{', '.join(SAMPLED_TYPES)} models")


def _check_type(name: str, value: Any, kind: type, source: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{name} must come from {source}, got {type(value).__name__}")


def _batched(condition: Optional[torch.Tensor], batch: int, device: torch.device) -> Optional[torch.Tensor]:
    """A one-image condition [1, ...] for every video of the batch, on `device`."""
    return None if condition is None else condition.to(device).expand(batch, *condition.shape[1:])


NODE_CLASS_MAPPINGS = {
    "W22TextEncode": W22TextEncode,
    "W22VideoLatent": W22VideoLatent,
    "W22MemorySettings": W22MemorySettings,
    "W22MoESampler": W22MoESampler,
    "W22Decode": W22Decode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "W22TextEncode": "Wan2.2 Text Encode",
    "W22VideoLatent": "Wan2.2 Video Latent",
    "W22MemorySettings": "Wan2.2 Memory Settings",
    "W22MoESampler": "Wan2.2 MoE Sampler",
    "W22Decode": "Wan2.2 Decode",
}
