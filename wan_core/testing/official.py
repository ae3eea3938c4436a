"""The reference's own S2V model (a checkout of the official Wan2.2 code), for parity checks.

The official code is not a package on any registry and is never copied into this project: a
user points WAN22_OFFICIAL_CODE (or a benchmark's --official) at a checkout. Its package
__init__ imports every pipeline (decord, librosa, ...), so only the model's modules are
imported, under stand-in parent packages; its flash-attention call, which requires a CUDA
build of flash-attn, is replaced by PyTorch's scaled_dot_product_attention (the same math:
the S2V model attends without masks, every sequence at full length).
"""
from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F

from wan_core.configs import DiTConfig

OFFICIAL_CODE_ENV = "WAN22_OFFICIAL_CODE"


def _sdpa_flash_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                          causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16,
                          version=None):
    """The reference's flash_attention(q, k, v [B, L, N, d]) for unmasked, full-length sequences."""
    out_dtype = q.dtype
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if q.dtype not in (torch.float16, torch.bfloat16) and q.device.type == "cuda":
        q, k, v = (t.to(dtype) for t in (q, k, v))  # the reference casts fp32 inputs to its half dtype
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype)).transpose(1, 2).to(out_dtype)


def official_s2v_class(checkout: Union[str, os.PathLike]):
    """WanModel_S2V from an official Wan2.2 checkout (the folder holding wan/)."""
    root = Path(checkout) / "wan"
    if not (root / "modules" / "s2v" / "model_s2v.py").is_file():
        raise FileNotFoundError(f"{checkout} is not a checkout of the official Wan2.2 code (no "
                                f"wan/modules/s2v/model_s2v.py)")
    for name, folder in (("wan", root), ("wan.modules", root / "modules"), ("wan.modules.s2v", root / "modules" / "s2v"),
                         ("wan.distributed", root / "distributed")):
        package = sys.modules.get(name)
        if package is None or list(getattr(package, "__path__", [])) != [str(folder)]:
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
    model = importlib.import_module("wan.modules.model")
    model.flash_attention = _sdpa_flash_attention
    s2v = importlib.import_module("wan.modules.s2v.model_s2v")
    s2v.flash_attention = _sdpa_flash_attention
    return s2v.WanModel_S2V


def build_official_s2v(checkout: Union[str, os.PathLike], config: DiTConfig, state_dict: dict[str, torch.Tensor]):
    """The reference's WanModel_S2V with the 14B's switches (wan_s2v_14B.py) and `config`'s
    shapes, holding exactly the tensors of `state_dict` (assigned, not copied)."""
    cls = official_s2v_class(checkout)
    some = next(iter(state_dict.values()))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(some.dtype)
    try:
        with torch.device(some.device):
            model = cls(cond_dim=config.cond_dim, audio_dim=config.audio_dim, num_audio_token=4, enable_adain=True,
                        adain_mode="attn_norm", audio_inject_layers=list(config.audio_inject_layers), zero_init=True,
                        zero_timestep=True, enable_motioner=False, add_last_motion=True, enable_tsm=False,
                        trainable_token_pos_emb=False, enable_framepack=True, framepack_drop_mode="padd",
                        patch_size=config.patch_size, text_len=config.text_len, in_dim=config.in_dim, dim=config.dim,
                        ffn_dim=config.ffn_dim, freq_dim=config.freq_dim, text_dim=config.text_dim,
                        out_dim=config.out_dim, num_heads=config.num_heads, num_layers=config.num_layers,
                        qk_norm=config.qk_norm, cross_attn_norm=config.cross_attn_norm, eps=config.eps)
    finally:
        torch.set_default_dtype(previous)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def official_s2v_forward(model, x: torch.Tensor, t: torch.Tensor, context: list, *, ref_latent: torch.Tensor,
                         audio_features: torch.Tensor, motion_latent, pose_latent, motion_frames: int = 73):
    """The reference model's forward for one sample in our forward's terms (the first clip:
    motion_latent None, for which the reference is given zero motion latents and drops them)."""
    latents = (motion_frames + 3) // 4
    motion = motion_latent if motion_latent is not None else x.new_zeros(*x.shape[:2], latents, *x.shape[3:])
    pose = pose_latent if pose_latent is not None else torch.zeros_like(x)
    with torch.amp.autocast(x.device.type, dtype=x.dtype, enabled=x.device.type == "cuda"):
        return model([x[0]], t=t, context=context, seq_len=None, ref_latents=[ref_latent[0]],
                     motion_latents=[motion[0]], cond_states=[pose[0]], audio_input=audio_features,
                     motion_frames=[motion_frames, latents], drop_motion_frames=motion_latent is None)[0][None]
