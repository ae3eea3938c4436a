"""Loader nodes: the Wan2.2 DiT, the umt5 text encoder and the VAE.

Each loader turns a file name from ComfyUI's model folders into a handle the other nodes take.
Loaded weights are shared through `host.model_cache` (one load per file and options) and are
registered with ComfyUI's model manager through `host.HostedModel`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from collections import OrderedDict
from typing import Optional

import torch

from wan_core.configs import DiTConfig, TaskConfig, task_for_model_type
from wan_core.loading import QUANT_MODES, load_dit, detect_dit_config, convert_layout, read_state_dict, split_fp8
from wan_core.lora import Lora, LoraModel, with_loras
from wan_core.ops.attention import auto_reason, available_backends, resolve_backend
from wan_core.parallel.workers import ExpertSource
from wan_core.text import load_text_encoder
from wan_core.vae import load_vae

from . import host

CATEGORY = "Wan2.2/loaders"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NO_QUANT = "none"
AUTO = "auto"
TEXT_DEVICES = ("default", "cpu")
# Prompts whose embeddings a text encoder keeps, most recent first.
PROMPT_CACHE_SIZE = 32


@dataclass(eq=False)
class WanModel:
    """A loaded Wan DiT (WANMODEL): its weights, what it is, and the file it came from; with the
    LoRAs Wan2.2 LoRA nodes applied to this handle (the loaded weights stay the file's)."""

    hosted: host.HostedModel
    task: TaskConfig
    name: str
    loras: tuple[tuple[Lora, float], ...] = ()
    source: Optional[ExpertSource] = None  # how the multi-GPU workers load the same weights

    @property
    def module(self) -> torch.nn.Module:
        return self.hosted.module

    def runnable(self) -> LoraModel:
        """What the sampler calls: the weights plus this handle's LoRAs (none: the file's alone)."""
        return with_loras(self.module, self.loras, model_name=self.name)

    @property
    def config(self) -> DiTConfig:
        return self.module.config

    def describe(self) -> str:
        c = self.config
        billions = sum(p.numel() for p in self.module.parameters()) / 1e9
        return (f"{self.task.name}: {c.model_type} DiT, {c.num_layers} layers, dim {c.dim}, "
                f"in {c.in_dim} / out {c.out_dim} channels, {billions:.2f}B parameters, "
                f"attention {self.module.attention_backend}"
                + "".join(f"\nLoRA {lora.describe()}, strength {strength:g}" for lora, strength in self.loras))


@dataclass(eq=False)
class WanTextEncoder:
    """A loaded umt5 text encoder (WANTEXTENCODER) and the embeddings of its recent prompts.

    The handle is shared by every loader node that asks for the same file and options, so a
    prompt encoded once is not encoded again while the encoder stays loaded.
    """

    hosted: host.HostedModel
    name: str
    embeddings: "OrderedDict[str, torch.Tensor]" = field(default_factory=OrderedDict)

    def embed(self, prompts: list[str]) -> list[torch.Tensor]:
        """[L_i, 4096] embeddings of `prompts` (on the CPU), encoding only those not cached."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self.embeddings))
        if missing:
            host.load_to_compute([self.hosted])
            encoded = self.hosted.model.encode(missing)
            for prompt, embedding in zip(missing, encoded):
                self.embeddings[prompt] = embedding.cpu()
        for prompt in prompts:
            self.embeddings.move_to_end(prompt)
        while len(self.embeddings) > PROMPT_CACHE_SIZE:
            self.embeddings.popitem(last=False)
        return [self.embeddings[p] for p in prompts]


@dataclass(eq=False)
class WanVAE:
    """A loaded Wan VAE (WANVAE)."""

    hosted: host.HostedModel
    name: str

    @property
    def vae(self):
        return self.hosted.model

    def describe(self) -> str:
        v = self.vae
        return f"Wan{v.version} VAE: {v.z_dim} latent channels, stride {tuple(v.stride)}"


class W22ModelLoader:
    DESCRIPTION = ("Loads a Wan2.2 diffusion model (DiT) from models/diffusion_models in any layout "
                   "it ships in (ComfyUI repackaged fp16/fp8, official, diffusers) and detects which "
                   "variant it is: T2V-A14B, I2V-A14B (each expert is a separate file), TI2V-5B or S2V-14B.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("WANMODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded DiT; connect a high-noise and a low-noise expert to the MoE sampler.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (host.list_models("diffusion_models"), {
                "tooltip": "The DiT file in models/diffusion_models, e.g. "
                           "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors."}),
            "weight_dtype": (list(DTYPES), {
                "default": "bf16",
                "tooltip": "Precision of the weights in memory; fp8 files are dequantized into it "
                           "unless 'quantization' keeps them in fp8. bf16 is what Wan2.2 was trained in."}),
            "quantization": ([NO_QUANT, *QUANT_MODES], {
                "default": NO_QUANT,
                "tooltip": "Keep the transformer blocks' linear weights in fp8 (about half the memory "
                           "of bf16); 'none' stores every weight in weight_dtype. fp8_e4m3fn_fast also "
                           "multiplies in fp8 on GPUs that can (RTX 40xx, H100 and later; first and last "
                           "blocks stay exact): faster, slightly approximate."}),
            "attention": ([AUTO, *available_backends()], {
                "default": AUTO,
                "tooltip": "Attention kernel. auto: the fastest one this GPU runs that passes a quick "
                           "accuracy check against sdpa (on Hopper GPUs the package's 8-bit "
                           "int8_fp8_triton kernel), else sdpa (PyTorch's own, exact). The loader shows "
                           "which one runs. flash_attn and sageattention need their packages installed."}),
        }, "optional": {
            "compile_blocks": ("BOOLEAN", {
                "default": False,
                "tooltip": "Compile the transformer blocks with torch.compile: the first run takes about "
                           "a minute longer, later steps run about 10% faster with less activation memory "
                           "(bench/RESULTS.md). Needs a working Triton/C++ compiler."}),
        }}

    def load(self, model_name: str, weight_dtype: str, quantization: str, attention: str, compile_blocks: bool = False):
        _check_choice("weight_dtype", weight_dtype, DTYPES)
        _check_choice("quantization", quantization, (NO_QUANT, *QUANT_MODES))
        if attention != AUTO and attention not in available_backends():
            raise ValueError(f"attention={attention!r} is not installed here; available: "
                             f"{available_backends()} (or choose 'auto')")
        path = host.model_path("diffusion_models", model_name)
        quant = None if quantization == NO_QUANT else quantization
        backend, shown = _attention_backend(attention, DTYPES[weight_dtype])

        def load() -> WanModel:
            module = load_dit(path, dtype=DTYPES[weight_dtype], device=host.offload_device("diffusion"),
                              quant=quant)
            module.set_attention_backend(backend)
            if compile_blocks:
                module.compile_blocks()
            source = ExpertSource(str(path), str(DTYPES[weight_dtype]).removeprefix("torch."), quant, backend,
                                  compile_blocks)
            task = task_for_model_type(module.config.model_type)
            return WanModel(host.HostedModel(module, "diffusion", label=f"Wan2.2 {task.name} DiT ({model_name})"),
                            task, model_name, source=source)

        model = host.model_cache.get_or_load(("dit", str(path), weight_dtype, quantization, backend, compile_blocks), load)
        return {"ui": {"text": [model.describe() + shown]}, "result": (model,)}


class W22TextEncoderLoader:
    DESCRIPTION = ("Loads the umt5-xxl text encoder Wan2.2 uses from models/text_encoders "
                   "(ComfyUI's umt5_xxl file in fp16/fp8, or the official .pth).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("WANTEXTENCODER",)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The loaded text encoder, for Wan2.2 Text Encode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder_name": (host.list_models("text_encoders"), {
                "tooltip": "The umt5-xxl encoder file in models/text_encoders, e.g. "
                           "umt5_xxl_fp8_e4m3fn_scaled.safetensors."}),
            "weight_dtype": (list(DTYPES), {
                "default": "bf16",
                "tooltip": "Precision of the weights in memory (the reference runs umt5 in bf16)."}),
            "device": (list(TEXT_DEVICES), {
                "default": "default",
                "tooltip": "Where the encoder runs: 'default' is ComfyUI's text-encoder device; 'cpu' "
                           "keeps its ~11 GB off the GPU at the cost of slower encoding."}),
        }}

    def load(self, text_encoder_name: str, weight_dtype: str, device: str):
        _check_choice("weight_dtype", weight_dtype, DTYPES)
        _check_choice("device", device, TEXT_DEVICES)
        path = host.model_path("text_encoders", text_encoder_name)
        run_on = torch.device("cpu") if device == "cpu" else None

        def load() -> WanTextEncoder:
            encoder = load_text_encoder(path, dtype=DTYPES[weight_dtype], device=host.offload_device("text"))
            hosted = host.HostedModel(encoder, "text", module=encoder.model, device=run_on,
                                      label=f"Wan2.2 umt5 text encoder ({text_encoder_name})")
            return WanTextEncoder(hosted, text_encoder_name)

        return (host.model_cache.get_or_load(("text", str(path), weight_dtype, device), load),)


class W22VAELoader:
    DESCRIPTION = ("Loads a Wan VAE from models/vae: wan_2.1_vae for the A14B models, wan2.2_vae "
                   "for TI2V-5B. The version is detected from the weights.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("WANVAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The loaded VAE, for the video latent and decode nodes.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (host.list_models("vae"), {
                "tooltip": "The VAE file in models/vae: wan_2.1_vae.safetensors (T2V/I2V-A14B) or "
                           "wan2.2_vae.safetensors (TI2V-5B)."}),
            "weight_dtype": (list(DTYPES), {
                "default": "fp32",
                "tooltip": "Precision of the VAE weights; the reference decodes in fp32, bf16 halves "
                           "the memory."}),
        }}

    def load(self, vae_name: str, weight_dtype: str):
        _check_choice("weight_dtype", weight_dtype, DTYPES)
        path = host.model_path("vae", vae_name)

        def load() -> WanVAE:
            vae = load_vae(path, dtype=DTYPES[weight_dtype], device=host.offload_device("vae"))
            return WanVAE(host.HostedModel(vae, "vae", label=f"Wan{vae.version} VAE ({vae_name})"), vae_name)

        vae = host.model_cache.get_or_load(("vae", str(path), weight_dtype), load)
        return {"ui": {"text": [vae.describe()]}, "result": (vae,)}


def detect_model(name: str) -> dict:
    """What the web extension shows for a DiT file before it is loaded: the detected task and
    the limits it puts on the video (read from tensor names and shapes, no weights loaded)."""
    path = host.model_path("diffusion_models", name)
    state_dict, _ = convert_layout(read_state_dict(path), "dit")
    plain, quantized = split_fp8(state_dict)
    shapes = {**{k: v.shape for k, v in plain.items()}, **{k: s.shape for k, (s, _) in quantized.items()}}
    config = detect_dit_config(shapes)
    task = task_for_model_type(config.model_type)
    return task_limits(task, config)


def task_limits(task: TaskConfig, config: DiTConfig) -> dict:
    """The facts the front end needs to check a sampler and a video size for this model."""
    return {
        "task": task.name,
        "model_type": config.model_type,
        "boundary": task.boundary,
        "sample_shift": task.sample_shift,
        "sample_steps": task.sample_steps,
        "size_multiple": task.vae_stride[1] * config.patch_size[1],
        # I2V takes only the area from width x height; the start image sets the aspect ratio
        # and the pipeline rounds the sides (wan_core.pipeline.i2v_pixel_size).
        "size_is_area": config.model_type == "i2v",
        "frame_stride": task.vae_stride[0],
        "supported_sizes": [list(s) for s in task.supported_sizes],
        "fps": task.sample_fps,
    }


def _attention_backend(attention: str, dtype: torch.dtype) -> tuple[str, str]:
    """(the back-end `attention` runs as on the diffusion device, what the loader adds to its
    description: why, for auto)."""
    device = host.compute_device("diffusion")
    backend = resolve_backend(attention, device, dtype)
    return backend, f" (auto: {auto_reason(device, dtype)})" if attention == AUTO else ""


def _model_info(query: dict[str, str]) -> dict:
    """The /wan22/model_info answer; errors are short and name no server folder (the editor
    shows them on the loader node)."""
    name = query.get("name")
    if not name:
        raise ValueError("GET /wan22/model_info needs ?name=<file in models/diffusion_models>")
    try:
        return detect_model(name)
    except FileNotFoundError:
        raise FileNotFoundError(f"{name} is not in models/diffusion_models: add it, then press Refresh") from None
    except (ValueError, OSError) as error:
        raise ValueError(f"{name} is not a Wan2.2 diffusion model: {_without_folders(str(error))}") from None


def _without_folders(message: str) -> str:
    """`message` with every absolute path cut to its last part (no server folders shown)."""
    return re.sub(r"(?:[A-Za-z]:)?[/\\](?:[^\s'\",;:()/\\]+[/\\])+", "", message)


# The web extension asks which variant a file is (and the sizes it takes) before it is loaded.
host.add_get_route("/wan22/model_info", _model_info)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


NODE_CLASS_MAPPINGS = {
    "W22ModelLoader": W22ModelLoader,
    "W22TextEncoderLoader": W22TextEncoderLoader,
    "W22VAELoader": W22VAELoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "W22ModelLoader": "Wan2.2 Model Loader",
    "W22TextEncoderLoader": "Wan2.2 Text Encoder Loader",
    "W22VAELoader": "Wan2.2 VAE Loader",
}
