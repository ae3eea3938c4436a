"""ComfyUI's own Wan model (comfy/ldm/wan/model.py), built on our weights, for side-by-side checks
and benchmarks.

ComfyUI is not a package on any registry and is never copied into this project: pass the folder
that holds its `comfy/` package (a checkout, or a copy of that one folder). Its WanModel uses the
official tensor names, as ours does, and keeps its patch embedding in float32 whatever the
model's dtype (ComfyUI casts the latent to float32 for it); every other tensor is assigned as it
is, so the weights sit in memory once. ComfyUI runs the model as its sampler does: latent and
text embeddings in the model's dtype, timesteps in float32, text padded to text_len.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn

from wan_core.configs import DiTConfig


def import_comfy(root: Union[str, os.PathLike], *, cpu: bool = False):
    """ComfyUI's `comfy` package from the folder `root` that holds it. `cpu`: tell ComfyUI there is
    no GPU (its model_management looks for one when first imported)."""
    root = Path(root)
    if not (root / "comfy" / "ldm" / "wan" / "model.py").is_file():
        raise FileNotFoundError(f"{root} holds no ComfyUI comfy/ package (no comfy/ldm/wan/model.py): pass a "
                                f"ComfyUI checkout or the folder a copy of its comfy/ folder sits in")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True
    import comfy.ldm.wan.model
    import comfy.ops

    return comfy


def comfyui_wan_model(root: Union[str, os.PathLike], config: DiTConfig, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """ComfyUI's WanModel with `config`'s shapes (t2v, i2v-A14B and ti2v-5B: the Wan2.2 models
    ComfyUI runs as its 't2v' type) holding the tensors of `state_dict` (our canonical names)."""
    if config.model_type not in ("t2v", "i2v", "ti2v"):
        raise ValueError(f"ComfyUI's WanModel has no {config.model_type} variant here (S2V is another class)")
    some = state_dict["blocks.0.self_attn.q.weight"]
    comfy = import_comfy(root, cpu=some.device.type == "cpu")
    with torch.device("meta"):
        model = comfy.ldm.wan.model.WanModel(
            model_type="t2v", patch_size=config.patch_size, text_len=config.text_len, in_dim=config.in_dim,
            dim=config.dim, ffn_dim=config.ffn_dim, freq_dim=config.freq_dim, text_dim=config.text_dim,
            out_dim=config.out_dim, num_heads=config.num_heads, num_layers=config.num_layers, qk_norm=config.qk_norm,
            cross_attn_norm=config.cross_attn_norm, eps=config.eps, dtype=some.dtype,
            operations=comfy.ops.disable_weight_init)
    weights = {name: tensor.float() if name.startswith("patch_embedding.") else tensor
               for name, tensor in state_dict.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def comfyui_forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """ComfyUI's model on our forward's inputs: x [B, C, F, H, W], t [B] (or [B, L]), context
    [B, text_len, text_dim] already padded; x and context are cast to the model's dtype."""
    dtype = model.blocks[0].self_attn.q.weight.dtype
    return model(x.to(dtype), t.float(), context.to(dtype))
