"""Loading a Wan VAE from any layout it ships in, its version told by names and shapes."""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence, Union

import torch

from wan_core.loading import (Source, _describe, check_load_options, convert_layout, layout_names, mismatch_report,
                              read_state_dict, require_kind)
from wan_core.vae.config import VAE_CONFIGS, VAEConfig
from wan_core.vae.model import WanVAE

# Wan2.2 nests its blocks in stages (encoder.downsamples.<stage>.downsamples.<block>)
_WAN22_MARKER = "encoder.downsamples.0.downsamples.0.residual.0.gamma"
_WAN21_MARKER = "encoder.downsamples.0.residual.0.gamma"
_REQUIRED = ("conv2.weight", "encoder.conv1.weight", "decoder.head.0.gamma")


def detect_vae_config(shapes: Mapping[str, Union[Sequence[int], torch.Tensor]]) -> VAEConfig:
    """The `VAEConfig` of a VAE state dict in official names, from its names and shapes: the
    version from the block nesting, the widths from the first encoder conv and the decoder
    head, and the latent channels from `conv2`."""
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in shapes.items()}
    missing = [k for k in _REQUIRED if k not in shapes]
    if missing:
        raise ValueError(f"not a Wan VAE state dict in the official naming: missing {missing}")
    if _WAN22_MARKER in shapes:
        base = VAE_CONFIGS["2.2"]
    elif _WAN21_MARKER in shapes:
        base = VAE_CONFIGS["2.1"]
    else:
        raise ValueError(f"a VAE state dict with neither {_WAN21_MARKER!r} (Wan2.1) nor {_WAN22_MARKER!r} (Wan2.2)")
    z_dim = shapes["conv2.weight"][0]
    if z_dim != base.z_dim:
        raise ValueError(f"its block layout is the Wan{base.version} VAE's, which has {base.z_dim} latent "
                         f"channels, but conv2 has {z_dim}")
    dim, in_channels = shapes["encoder.conv1.weight"][:2]
    if in_channels != 3 * base.patch_size ** 2:
        raise ValueError(f"the encoder's first conv takes {in_channels} channels; the Wan{base.version} VAE "
                         f"takes {3 * base.patch_size ** 2}")
    return replace(base, dim=dim, dec_dim=shapes["decoder.head.0.gamma"][0])


def load_vae(source: Source, *, dtype: torch.dtype = torch.float32,
             device: Union[str, torch.device] = "cpu") -> WanVAE:
    """A `WanVAE` from an official `.pth` (Wan2.1_VAE.pth, Wan2.2_VAE.pth), a ComfyUI
    safetensors file (official names, any float dtype), a diffusers AutoencoderKLWan folder or
    file, or a state dict. Weights are assigned once, already in `dtype` on `device`."""
    name = _describe(source)
    check_load_options(dtype)
    device = torch.device(device)

    state_dict, layouts = convert_layout(read_state_dict(source), "vae")
    require_kind(list(state_dict), "vae", name)
    try:
        config = detect_vae_config(state_dict)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None

    with torch.device("meta"):
        model = WanVAE(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_names_and_shapes(expected, state_dict, name, layouts, config)
    tensors = {k: state_dict[k].to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _check_names_and_shapes(expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, torch.Tensor],
                            name: str, layouts: Sequence[str], config: VAEConfig) -> None:
    problems = mismatch_report(expected, {k: v.shape for k, v in state_dict.items()})
    if problems:
        raise ValueError(f"{name} (read as the {layout_names(layouts)} layout) does not match the "
                         f"Wan{config.version} VAE its names suggest (widths {config.dim}/{config.dec_dim}): "
                         f"tensors {problems}. Is the file complete and a Wan VAE?")
