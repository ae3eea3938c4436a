"""Reading checkpoints and loading the Wan DiT from any layout it ships in.

Three steps, each usable on its own:

1. `read_state_dict(source)`: a safetensors file, a folder of safetensors shards with their
   `*.safetensors.index.json`, a `.pth`/`.pt` file (`torch.load(weights_only=True, mmap=True)`)
   or a dict. Tensors come back memory-mapped: nothing is read from disk until it is used.
2. `convert_layout(state_dict, kind)`: names of any known layout -> the canonical (official
   Wan) names, driven by the one table `LAYOUT_CONVERSIONS`.
3. `dequantize_fp8(state_dict, dtype)`: ComfyUI's two fp8 formats -> plain tensors.

`load_dit` chains them, detects the variant from names and shapes (`detect_dit_config`),
builds the model on the meta device and assigns each tensor once, already in the target
dtype and on the target device, so no full-precision copy of the model is ever made.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open

from wan_core.configs import TASKS, DiTConfig
from wan_core.ops.linear import FP8_DTYPES, convert_linears_to_fp8, enable_fp8_matmul, fp8_to_dtype, quantize_fp8

Source = Union[str, os.PathLike, Mapping[str, torch.Tensor]]

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
INDEX_SUFFIX = ".safetensors.index.json"


def _describe(source: Source) -> str:
    return "the given state dict" if isinstance(source, Mapping) else str(source)


# --------------------------------------------------------------------------------------------
# Reading


def read_state_dict(source: Source) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint by name, memory-mapped where the format allows.

    `source`: a safetensors file; a folder holding either one `*.safetensors.index.json` with
    its shards or a single checkpoint file; an index JSON itself; a `.pth`/`.pt` file; or a dict
    (returned as a new dict of the same tensors). A `_quantization_metadata` entry in a
    safetensors header is turned into the per-layer `<layer>.comfy_quant` tensors ComfyUI
    also accepts, so the dict alone describes the checkpoint.
    """
    if isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"state dict entries must map str names to tensors; bad entries: {bad[:5]}")
        return dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"checkpoint source must be a path or a dict of tensors, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        path = _checkpoint_in_folder(path)
    name = path.name.lower()
    if name.endswith(INDEX_SUFFIX):
        return _read_sharded(path)
    if name.endswith(SAFETENSORS_SUFFIXES):
        return _read_safetensors(path)
    if name.endswith(PICKLE_SUFFIXES):
        return _read_pickle(path)
    raise ValueError(f"{path}: unknown checkpoint file type; expected a .safetensors file, a "
                     f"*{INDEX_SUFFIX} with its shards, a .pth/.pt file, or a folder holding one of them")


def _checkpoint_in_folder(folder: Path) -> Path:
    indexes = sorted(p for p in folder.iterdir() if p.name.lower().endswith(INDEX_SUFFIX))
    if len(indexes) > 1:
        raise ValueError(f"{folder} holds several shard indexes {[p.name for p in indexes]}; "
                         f"pass the index JSON of the model you mean")
    if indexes:
        return indexes[0]
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.name.lower().endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES))
    if len(files) == 1:
        return files[0]
    if files:
        raise ValueError(f"{folder} holds several checkpoint files {[p.name for p in files]} and no "
                         f"*{INDEX_SUFFIX} that says they are shards of one model; pass the file you mean")
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
    hint = f" (it has the subfolders {subfolders}: pass the one that holds the model, e.g. transformer/)" \
        if subfolders else ""
    raise FileNotFoundError(f"no checkpoint in folder {folder}: expected a *{INDEX_SUFFIX} with its "
                            f"shards, or one .safetensors/.pth file{hint}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt? "
                         f"re-download it): {e}") from None
    if "_quantization_metadata" in metadata:
        _add_comfy_quant_from_header(tensors, metadata["_quantization_metadata"], path)
    return tensors


def _add_comfy_quant_from_header(tensors: dict[str, torch.Tensor], text: str, path: Path) -> None:
    try:
        layers = json.loads(text).get("layers", {})
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: the header's _quantization_metadata is not the JSON object "
                         f"ComfyUI writes ({e})") from None
    for layer, conf in layers.items():
        key = f"{layer}.comfy_quant"
        if key not in tensors:
            tensors[key] = torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index_path} is not a shard index (a JSON object with a 'weight_map' of "
                         f"tensor name -> shard file): {e!r}") from None
    shard_names = sorted(set(weight_map.values()))
    missing = [s for s in shard_names if not (index_path.parent / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{index_path} lists {len(shard_names)} shards but {missing} "
                                f"{'is' if len(missing) == 1 else 'are'} missing from {index_path.parent}; "
                                f"download the missing shard files")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shard_names:
        tensors.update(_read_safetensors(index_path.parent / shard))
    absent = [k for k, s in weight_map.items() if k not in tensors]
    if absent:
        raise ValueError(f"{index_path} maps {len(absent)} tensors to shards that do not contain them "
                         f"(e.g. {absent[:3]}); the shards do not belong to this index")
    return tensors


_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # files written by torch < 1.6 are not zip archives and cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} was refused: it holds Python objects other than tensors, and "
                         f".pth files are read with torch.load(weights_only=True) so that no code in "
                         f"them can run. Convert it to safetensors with a trusted tool ({first_line})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt? "
                         f"re-download it): {e}") from None
    while isinstance(obj, Mapping) and len(obj) == 1 and next(iter(obj)) in _WRAPPER_KEYS:
        obj = next(iter(obj.values()))
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TypeError(f"{path} does not hold a flat dict of tensors (found {type(obj).__name__}); "
                        f"expected a state dict saved with torch.save(model.state_dict())")
    return dict(obj)


# --------------------------------------------------------------------------------------------
# Layouts: one table of renames, one engine


@dataclass(frozen=True)
class LayoutConversion:
    """How one checkpoint layout names a model's tensors, relative to the canonical names.

    `marker` is a name prefix that only this layout has: the rows apply to a state dict that
    holds a name starting with it. `renames` are (this layout's prefix, canonical prefix) pairs;
    `{n}` stands for a block number. Each name takes the first pair whose prefix it starts
    with; names that match none are already canonical. The pairs work in both directions
    (the test factory writes layouts with them).
    """

    kind: str    # "dit" | "vae" | "text"
    layout: str  # shown in messages
    marker: str
    renames: tuple[tuple[str, str], ...]


def _attention_renames(diffusers: str, official: str) -> tuple[tuple[str, str], ...]:
    projections = (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"), ("norm_q", "norm_q"),
                   ("norm_k", "norm_k"))
    return tuple((f"blocks.{{n}}.{diffusers}.{d}.", f"blocks.{{n}}.{official}.{o}.") for d, o in projections)


def _vae_resnet_renames(diffusers: str, official: str) -> tuple[tuple[str, str], ...]:
    """One VAE residual block: diffusers names its layers, the official checkpoint numbers
    them by position in nn.Sequential(norm, SiLU, conv, norm, SiLU, dropout, conv)."""
    layers = (("norm1.", "residual.0."), ("conv1.", "residual.2."), ("norm2.", "residual.3."),
              ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))
    return tuple((diffusers + d, official + o) for d, o in layers)


def _vae_shared_renames() -> tuple[tuple[str, str], ...]:
    """The VAE names diffusers gives the same way for Wan2.1 and Wan2.2."""
    pairs: list[tuple[str, str]] = [("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in.", f"{part}.conv1."), (f"{part}.norm_out.", f"{part}.head.0."),
                  (f"{part}.conv_out.", f"{part}.head.2."), (f"{part}.mid_block.attentions.0.", f"{part}.middle.1."),
                  *_vae_resnet_renames(f"{part}.mid_block.resnets.0.", f"{part}.middle.0."),
                  *_vae_resnet_renames(f"{part}.mid_block.resnets.1.", f"{part}.middle.2.")]
    return tuple(pairs)


# Both Wan VAEs: 4 stages; 2 residual blocks per encoder stage, 3 per decoder stage, then the
# stage's resampler (none after the last stage).
_VAE_STAGES, _VAE_ENCODER_BLOCKS, _VAE_DECODER_BLOCKS = 4, 2, 3


def _vae21_renames() -> tuple[tuple[str, str], ...]:
    """Wan2.1: the official lists are flat. diffusers keeps the encoder's numbering and
    groups the decoder's list into up_blocks of 3 resnets + 1 upsampler."""
    pairs = [*_vae_resnet_renames("encoder.down_blocks.{n}.", "encoder.downsamples.{n}."),
             ("encoder.down_blocks.{n}.", "encoder.downsamples.{n}.")]  # resample / time_conv
    per_stage = _VAE_DECODER_BLOCKS + 1
    for stage in range(_VAE_STAGES):
        for block in range(_VAE_DECODER_BLOCKS):
            pairs += _vae_resnet_renames(f"decoder.up_blocks.{stage}.resnets.{block}.",
                                         f"decoder.upsamples.{stage * per_stage + block}.")
        pairs.append((f"decoder.up_blocks.{stage}.upsamplers.0.",
                      f"decoder.upsamples.{stage * per_stage + _VAE_DECODER_BLOCKS}."))
    return _vae_shared_renames() + tuple(pairs)


def _vae22_renames() -> tuple[tuple[str, str], ...]:
    """Wan2.2: the official stages hold their blocks and resampler in one list."""
    pairs: list[tuple[str, str]] = []
    for part, diffusers, official, blocks, resampler in (
            ("encoder", "down_blocks", "downsamples", _VAE_ENCODER_BLOCKS, "downsampler"),
            ("decoder", "up_blocks", "upsamples", _VAE_DECODER_BLOCKS, "upsampler")):
        for block in range(blocks):
            pairs += _vae_resnet_renames(f"{part}.{diffusers}.{{n}}.resnets.{block}.",
                                         f"{part}.{official}.{{n}}.{official}.{block}.")
        pairs.append((f"{part}.{diffusers}.{{n}}.{resampler}.", f"{part}.{official}.{{n}}.{official}.{blocks}."))
    return _vae_shared_renames() + tuple(pairs)


# diffusers' WanTransformer3DModel names -> the official ones.
_DIT_DIFFUSERS_RENAMES: tuple[tuple[str, str], ...] = (
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    *_attention_renames("attn1", "self_attn"),
    *_attention_renames("attn2", "cross_attn"),
    ("blocks.{n}.ffn.net.0.proj.", "blocks.{n}.ffn.0."),
    ("blocks.{n}.ffn.net.2.", "blocks.{n}.ffn.2."),
    # diffusers' norm2 is the official cross-attention norm3 (the others carry no weights)
    ("blocks.{n}.norm2.", "blocks.{n}.norm3."),
    ("blocks.{n}.scale_shift_table", "blocks.{n}.modulation"),
    ("scale_shift_table", "head.modulation"),
    ("proj_out.", "head.head."),
)

# The DiT modules LoRAs change, in the official names. Wan2.1's image-to-video modules (k_img,
# v_img, norm_k_img, img_emb) are listed too, so that the keys of a Wan2.1 I2V LoRA are read as
# targets a Wan2.2 model lacks rather than as an unknown layout; "blocks.{n}" and "head" carry
# the modulation tables (LightX2V's .diff_m).
_DIT_LORA_MODULES: tuple[str, ...] = (
    *(f"blocks.{{n}}.{attention}.{layer}" for attention in ("self_attn", "cross_attn")
      for layer in ("q", "k", "v", "o", "norm_q", "norm_k")),
    "blocks.{n}.cross_attn.k_img", "blocks.{n}.cross_attn.v_img", "blocks.{n}.cross_attn.norm_k_img",
    "blocks.{n}.norm3", "blocks.{n}.ffn.0", "blocks.{n}.ffn.2", "blocks.{n}",
    "patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
    "time_projection.1", "head.head", "head", "img_emb.proj.0", "img_emb.proj.1", "img_emb.proj.3", "img_emb.proj.4",
)

# Wan2.1 I2V's image branch as diffusers names it (LoRAs for it exist; Wan2.2 has no such layers).
_DIT_DIFFUSERS_IMAGE_RENAMES: tuple[tuple[str, str], ...] = (
    ("blocks.{n}.attn2.add_k_proj.", "blocks.{n}.cross_attn.k_img."),
    ("blocks.{n}.attn2.add_v_proj.", "blocks.{n}.cross_attn.v_img."),
    ("blocks.{n}.attn2.norm_added_k.", "blocks.{n}.cross_attn.norm_k_img."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
)


def _kohya_lora_renames() -> tuple[tuple[str, str], ...]:
    """kohya/musubi-tuner name a module by its official name with "_" for "." behind "lora_unet_"
    (blocks.0.self_attn.q -> lora_unet_blocks_0_self_attn_q); the key goes on after a "."."""
    return tuple((f"lora_unet_{module.replace('.', '_')}.", f"{module}.") for module in _DIT_LORA_MODULES)


# Applied in this order when loading (a ComfyUI prefix comes off before diffusers names are
# recognised), in reverse order when writing a layout. LoRA keys are a module name and what the
# tensor is for that module (".lora_down.weight", ".alpha", ".diff", ...; wan_core.lora reads
# that part): these rows rename the module part to the official DiT names.
LAYOUT_CONVERSIONS: tuple[LayoutConversion, ...] = (
    LayoutConversion("dit", "comfy_prefixed", marker="model.diffusion_model.",
                     renames=(("model.diffusion_model.", ""),)),
    LayoutConversion("dit", "diffusers", marker="condition_embedder.", renames=_DIT_DIFFUSERS_RENAMES),
    # Wan Fun's LoRAs put a second "_" after lora_unet_ (ComfyUI's lora_convert drops it).
    LayoutConversion("lora", "kohya_fun", marker="lora_unet__", renames=(("lora_unet__", "lora_unet_"),)),
    LayoutConversion("lora", "kohya", marker="lora_unet_", renames=_kohya_lora_renames()),
    # ComfyUI's own LoRA names (also LightX2V's and most trainers' Wan files): official names
    # behind "diffusion_model.".
    LayoutConversion("lora", "comfy", marker="diffusion_model.", renames=(("diffusion_model.", ""),)),
    # DiffSynth-Studio and PEFT-wrapped official names.
    LayoutConversion("lora", "diffsynth", marker="pipe.dit.", renames=(("pipe.dit.", ""),)),
    LayoutConversion("lora", "peft", marker="base_model.model.", renames=(("base_model.model.", ""),)),
    # diffusers / PEFT files: diffusers module names behind "transformer." (a pipeline's
    # save_lora_weights) or bare (a model's save_lora_adapter; told apart from the official
    # names by attn1/attn2, which every diffusers LoRA of Wan targets).
    LayoutConversion("lora", "diffusers", marker="transformer.", renames=tuple(
        (f"transformer.{theirs}", ours) for theirs, ours in _DIT_DIFFUSERS_RENAMES + _DIT_DIFFUSERS_IMAGE_RENAMES
    ) + (("transformer.", ""),)),
    LayoutConversion("lora", "diffusers_bare", marker="blocks.{n}.attn",
                     renames=_DIT_DIFFUSERS_RENAMES + _DIT_DIFFUSERS_IMAGE_RENAMES),
    # The text encoder's canonical names are transformers' (UMT5EncoderModel, which runs it);
    # the official umt5 .pth has its own. The gated FFN is fc1(x) * gelu(gate(x)): gate.0 is
    # the GELU branch wi_0, fc1 the linear branch wi_1. umt5 keeps a position-bias table per
    # block. The relative_attention_bias pair comes before the SelfAttention one so that the
    # reverse direction takes the longer prefix first.
    LayoutConversion("text", "official", marker="token_embedding.", renames=(
        ("token_embedding.", "shared."),
        ("blocks.{n}.pos_embedding.embedding.", "encoder.block.{n}.layer.0.SelfAttention.relative_attention_bias."),
        ("blocks.{n}.attn.", "encoder.block.{n}.layer.0.SelfAttention."),
        ("blocks.{n}.norm1.", "encoder.block.{n}.layer.0.layer_norm."),
        ("blocks.{n}.norm2.", "encoder.block.{n}.layer.1.layer_norm."),
        ("blocks.{n}.ffn.gate.0.", "encoder.block.{n}.layer.1.DenseReluDense.wi_0."),
        ("blocks.{n}.ffn.fc1.", "encoder.block.{n}.layer.1.DenseReluDense.wi_1."),
        ("blocks.{n}.ffn.fc2.", "encoder.block.{n}.layer.1.DenseReluDense.wo."),
        ("norm.", "encoder.final_layer_norm."),
    )),
    # The VAEs' canonical names are the official ones (ComfyUI's repackaged files use them too).
    # diffusers' AutoencoderKLWan names differ between the two versions, told apart by the
    # decoder's resampler ("upsamplers.0" in Wan2.1, "upsampler" in Wan2.2).
    # The audio encoder's canonical names are transformers' Wav2Vec2Model's. Wav2Vec2ForCTC
    # folders (the official S2V release) put them behind "wav2vec2."; files saved before torch's
    # weight_norm parametrization name the positional conv's weight norm weight_g / weight_v.
    LayoutConversion("audio", "transformers_ctc", marker="wav2vec2.", renames=(("wav2vec2.", ""),)),
    LayoutConversion("audio", "weight_norm_legacy", marker="encoder.pos_conv_embed.conv.weight_g", renames=(
        ("encoder.pos_conv_embed.conv.weight_g", "encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
        ("encoder.pos_conv_embed.conv.weight_v", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    )),
    LayoutConversion("vae", "diffusers_2.1", marker="decoder.up_blocks.0.upsamplers.0.", renames=_vae21_renames()),
    LayoutConversion("vae", "diffusers_2.2", marker="decoder.up_blocks.0.upsampler.", renames=_vae22_renames()),
)


@lru_cache(maxsize=None)
def _prefix_pattern(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix).replace(re.escape("{n}"), r"(?P<n>\d+)"))


def _rename(name: str, renames: Sequence[tuple[str, str]], to_canonical: bool) -> str:
    for layout_prefix, canonical_prefix in renames:
        src, dst = (layout_prefix, canonical_prefix) if to_canonical else (canonical_prefix, layout_prefix)
        m = _prefix_pattern(src).match(name)
        if m:
            return dst.replace("{n}", m.groupdict().get("n") or "") + name[m.end():]
    return name


def _apply_renames(state_dict: Mapping[str, object], row: LayoutConversion, to_canonical: bool) -> dict:
    out: dict = {}
    for name, value in state_dict.items():
        new = _rename(name, row.renames, to_canonical)
        if new in out:
            raise ValueError(f"two tensors map to {new!r} under the {row.layout} layout; the checkpoint "
                             f"mixes naming schemes")
        out[new] = value
    return out


def _rows(kind: str) -> tuple[LayoutConversion, ...]:
    rows = tuple(r for r in LAYOUT_CONVERSIONS if r.kind == kind)
    if not rows and kind not in {r.kind for r in LAYOUT_CONVERSIONS} | set(KIND_MARKERS):
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(KIND_MARKERS)}")
    return rows


def convert_layout(state_dict: Mapping[str, object], kind: str) -> tuple[dict, tuple[str, ...]]:
    """Rename a `kind` state dict to canonical names. Returns (renamed dict, layouts found)."""
    found = []
    out = dict(state_dict)
    for row in _rows(kind):
        marker = _prefix_pattern(row.marker)
        if any(marker.match(name) for name in out):
            out = _apply_renames(out, row, to_canonical=True)
            found.append(row.layout)
    return out, tuple(found)


def to_layout(state_dict: Mapping[str, object], kind: str, layouts: Sequence[str]) -> dict:
    """Rename a canonical `kind` state dict into the given layouts (the inverse of `convert_layout`)."""
    rows = {r.layout: r for r in _rows(kind)}
    unknown = [name for name in layouts if name not in rows]
    if unknown:
        raise ValueError(f"unknown {kind} layouts {unknown}; known: {sorted(rows)}")
    out = dict(state_dict)
    for row in reversed(_rows(kind)):
        if row.layout in layouts:
            out = _apply_renames(out, row, to_canonical=False)
    return out


# What each kind of checkpoint holds: a tensor name (after any prefix) that marks it. Used to
# tell the user which loader a file belongs to when it is given to the wrong one.
KIND_MARKERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dit": ("a Wan diffusion transformer (DiT)", ("patch_embedding.weight", "condition_embedder.time_proj.weight")),
    "vae": ("a Wan VAE", ("decoder.conv1.weight", "decoder.conv_in.weight")),
    "text": ("a umt5 text encoder", ("token_embedding.weight", "encoder.block.0.layer.0.SelfAttention.q.weight")),
    "audio": ("a wav2vec2 audio encoder", ("feature_projection.projection.weight",)),
}


def detect_kind(names: Sequence[str]) -> Optional[str]:
    """Which kind of model a checkpoint holds ("dit", "vae", "text", "audio"), or None."""
    for kind, (_, markers) in KIND_MARKERS.items():
        if any(n == m or n.endswith("." + m) for n in names for m in markers):
            return kind
    return None


def require_kind(names: Sequence[str], kind: str, source_name: str) -> None:
    """Raise a ValueError naming the file when it does not hold a `kind` model."""
    found = detect_kind(names)
    if found == kind:
        return
    expected = KIND_MARKERS[kind][0]
    if found is not None:
        raise ValueError(f"{source_name} holds {KIND_MARKERS[found][0]}, not {expected}; "
                         f"load it with the {found} loader instead")
    sample = sorted(names)[:5]
    raise ValueError(f"{source_name} is not {expected} in any known layout: none of its {len(names)} "
                     f"tensor names (e.g. {sample}) is one of {list(KIND_MARKERS[kind][1])}. Known "
                     f"layouts: official, ComfyUI (optionally model.diffusion_model.-prefixed, fp8), diffusers")


# --------------------------------------------------------------------------------------------
# ComfyUI fp8 formats
#
# Older: a `scaled_fp8` marker tensor, fp8 weights, and a float32 `<layer>.scale_weight` each.
# Newer: `<layer>.comfy_quant` (uint8 bytes of a JSON like {"format": "float8_e4m3fn"}) beside
# the fp8 `<layer>.weight` and a float32 `<layer>.weight_scale`. In both the real weight is
# stored * scale. Input scales only serve fp8 matmuls of the activations and are dropped.

FP8_MARKER = "scaled_fp8"
COMFY_QUANT_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
QUANT_MODES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# Modes whose DiT blocks also multiply in fp8 where the GPU can (`ops.linear.enable_fp8_matmul`).
FP8_MATMUL_QUANTS = ("fp8_e4m3fn_fast",)


def split_fp8(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                              dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Separate fp8 weights from the rest: returns (plain tensors, {weight name: (stored, scale)}).

    Markers, scales, `comfy_quant` entries and input scales are consumed. An fp8 weight with no
    scale (a plain cast) gets scale 1.
    """
    plain = dict(state_dict)
    formats: dict[str, torch.dtype] = {}
    for key in [k for k in plain if k.endswith(".comfy_quant")]:
        layer = key[: -len(".comfy_quant")]
        raw = plain.pop(key)
        try:
            fmt = json.loads(bytes(raw.to(torch.uint8).flatten().tolist()).decode("utf-8")).get("format")
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{key} is not the uint8 bytes of a JSON object like "
                             f'{{"format": "float8_e4m3fn"}}: {e}') from None
        if fmt not in COMFY_QUANT_FORMATS:
            raise ValueError(f"layer {layer!r} is quantized as {fmt!r}; this loader reads ComfyUI's "
                             f"{sorted(COMFY_QUANT_FORMATS)} formats only (use a bf16/fp16/fp8 file)")
        formats[f"{layer}.weight"] = COMFY_QUANT_FORMATS[fmt]
    for key in [k for k in plain if k == FP8_MARKER or k.endswith("." + FP8_MARKER)]:
        del plain[key]
    for key in [k for k in plain if k.endswith(_INPUT_SCALE_SUFFIXES)]:
        del plain[key]

    scales: dict[str, torch.Tensor] = {}
    for key in [k for k in plain if k.endswith(_SCALE_SUFFIXES)]:
        weight_key = key.rsplit(".", 1)[0] + ".weight"
        if weight_key not in plain:
            raise ValueError(f"{key} is the fp8 scale of {weight_key}, which the checkpoint lacks")
        scales[weight_key] = plain.pop(key)

    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in [k for k in plain if k in formats or k in scales or plain[k].dtype in FP8_DTYPES]:
        stored = plain.pop(key)
        if key in formats and stored.dtype == torch.uint8:  # fp8 kept in a uint8 container
            stored = stored.view(formats[key])
        if stored.dtype not in FP8_DTYPES and key in formats:
            raise ValueError(f"{key} is marked {formats[key]} by its comfy_quant entry but is stored "
                             f"as {stored.dtype}")
        scale = scales.get(key, torch.ones((), dtype=torch.float32))
        if scale.numel() not in (1, stored.shape[0]):
            raise ValueError(f"{key}: fp8 scale of shape {tuple(scale.shape)} fits neither one scale per "
                             f"tensor nor one per output row of shape {tuple(stored.shape)}")
        quantized[key] = (stored, scale.reshape(()) if scale.numel() == 1 else scale.flatten())
    return plain, quantized


def dequantize_fp8(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict with every ComfyUI fp8 weight (either format) replaced by stored * scale
    in `dtype`, and the fp8 bookkeeping entries removed. Other tensors pass through unchanged."""
    plain, quantized = split_fp8(state_dict)
    for key, (stored, scale) in quantized.items():
        plain[key] = fp8_to_dtype(stored, scale, dtype)
    return plain


# --------------------------------------------------------------------------------------------
# Checks shared by the loaders


def check_load_options(dtype: torch.dtype, quant: Optional[str] = None) -> None:
    """A ValueError unless `dtype` is a float dtype to hold parameters in and `quant` a known mode."""
    if quant is not None and quant not in QUANT_MODES:
        raise ValueError(f"quant={quant!r} is not supported; expected None or one of {sorted(QUANT_MODES)}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype not in FP8_DTYPES):
        raise ValueError(f"dtype must be a torch float dtype such as torch.bfloat16 (fp8 storage is "
                         f"chosen with quant=...), got {dtype!r}")


def mismatch_report(wanted: Mapping[str, Sequence[int]], shapes: Mapping[str, Sequence[int]]) -> Optional[str]:
    """None when `shapes` has exactly the names and shapes `wanted`; else a short account of the
    missing, unexpected and wrongly shaped tensors for an error message."""
    missing = sorted(set(wanted) - set(shapes))
    unexpected = sorted(set(shapes) - set(wanted))
    wrong = [f"{k}: {tuple(shapes[k])} (expected {tuple(wanted[k])})" for k in sorted(set(wanted) & set(shapes))
             if tuple(shapes[k]) != tuple(wanted[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:4]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:4]})")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape (e.g. {wrong[:3]})")
    return "; ".join(problems) or None


def layout_names(layouts: Sequence[str]) -> str:
    """How messages name the layouts a checkpoint was read as."""
    return "+".join(layouts) if layouts else "official/ComfyUI"


# --------------------------------------------------------------------------------------------
# The DiT

HEAD_DIM = 128  # every Wan2.x DiT; the weights do not reveal the number of heads otherwise
_S2V_MARKERS = ("casual_audio_encoder.", "audio_injector.", "frame_packer.", "cond_encoder.",
                "trainable_cond_mask.")
_DIT_REQUIRED = ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
                 "head.head.weight", "blocks.0.ffn.0.weight")


def detect_dit_config(shapes: Mapping[str, Union[Sequence[int], torch.Tensor]],
                      folder_config: Optional[Mapping] = None) -> DiTConfig:
    """The `DiTConfig` of a DiT state dict in canonical names, from its names and shapes.

    `shapes` maps names to shapes (a state dict of tensors works too). in_dim and dim come from
    the patch embedding, the layer count from the block indices, ffn/text/frequency widths from
    their linears, heads from dim / 128; the variant from (in_dim, out_dim) (t2v 16->16, i2v
    36->16, ti2v 48->48) or, for S2V, from its audio and frame-pack tensors. `folder_config`:
    the official folder's config.json, which decides S2V's audio injection layers.
    """
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in shapes.items()}
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    num_layers = len(blocks)
    if blocks != set(range(num_layers)):
        raise ValueError(f"transformer blocks are not numbered 0..{num_layers - 1}: missing "
                         f"{sorted(set(range(max(blocks) + 1)) - blocks)[:10]}")
    missing = [k for k in _DIT_REQUIRED if k not in shapes]
    if missing:
        raise ValueError(f"not a Wan DiT state dict in the official naming: missing {missing}")
    dim, in_dim, *patch = shapes["patch_embedding.weight"]
    if dim % HEAD_DIM:
        raise ValueError(f"model width {dim} is not a multiple of the Wan head size {HEAD_DIM}")
    out_dim = shapes["head.head.weight"][0] // math.prod(patch)
    dims = dict(patch_size=tuple(patch), in_dim=in_dim, dim=dim, out_dim=out_dim,
                ffn_dim=shapes["blocks.0.ffn.0.weight"][0], text_dim=shapes["text_embedding.0.weight"][1],
                freq_dim=shapes["time_embedding.0.weight"][1], num_heads=dim // HEAD_DIM, num_layers=num_layers,
                qk_norm="blocks.0.self_attn.norm_q.weight" in shapes,
                cross_attn_norm="blocks.0.norm3.weight" in shapes)
    if any(k.startswith(_S2V_MARKERS) for k in shapes):
        from wan_core.dit.s2v import s2v_config

        base = next(t.dit for t in TASKS.values() if t.dit.model_type == "s2v")
        return s2v_config(replace(base, **dims), shapes, None if folder_config is None else dict(folder_config))
    for task in TASKS.values():
        if task.dit.model_type != "s2v" and (task.dit.in_dim, task.dit.out_dim) == (in_dim, out_dim):
            return replace(task.dit, **dims)
    known = sorted({(t.dit.model_type, t.dit.in_dim, t.dit.out_dim) for t in TASKS.values()})
    raise ValueError(f"a DiT with {in_dim} input and {out_dim} output channels matches no Wan2.2 "
                     f"variant; known (type, in, out): {known}")


def _read_dit(source: Source) -> tuple[dict, dict, dict, tuple[str, ...], DiTConfig]:
    """A DiT checkpoint's tensors (memory-mapped; plain and fp8 with scales), their shapes, the
    layouts found and the detected config. Reads no tensor data."""
    name = _describe(source)
    state_dict, layouts = convert_layout(read_state_dict(source), "dit")
    require_kind(list(state_dict), "dit", name)
    try:
        plain, quantized = split_fp8(state_dict)
        shapes = {**{k: v.shape for k, v in plain.items()}, **{k: s.shape for k, (s, _) in quantized.items()}}
        return plain, quantized, shapes, layouts, detect_dit_config(shapes, _folder_config(source))
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def read_dit_config(source: Source) -> DiTConfig:
    """The `DiTConfig` of a DiT checkpoint from its names and shapes alone (the safetensors
    header; tensor data is not read): which variant a file is, before anything loads."""
    return _read_dit(source)[4]


def load_dit(source: Source, *, dtype: torch.dtype = torch.bfloat16, device: Union[str, torch.device] = "cpu",
             quant: Optional[str] = None):
    """A `WanDiT` from any supported checkpoint, its variant detected from names and shapes.

    `dtype`: the dtype of the parameters (fp8 checkpoints are dequantized into it).
    `quant`: None, or "fp8_e4m3fn"/"fp8_e5m2" to keep the Linear weights of the transformer
    blocks in fp8 with one scale each (`wan_core.ops.linear.FP8Linear`, upcast per matmul to
    the activations' dtype); fp8 checkpoints keep their stored weights, others are quantized
    per tensor. "fp8_e4m3fn_fast" stores the same e4m3 weights and multiplies them in fp8 with
    per-token activation scales on GPUs that can (compute capability >= 8.9), except in the
    first and last blocks (`ops.linear.enable_fp8_matmul`); elsewhere it computes like
    "fp8_e4m3fn". Tensors that already have the target dtype on the CPU stay memory-mapped.
    """
    from wan_core.dit import WanDiT

    name = _describe(source)
    check_load_options(dtype, quant)
    device = torch.device(device)

    plain, quantized, shapes, layouts, config = _read_dit(source)

    with torch.device("meta"):
        model = WanDiT(config)
    fp8_weights: set[str] = set()
    if quant is not None:
        names = convert_linears_to_fp8(model.blocks, fp8_dtype=QUANT_MODES[quant], bias_dtype=dtype)
        fp8_weights = {f"blocks.{n}.weight" for n in names}
    expected = model.state_dict()
    _check_names_and_shapes(expected, shapes, fp8_weights, name, layouts, config)

    names = list(expected)
    model.load_state_dict(_dit_tensors(names, plain, quantized, fp8_weights, dtype, quant, device),
                          strict=True, assign=True)
    if quant in FP8_MATMUL_QUANTS:
        enable_fp8_matmul(model.blocks)
    if not isinstance(source, Mapping):
        def reload() -> dict[str, torch.Tensor]:
            """The same tensors in host memory again (memory-mapped where the file's dtype is kept)."""
            plain, quantized = split_fp8(convert_layout(read_state_dict(source), "dit")[0])
            return _dit_tensors(names, plain, quantized, fp8_weights, dtype, quant, torch.device("cpu"))

        model.placement.reload = reload
    return model.eval().requires_grad_(False)


def _dit_tensors(names: Sequence[str], plain: Mapping[str, torch.Tensor],
                 quantized: Mapping[str, tuple[torch.Tensor, torch.Tensor]], fp8_weights: set[str],
                 dtype: torch.dtype, quant: Optional[str], device: torch.device) -> dict[str, torch.Tensor]:
    """The model's tensors by name from the checkpoint's, each converted once to its stored
    dtype on `device`: fp8-kept weights with their scales, dequantized fp8, or cast."""
    tensors: dict[str, torch.Tensor] = {}
    for key in names:
        if key.endswith(".weight_scale") and key[: -len("_scale")] in fp8_weights:
            continue  # assigned together with its weight
        if key in fp8_weights:
            if key in quantized:
                stored, scale = quantized[key]
            else:
                stored, scale = quantize_fp8(plain[key].to(device), QUANT_MODES[quant])
            tensors[key] = stored.to(device)
            tensors[key + "_scale"] = scale.to(device=device, dtype=torch.float32)
        elif key in quantized:
            stored, scale = quantized[key]
            tensors[key] = fp8_to_dtype(stored.to(device), scale, dtype)
        else:
            value = plain[key]
            tensors[key] = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    return tensors


def _folder_config(source: Source) -> Optional[dict]:
    """The config.json of an official model folder (given as the folder or its shard index),
    or None. Single files (ComfyUI's) carry none: a config.json beside one is not read."""
    if isinstance(source, Mapping):
        return None
    path = Path(source)
    folder = path if path.is_dir() else path.parent if path.name.lower().endswith(INDEX_SUFFIX) else None
    config_path = None if folder is None else folder / "config.json"
    if config_path is None or not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path} is not readable JSON ({e}); restore the folder's config.json") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    return config


def _check_names_and_shapes(expected: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size],
                            fp8_weights: set[str], name: str, layouts: Sequence[str], config: DiTConfig) -> None:
    wanted = {k: tuple(v.shape) for k, v in expected.items()
              if not (k.endswith(".weight_scale") and k[: -len("_scale")] in fp8_weights)}
    problems = mismatch_report(wanted, shapes)
    if problems:
        raise ValueError(f"{name} (read as the {layout_names(layouts)} layout) does not match the Wan2.2 "
                         f"{config.model_type} DiT its shapes suggest (dim {config.dim}, {config.num_layers} "
                         f"layers): tensors {problems}. Is the file complete and a Wan2.2 model?")
