"""Tiny random LoRAs for a DiT config, written under the key names of the real LoRA formats.

A LoRA is first made in the official names (`blocks.0.self_attn.q.lora_down.weight`, ...,
`blocks.0.diff_m`), then renamed through the "lora" rows of `wan_core.loading.LAYOUT_CONVERSIONS`
into a format's names and saved the way such files are: kohya/musubi `lora_unet_...` with an
alpha per pair, ComfyUI/LightX2V `diffusion_model....`, diffusers/PEFT `transformer....` with
rank and alpha in the safetensors header (diffusers' `lora_adapter_metadata`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file

from wan_core.configs import DiTConfig
from wan_core.loading import to_layout

# format -> (layout rows of the table, names of the low-rank pair)
LORA_FORMATS = {
    "comfy": (("comfy",), ("lora_down", "lora_up")),
    "comfy_lora_ab": (("comfy",), ("lora_A", "lora_B")),
    "kohya": (("kohya",), ("lora_down", "lora_up")),
    "kohya_fun": (("kohya", "kohya_fun"), ("lora_down", "lora_up")),
    "diffusers": (("diffusers",), ("lora_A", "lora_B")),
}
BLOCK_LINEARS = (*(f"{attention}.{p}" for attention in ("self_attn", "cross_attn") for p in "qkvo"),
                 "ffn.0", "ffn.2")
PEFT_METADATA_KEY = "lora_adapter_metadata"


def _shapes(config: DiTConfig) -> dict[str, torch.Size]:
    from wan_core.dit import WanDiT

    with torch.device("meta"):
        return {k: v.shape for k, v in WanDiT(config).state_dict().items()}


def random_lora(config: DiTConfig, *, rank: int = 4, alpha: Optional[float] = None, seed: int = 0,
                modules: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    """A low-rank pair (and `alpha` when given) for each of `modules` (default: every block's
    attention and MLP matrices), in official names. up ~ N(0, 0.3^2), down ~ N(0, 1/in): a delta
    big enough to change the model's output clearly."""
    shapes = _shapes(config)
    modules = modules or [f"blocks.{i}.{m}" for i in range(config.num_layers) for m in BLOCK_LINEARS]
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for module in modules:
        out_features, *in_shape = shapes[f"{module}.weight"]
        fan_in = math.prod(in_shape)
        out[f"{module}.lora_down.weight"] = torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in)
        out[f"{module}.lora_up.weight"] = 0.3 * torch.randn(out_features, rank, generator=generator)
        if alpha is not None:
            out[f"{module}.alpha"] = torch.tensor(float(alpha))
    return out


def lightx2v_extras(config: DiTConfig, *, seed: int = 0, applied_by_diffusers: bool = True,
                    dropped_by_diffusers: bool = True) -> dict[str, torch.Tensor]:
    """The full differences LightX2V's distilled files carry, in official names, N(0, 0.05^2).

    Those diffusers applies: `.diff_b` of every block linear, low-rank pairs with `.diff_b` on
    the text/time embeddings and the time projection, and `head.head.diff` + `.diff_b` (all
    need the block pairs of `random_lora` beside them). Those diffusers drops (ComfyUI applies
    them): `.diff` of the q/k norms and of norm3 (+ its `.diff_b`), each block's `.diff_m`, the
    head's `.diff_m`, `patch_embedding.diff` + `.diff_b`, and a full `.diff` of one linear that
    has no pair (blocks.0.cross_attn.o; drop its pair from `random_lora`'s modules).
    """
    shapes = _shapes(config)
    generator = torch.Generator().manual_seed(seed)

    def noise(shape) -> torch.Tensor:
        return 0.05 * torch.randn(shape, generator=generator)

    out: dict[str, torch.Tensor] = {}
    if applied_by_diffusers:
        for i in range(config.num_layers):
            for m in BLOCK_LINEARS:
                if (i, m) != (0, "cross_attn.o"):
                    out[f"blocks.{i}.{m}.diff_b"] = noise(shapes[f"blocks.{i}.{m}.bias"])
        embeddings = ["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                      "time_projection.1"]
        out.update(random_lora(config, rank=2, seed=seed + 1, modules=embeddings))
        for module in embeddings:
            out[f"{module}.diff_b"] = noise(shapes[f"{module}.bias"])
        out["head.head.diff"] = noise(shapes["head.head.weight"])
        out["head.head.diff_b"] = noise(shapes["head.head.bias"])
    if dropped_by_diffusers:
        for i in range(config.num_layers):
            for norm in ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k", "norm3"):
                out[f"blocks.{i}.{norm}.diff"] = noise(shapes[f"blocks.{i}.{norm}.weight"])
            out[f"blocks.{i}.norm3.diff_b"] = noise(shapes[f"blocks.{i}.norm3.bias"])
            out[f"blocks.{i}.diff_m"] = noise(shapes[f"blocks.{i}.modulation"])
        out["head.diff_m"] = noise(shapes["head.modulation"])
        out["patch_embedding.diff"] = noise(shapes["patch_embedding.weight"])
        out["patch_embedding.diff_b"] = noise(shapes["patch_embedding.bias"])
        out["blocks.0.cross_attn.o.diff"] = noise(shapes["blocks.0.cross_attn.o.weight"])
    return out


def lightx2v_lora(config: DiTConfig, *, rank: int = 4, alpha: float = 8.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA like LightX2V's distilled files, in official names: a low-rank pair for every block
    linear but one (which gets a full .diff instead) and all of `lightx2v_extras`."""
    paired = [f"blocks.{i}.{m}" for i in range(config.num_layers) for m in BLOCK_LINEARS
              if (i, m) != (0, "cross_attn.o")]
    return {**random_lora(config, rank=rank, alpha=alpha, seed=seed, modules=paired),
            **lightx2v_extras(config, seed=seed + 1)}


def lora_in_format(lora: dict[str, torch.Tensor], fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An official-names LoRA under `fmt`'s key names: (tensors, safetensors header metadata).
    The diffusers format moves the alphas into PEFT's header entry (lora_alpha, alpha_pattern)."""
    if fmt not in LORA_FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; expected one of {sorted(LORA_FORMATS)}")
    layouts, (down, up) = LORA_FORMATS[fmt]
    kept = {k: v for k, v in lora.items() if not (fmt == "diffusers" and k.endswith(".alpha"))}
    renamed = to_layout({k.replace(".lora_down.", f".{down}.").replace(".lora_up.", f".{up}."): v
                         for k, v in kept.items()}, "lora", list(layouts))
    if fmt != "diffusers":
        return renamed, {}
    # (rank, alpha) per module, by the module's name inside the transformer
    suffix = ".lora_down.weight"
    modules = {new[len("transformer."): -len(".lora_A.weight")]: (lora[old].shape[0],
                                                                   float(lora.get(old[: -len(suffix)] + ".alpha",
                                                                                  lora[old].shape[0])))
               for old, new in zip(kept, renamed) if old.endswith(suffix)}
    config = _peft_config(modules, any(k.endswith(".lora_B.bias") for k in renamed))
    # as a pipeline's save_lora_weights writes it: the transformer's entries behind its name
    return renamed, {PEFT_METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()})}


def _peft_config(modules: dict[str, tuple[int, float]], lora_bias: bool) -> dict:
    """The LoraConfig diffusers saves: the commonest rank and alpha, patterns for the others."""
    ranks = [r for r, _ in modules.values()]
    alphas = [a for _, a in modules.values()]
    rank, alpha = max(set(ranks), key=ranks.count), max(set(alphas), key=alphas.count)
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(modules),
            "rank_pattern": {m: r for m, (r, _) in modules.items() if r != rank},
            "alpha_pattern": {m: a for m, (_, a) in modules.items() if a != alpha},
            "use_dora": False, "use_rslora": False, "lora_bias": lora_bias}


def write_lora(path: Union[str, Path], lora: dict[str, torch.Tensor], fmt: str) -> Path:
    """Save an official-names LoRA as a .safetensors file in format `fmt`; returns the path."""
    tensors, metadata = lora_in_format(lora, fmt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or None)
    return path
