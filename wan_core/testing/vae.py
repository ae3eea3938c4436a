"""Tiny random Wan VAE checkpoints written in every real layout.

The canonical state dict is `WanVAE(config).state_dict()` (official names) filled with seeded
random values; each layout is that dict written the way the real files are: the official
`.pth`, ComfyUI's safetensors (official names), diffusers' AutoencoderKLWan folder
(config.json + diffusion_pytorch_model.safetensors) or a single diffusers-named file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file

from wan_core.loading import to_layout
from wan_core.testing.files import random_state_dict, write_single_file
from wan_core.vae.config import VAE_CONFIGS, VAEConfig

VAE_LAYOUTS = ("official", "comfy", "diffusers", "diffusers_file")
_TINY_WIDTHS = {"2.1": (8, 8), "2.2": (8, 12)}  # (encoder, decoder); 2.2 keeps them different, as the real one


def tiny_vae_config(version: str) -> VAEConfig:
    """The Wan `version` ("2.1" | "2.2") VAE at small widths: same names, strides and latent
    channels (the normalisation constants are per channel), a few thousand times fewer weights."""
    if version not in VAE_CONFIGS:
        raise ValueError(f"unknown VAE version {version!r}; expected one of {sorted(VAE_CONFIGS)}")
    return VAE_CONFIGS[version].tiny(*_TINY_WIDTHS[version])


def vae_state_dict(config: VAEConfig, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                   device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """Seeded random weights under the official names of `WanVAE(config)`.

    Conv weights ~ N(0, 1/fan_in), norm gains ~ 1 + N(0, 0.2^2), biases ~ N(0, 0.2^2): every
    tensor differs from every other, so a wrong or swapped one changes the output (the
    attention output projection too, which the reference initialises to zero). On the meta
    device only names and shapes are made.
    """
    from wan_core.vae.model import WanVAE

    def kind(name: str, shape: torch.Size) -> str:
        if name.endswith(".gamma"):
            return "gain"
        return "matrix" if name.endswith(".weight") else "other"

    return random_state_dict(lambda: WanVAE(config), kind, dtype=dtype, seed=seed, device=device)


def diffusers_vae_config(config: VAEConfig) -> dict:
    """The config.json of diffusers' AutoencoderKLWan for `config`."""
    values = {"_class_name": "AutoencoderKLWan", "base_dim": config.dim, "decoder_base_dim": config.dec_dim,
              "z_dim": config.z_dim, "dim_mult": list(config.dim_mult), "num_res_blocks": config.num_res_blocks,
              "attn_scales": [], "temperal_downsample": list(config.temporal_downsample), "dropout": 0.0,
              "latents_mean": list(config.latents_mean), "latents_std": list(config.latents_std),
              "is_residual": config.residual_stages, "in_channels": 3 * config.patch_size ** 2,
              "out_channels": 3 * config.patch_size ** 2, "scale_factor_temporal": config.stride[0],
              "scale_factor_spatial": config.stride[1]}
    values["patch_size"] = config.patch_size if config.patch_size > 1 else None
    return values


def write_vae_checkpoint(path: Union[str, Path], version: str, layout: str, *, config: Optional[VAEConfig] = None,
                         seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a random Wan `version` VAE in `layout` and return what to pass to `load_vae`.

    "official": a `.pth`; "comfy": a `.safetensors` with the official names; "diffusers": the
    folder `path` with config.json and diffusion_pytorch_model.safetensors; "diffusers_file":
    one `.safetensors` with diffusers names. File layouts write `path` (suffix added when it
    has none), or a file named after version and layout inside `path` if it is a folder.
    `config` defaults to `tiny_vae_config(version)`.
    """
    if layout not in VAE_LAYOUTS:
        raise ValueError(f"unknown VAE layout {layout!r}; expected one of {VAE_LAYOUTS}")
    config = config or tiny_vae_config(version)
    if config.version != version:
        raise ValueError(f"config is a Wan{config.version} VAE but version {version!r} was asked for")
    tensors = vae_state_dict(config, seed=seed, dtype=dtype)
    if layout.startswith("diffusers"):
        tensors = to_layout(tensors, "vae", [f"diffusers_{version}"])
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    path = Path(path)
    if layout == "diffusers":
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(diffusers_vae_config(config), indent=2))
        return path
    return write_single_file(path, f"wan{version.replace('.', '_')}_vae_{layout}", tensors,
                             as_pickle=layout == "official")
