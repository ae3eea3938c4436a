"""Tiny random Wan DiT checkpoints written in every real layout.

The canonical state dict is `WanDiT(config).state_dict()` filled with seeded random values;
each layout is that dict renamed through `wan_core.loading.LAYOUT_CONVERSIONS` and written the
way the real files are (shard folders with an index JSON, single safetensors files, fp8 in
ComfyUI's two formats, `.pth`). Loading any of them must give back the same model.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file

from wan_core.configs import DiTConfig, task_for_model_type
from wan_core.loading import FP8_MARKER, INDEX_SUFFIX, to_layout
from wan_core.ops.linear import quantize_fp8
from wan_core.testing.files import random_state_dict, write_single_file

DIT_LAYOUTS = ("official", "comfy", "comfy_prefixed", "comfy_fp8_scaled", "comfy_fp8_quant", "diffusers",
               "diffusers_file", "pth")
S2V_LAYOUTS = ("official", "comfy", "comfy_prefixed", "comfy_fp8_scaled", "comfy_fp8_quant")
_FOLDER_LAYOUTS = ("official", "diffusers")
_COMFY_PREFIX = "model.diffusion_model."

# Linear layers ComfyUI's fp8 files store in fp8: the blocks' attention and MLP matrices and
# the embedding MLPs (patch embedding, head and norms stay in higher precision).
# S2V's audio cross-attentions are quantized too, so fp8 outside the blocks is exercised.
_FP8_LAYERS = r"(blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]|blocks\.\d+\.ffn\.[02]|text_embedding\.[02]|time_embedding\.[02]|time_projection\.1|audio_injector\.injector\.\d+\.[qkvo])"


# S2V files without a config.json (ComfyUI's) get the 14B's injection layers, which need 40
# blocks: the tiny S2V keeps them and is narrow instead (one head of 128).
TINY_S2V_AUDIO_DIM = 64  # the tiny wav2vec2's width (a multiple of its 64-wide heads)


def tiny_dit_config(variant: str) -> DiTConfig:
    """A small DiT of `variant` ("t2v", "i2v", "ti2v", "s2v") whose weights still say what it is:
    head size 128 (the loader infers heads from width) and the variant's real channel counts."""
    base = task_for_model_type(variant).dit
    if variant == "s2v":
        return base.tiny(dim=128, num_heads=1, ffn_dim=128, text_dim=24, freq_dim=16, num_layers=base.num_layers,
                         audio_dim=TINY_S2V_AUDIO_DIM, audio_inject_layers=base.audio_inject_layers)
    return base.tiny(dim=256, num_heads=2, ffn_dim=384, text_dim=24, freq_dim=16, num_layers=2)


def dit_state_dict(config: DiTConfig, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                   device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """Seeded random weights under the canonical names of `WanDiT(config)`.

    Matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.2^2), biases and modulation tables
    ~ N(0, 0.2^2): large enough that a wrong or swapped tensor changes the output. On the
    meta device only names and shapes are made (full-size models cost nothing).
    """
    from wan_core.dit import WanDiT

    def kind(name: str, shape: torch.Size) -> str:
        module = name.split(".")[-2] if "." in name else ""
        # S2V's audio layer mix is divided by its sum: keep it away from zero like a gain
        if (module.startswith("norm") and name.endswith(".weight")) or name == "casual_audio_encoder.weights":
            return "gain"
        return "matrix" if len(shape) >= 2 and not name.endswith("modulation") else "other"

    return random_state_dict(lambda: WanDiT(config), kind, dtype=dtype, seed=seed, device=device)


def layout_state_dict(state_dict: dict[str, torch.Tensor], layout: str, *,
                      dtype: Optional[torch.dtype] = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A canonical DiT state dict as `layout` names and stores it: (tensors, safetensors header
    metadata). Tensors that are not fp8 are cast to `dtype` (default: unchanged)."""
    if layout not in DIT_LAYOUTS:
        raise ValueError(f"unknown DiT layout {layout!r}; expected one of {DIT_LAYOUTS}")
    cast = {k: v if dtype is None else v.to(dtype) for k, v in state_dict.items()}
    if layout in ("diffusers", "diffusers_file"):
        return to_layout(cast, "dit", ["diffusers"]), {}
    if layout == "comfy_prefixed":
        return to_layout(cast, "dit", ["comfy_prefixed"]), {}
    if layout not in ("comfy_fp8_scaled", "comfy_fp8_quant"):
        return cast, {}

    out: dict[str, torch.Tensor] = {}
    quantized_layers: list[str] = []
    for key, value in cast.items():
        layer = key[: -len(".weight")]
        if key.endswith(".weight") and re.fullmatch(_FP8_LAYERS, layer):
            stored, scale = quantize_fp8(state_dict[key], torch.float8_e4m3fn)
            out[key] = stored
            quantized_layers.append(layer)
            if layout == "comfy_fp8_scaled":
                out[f"{layer}.scale_weight"] = scale
            else:
                out[f"{layer}.weight_scale"] = scale
                out[f"{layer}.comfy_quant"] = _json_bytes({"format": "float8_e4m3fn"})
        else:
            out[key] = value
    metadata: dict[str, str] = {}
    device = next(iter(state_dict.values())).device
    if layout == "comfy_fp8_scaled":
        out[FP8_MARKER] = torch.empty(0, dtype=torch.float8_e4m3fn, device=device)
        # an activation scale, as files made for fp8 matmuls carry; unused when dequantizing
        out[f"{quantized_layers[0]}.scale_input"] = torch.ones((), dtype=torch.float32, device=device)
    else:
        metadata["_quantization_metadata"] = json.dumps({
            "format_version": "1.0",
            "layers": {_COMFY_PREFIX + layer: {"format": "float8_e4m3fn"} for layer in quantized_layers}})
        out = to_layout(out, "dit", ["comfy_prefixed"])
    return out, metadata


def _json_bytes(obj: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)


def write_dit_checkpoint(path: Union[str, Path], variant: str, layout: str, *, dtype: torch.dtype = torch.float32,
                         seed: int = 0, config: Optional[DiTConfig] = None) -> Path:
    """Write a random DiT of `variant` in `layout` and return what to pass to `load_dit`.

    Folder layouts ("official", "diffusers") create the folder `path`; the others write the
    file `path` (".safetensors"/".pth" added when it has no suffix), or a file named after
    variant and layout inside `path` if it is a folder.
    `config` defaults to `tiny_dit_config(variant)`. Weights are drawn in float32 and cast to
    `dtype` (fp8 layouts quantize from float32 and store their other tensors in `dtype`).
    """
    config = config or tiny_dit_config(variant)
    if config.model_type != variant:
        raise ValueError(f"config is a {config.model_type} DiT but variant {variant!r} was asked for")
    if variant == "s2v" and layout not in S2V_LAYOUTS:
        raise ValueError(f"S2V ships in the layouts {S2V_LAYOUTS} (there is no diffusers S2V), not {layout!r}")
    tensors, metadata = layout_state_dict(dit_state_dict(config, seed=seed), layout, dtype=dtype)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    path = Path(path)
    if layout in _FOLDER_LAYOUTS:
        path.mkdir(parents=True, exist_ok=True)
        _write_shards(path, tensors, num_shards=2)
        config_json = _official_config_json(config) if layout == "official" else _diffusers_config_json(config)
        (path / "config.json").write_text(json.dumps(config_json, indent=2))
        return path
    return write_single_file(path, f"wan_{variant}_{layout}", tensors, as_pickle=layout == "pth", metadata=metadata)


def _write_shards(folder: Path, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    """Shards named and indexed like the official and diffusers folders."""
    names = sorted(tensors)
    per_shard = math.ceil(len(names) / num_shards)
    weight_map = {}
    for i in range(num_shards):
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = names[i * per_shard:(i + 1) * per_shard]
        save_file({k: tensors[k] for k in chunk}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"diffusion_pytorch_model{INDEX_SUFFIX}").write_text(json.dumps(index, indent=2))


def _official_config_json(config: DiTConfig) -> dict:
    fields = ("model_type", "patch_size", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim",
              "num_heads", "num_layers", "qk_norm", "cross_attn_norm", "eps")
    values = asdict(config)
    out = {"_class_name": "WanModel", **{k: values[k] for k in fields}, "window_size": [-1, -1]}
    if config.model_type == "s2v":  # the reference's WanModel_S2V config.json (wan_s2v_14B.py's values)
        out.update(_class_name="WanModel_S2V", cond_dim=config.cond_dim, audio_dim=config.audio_dim,
                   num_audio_token=4, enable_adain=True, adain_mode="attn_norm",
                   audio_inject_layers=list(config.audio_inject_layers), zero_init=True, zero_timestep=True,
                   enable_motioner=False, add_last_motion=True, enable_tsm=False, trainable_token=False,
                   trainable_token_pos_emb=False, enable_framepack=True, framepack_drop_mode="padd")
    return out


def _diffusers_config_json(config: DiTConfig) -> dict:
    return {"_class_name": "WanTransformer3DModel", "patch_size": list(config.patch_size),
            "num_attention_heads": config.num_heads, "attention_head_dim": config.head_dim,
            "in_channels": config.in_dim, "out_channels": config.out_dim, "text_dim": config.text_dim,
            "freq_dim": config.freq_dim, "ffn_dim": config.ffn_dim, "num_layers": config.num_layers,
            "cross_attn_norm": config.cross_attn_norm, "qk_norm": "rms_norm_across_heads" if config.qk_norm else None,
            "eps": config.eps, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024}


_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def write_streamed_dit(path: Union[str, Path], config: DiTConfig, *, dtype: torch.dtype = torch.bfloat16,
                       seed: int = 0) -> Path:
    """Write a random DiT of `config` (full-size ones too) as one safetensors file in the official
    names, one tensor at a time: the writer never holds the model, so the page cache is the only
    copy when a reader starts. For speed the values are cut from one pool of 2^24 seeded normal
    draws (each tensor from its own offset), scaled as `dit_state_dict` scales them."""
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of {list(_SAFETENSORS_DTYPES)}, got {dtype}")
    shapes = {k: tuple(v.shape) for k, v in dit_state_dict(config, device="meta").items()}
    header, offset = {}, 0
    for name in sorted(shapes):
        nbytes = math.prod(shapes[name]) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randn(2 ** 24, generator=generator)
    pools: dict[tuple[float, float], bytes] = {}  # (scale, shift) -> the scaled draws as `dtype` bytes
    path = Path(path)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for index, name in enumerate(sorted(shapes)):
            shape = shapes[name]
            if len(shape) >= 2 and not name.endswith("modulation"):
                kind = (1 / math.sqrt(math.prod(shape[1:])), 0.0)
            else:
                kind = (0.2, 1.0 if name.split(".")[-2].startswith("norm") else 0.0)
            if kind not in pools:
                pools[kind] = (draws * kind[0] + kind[1]).to(dtype).view(torch.uint8).numpy().tobytes()
            pool = pools[kind]
            remaining, start = math.prod(shape) * dtype.itemsize, (index * 7919 * dtype.itemsize) % len(pool)
            while remaining:
                piece = memoryview(pool)[start:start + remaining]
                f.write(piece)
                remaining -= len(piece)
                start = 0
    return path
