"""LoRAs for the Wan DiT: read in the formats users have, applied as weights reach the device.

A LoRA file holds, per DiT layer, a low-rank pair (up [out, r], down [r, in], optional alpha)
and/or full differences: `.diff` (the weight), `.diff_b` (the bias), `.diff_m` (a block's or the
head's modulation table; LightX2V's distilled files carry all three). The change it makes to a
parameter W at strength s is, as ComfyUI applies it (comfy/lora.py, comfy/weight_adapter/lora.py):

    W + s * (alpha / r) * up @ down      (alpha defaults to r)
    W + s * diff                         (.diff, .diff_b, .diff_m)

diffusers reads the same files (`load_lora_weights`) but drops some of these entries (norm
diffs, `.diff` on linears other than the head, `.diff_m`, a time-projection bias without its
pair); where it applies an entry the two agree, and where it drops one we follow ComfyUI.

Formats are told apart by their key names, through the "lora" rows of the one layout table,
`wan_core.loading.LAYOUT_CONVERSIONS` (ComfyUI/LightX2V `diffusion_model.`, kohya/musubi
`lora_unet_`, diffusers/PEFT `transformer.`, ...); what follows the module name says what the
tensor is (`ROLE_SUFFIXES`). PEFT files may keep alpha in their header metadata.

Applying: `with_loras(model, [(lora, strength), ...])` is a light view of the model whose
forward computes with base + the deltas. The base model is never modified: the view hands a
`LoraPatches` (the `WeightPatches` protocol of wan_core/dit/weights.py) to the model before
each forward, and the model merges it into copies of its weights where they reach the compute
device (once for a resident model, per block as it is uploaded with block swap). Merges are
computed in float32 and rounded once to the weight's dtype; an fp8-kept weight (FP8Linear) is
dequantised, merged and re-quantised with a fresh scale.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import numbers
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Hashable, Mapping, Optional, Sequence, Union

import torch
from safetensors import safe_open

from wan_core.configs import DiTConfig
from wan_core.loading import KIND_MARKERS, convert_layout, detect_kind, layout_names, read_state_dict
from wan_core.ops.linear import FP8_DTYPES, fp8_to_dtype, quantize_fp8

logger = logging.getLogger(__name__)

# What a key's ending says its tensor is, after the module's name. Longer endings come first.
ROLE_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"), (".lora_B.default.bias", "up_bias"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "up_bias"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff_m", "diff_m"), (".diff", "diff"),
)
# Adapters other than plain LoRA, by a name part only they use.
UNSUPPORTED_ADAPTERS = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_w": "LoHa",
                        "lokr_w": "LoKr", "boft_": "BOFT", "oft_": "OFT", "glora": "GLoRA"}
# Which parameter of a module each full-difference entry changes.
_DIFF_TARGETS = {"diff": "weight", "diff_b": "bias", "diff_m": "modulation"}
# PEFT/diffusers files keep rank and alpha in this header entry (diffusers' LORA_ADAPTER_METADATA_KEY).
PEFT_METADATA_KEY = "lora_adapter_metadata"
# Model widths of the Wan family, to say what a LoRA was made for when it does not fit.
KNOWN_WIDTHS = {1536: "Wan2.1 T2V-1.3B", 3072: "Wan2.2 TI2V-5B",
                5120: "a 14B Wan model (Wan2.1 14B, a Wan2.2 A14B expert or S2V-14B)"}

LoraSource = Union["Lora", str, os.PathLike, Mapping[str, torch.Tensor]]
_unique_keys = itertools.count()


@dataclass(frozen=True, eq=False)
class Delta:
    """The change a LoRA makes to one parameter, before strength: `scale * up @ down` (low rank;
    `up` [out, r, ...], `down` [r, in, ...]) or `scale * full` (a full difference)."""

    source: str  # the file's key it came from, for messages
    scale: float
    up: Optional[torch.Tensor] = None
    down: Optional[torch.Tensor] = None
    full: Optional[torch.Tensor] = None

    @property
    def rank(self) -> Optional[int]:
        return None if self.down is None else self.down.shape[0]

    def fits(self, shape: torch.Size) -> bool:
        if self.full is not None:
            return tuple(self.full.shape) == tuple(shape)
        # a conv kernel may come as a flat [r, in * k...] matrix (ComfyUI reshapes it likewise)
        return len(shape) >= 1 and self.up.shape[0] == shape[0] and \
            math.prod(self.down.shape[1:]) == math.prod(shape[1:])

    def value(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """scale * (up @ down | full) as a float32 tensor of `shape` on `device`."""
        if self.full is not None:
            return self.full.to(device=device, dtype=torch.float32) * self.scale
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return (up @ down).reshape(shape) * self.scale


@dataclass(frozen=True, eq=False)
class Lora:
    """A LoRA file read into deltas on the official DiT parameter names (see `load_lora`)."""

    name: str
    format: str  # the layouts its names were read as, e.g. "comfy", "kohya", "diffusers"
    deltas: Mapping[str, Delta]
    unknown_keys: tuple[str, ...] = ()  # keys whose ending says nothing a LoRA carries
    # equal keys: the same LoRA (a file's path, size and mtime; else unique)
    key: Hashable = field(default_factory=lambda: ("lora", next(_unique_keys)))

    def describe(self) -> str:
        ranks = sorted({d.rank for d in self.deltas.values() if d.rank is not None})
        full = sum(d.full is not None for d in self.deltas.values())
        rank = (f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}" if ranks
                else "no low-rank pairs")
        return (f"{Path(self.name).name}: {self.format} LoRA, {len(self.deltas)} parameters changed "
                f"({rank}, {full} full differences)")


def load_lora(source: LoraSource) -> Lora:
    """Read a LoRA (a .safetensors/.pth file or a state dict), its format detected from its names.

    Raises a ValueError naming the file for a file that is not a LoRA (e.g. a model checkpoint),
    an adapter other than plain LoRA (DoRA, LoHa, LoKr), an incomplete low-rank pair, a NaN or
    infinite value, or a truncated file. Whether the LoRA fits a model is checked by `with_loras`.
    """
    if isinstance(source, Lora):
        return source
    name = "the given state dict" if isinstance(source, Mapping) else str(source)
    if not isinstance(source, Mapping) and Path(source).is_dir():
        raise ValueError(f"{name} is a folder; pass the LoRA file itself (a .safetensors file)")
    raw = read_state_dict(source)
    metadata = {} if isinstance(source, Mapping) else _safetensors_metadata(Path(source))
    if not raw:
        raise ValueError(f"{name} holds no tensors; it is not a LoRA (re-download it?)")
    _refuse_other_adapters(raw, name)
    if metadata.get(PEFT_METADATA_KEY):
        raw = _with_peft_alphas(raw, metadata[PEFT_METADATA_KEY], name)
    try:
        state_dict, layouts = convert_layout(raw, "lora")
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    roles = {key: _split_role(key) for key in state_dict}
    if not any(roles.values()):
        _refuse_non_lora(list(raw), name)
    for key, value in raw.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{name}: tensor {key!r} holds NaN or infinite values; the LoRA file is "
                             f"corrupt (re-download it)")
    originals = dict(zip(state_dict, raw))  # renaming keeps the order
    deltas = _deltas(state_dict, roles, originals, name)
    unknown = tuple(originals[k] for k, role in roles.items() if role is None)
    return Lora(name=name, format=layout_names(layouts) if layouts else "official", deltas=deltas,
                unknown_keys=unknown, key=_source_key(source))


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a safetensors file (read_state_dict has checked the file)."""
    if not path.name.lower().endswith((".safetensors", ".sft")):
        return {}
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _source_key(source: LoraSource) -> Hashable:
    if isinstance(source, Mapping):
        return ("state dict", next(_unique_keys))
    path = Path(source).resolve()
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns)


def _refuse_other_adapters(raw: Mapping[str, torch.Tensor], name: str) -> None:
    for key in raw:
        for part, adapter in UNSUPPORTED_ADAPTERS.items():
            if part in key:
                raise ValueError(f"{name} is a {adapter} adapter (key {key!r}); only plain LoRA "
                                 f"(low-rank pairs, .diff/.diff_b/.diff_m differences) is supported")


def _refuse_non_lora(names: list[str], name: str) -> None:
    kind = detect_kind(names)
    if kind is not None:
        raise ValueError(f"{name} holds {KIND_MARKERS[kind][0]}, not a LoRA: load it with the "
                         f"{kind} loader, and pick a file from models/loras here")
    endings = sorted({suffix for suffix, _ in ROLE_SUFFIXES})
    raise ValueError(f"{name} is not a LoRA: none of its {len(names)} tensor names (e.g. {sorted(names)[:4]}) "
                     f"ends in a LoRA entry such as {endings[:6]}")


def _split_role(key: str) -> Optional[tuple[str, str]]:
    """(module name, role) of a key in official names, or None when its ending is unknown."""
    for suffix, role in ROLE_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


def _weight_name(module: str) -> str:
    """The parameter a module's low-rank pair or .diff changes: its weight; a name that already
    is a parameter (a modulation table, as ComfyUI's generic key map allows) stays itself."""
    return module if module.rsplit(".", 1)[-1] == "modulation" else f"{module}.weight"


def _deltas(state_dict: Mapping[str, torch.Tensor], roles: Mapping[str, Optional[tuple[str, str]]],
            originals: Mapping[str, str], name: str) -> dict[str, Delta]:
    modules: dict[str, dict[str, str]] = {}
    for key, role in roles.items():
        if role is not None:
            module, kind = role
            modules.setdefault(module, {})[kind] = key
    deltas: dict[str, Delta] = {}

    def add(target: str, delta: Delta) -> None:
        if target in deltas:
            raise ValueError(f"{name} changes {target} twice ({deltas[target].source!r} and {delta.source!r}); "
                             f"a LoRA gives one low-rank pair or one full difference per parameter")
        deltas[target] = delta

    for module, parts in modules.items():
        up, down = parts.get("up"), parts.get("down")
        if (up is None) != (down is None):
            present, absent = (up, "down (lora_down/lora_A)") if down is None else (down, "up (lora_up/lora_B)")
            raise ValueError(f"{name}: {originals[present]!r} has no matching {absent} matrix; the low-rank "
                             f"pair of {module} is incomplete (truncated or corrupt file?)")
        scale = 1.0
        if up is not None:
            up_t, down_t = state_dict[up], state_dict[down]
            rank = down_t.shape[0]
            if up_t.ndim < 2 or down_t.ndim < 2 or up_t.shape[1] != rank or math.prod(up_t.shape[2:]) != 1:
                raise ValueError(f"{name}: the low-rank pair of {module} has shapes up {tuple(up_t.shape)} and "
                                 f"down {tuple(down_t.shape)}; up must be [out, rank] and down [rank, in]")
            if "alpha" in parts:
                scale = float(state_dict[parts["alpha"]]) / rank
            add(_weight_name(module), Delta(originals[up], scale, up=up_t, down=down_t))
        elif "alpha" in parts or "up_bias" in parts:
            lone = parts.get("alpha") or parts["up_bias"]
            raise ValueError(f"{name}: {originals[lone]!r} belongs to a low-rank pair of {module} that the "
                             f"file does not hold (truncated or corrupt file?)")
        if "up_bias" in parts:  # PEFT's lora_bias: scaled like the pair it belongs to
            add(f"{module}.bias", Delta(originals[parts["up_bias"]], scale, full=state_dict[parts["up_bias"]]))
        for kind, parameter in _DIFF_TARGETS.items():
            if kind in parts:
                target = _weight_name(module) if parameter == "weight" else f"{module}.{parameter}"
                add(target, Delta(originals[parts[kind]], 1.0, full=state_dict[parts[kind]]))
    return deltas


def _with_peft_alphas(raw: Mapping[str, torch.Tensor], text: str, name: str) -> dict[str, torch.Tensor]:
    """PEFT keeps alpha in the header (lora_alpha, alpha_pattern; r, rank_pattern; use_rslora):
    add the `.alpha` entry each pair would carry in a kohya file, so there is one alpha rule."""
    try:
        config = json.loads(text)
        # a pipeline's save_lora_weights prefixes the transformer's entries ("transformer.r", ...)
        if any(k.startswith("transformer.") for k in config):
            config = {k[len("transformer."):]: v for k, v in config.items() if k.startswith("transformer.")}
        lora_alpha = config.get("lora_alpha")
        patterns = dict(config.get("alpha_pattern") or {})
        rslora = bool(config.get("use_rslora", False))
        if config.get("use_dora"):
            raise ValueError(f"{name} is a DoRA adapter (use_dora in its header); only plain LoRA is supported")
    except (json.JSONDecodeError, AttributeError, TypeError) as e:
        raise ValueError(f"{name}: the header's {PEFT_METADATA_KEY} is not the JSON object PEFT writes ({e})") from None
    out = dict(raw)
    for key, value in raw.items():
        role = _split_role(key)
        if role is None or role[1] != "down" or lora_alpha is None:
            continue
        module = role[0]
        relative = module[len("transformer."):] if module.startswith("transformer.") else module
        alpha = next((a for p, a in patterns.items() if re.fullmatch(rf"(.*\.)?(?:{p})", relative)), lora_alpha)
        rank = value.shape[0]
        # rsLoRA scales by alpha / sqrt(r): the alpha that gives that scale under alpha / r
        effective = float(alpha) * math.sqrt(rank) if rslora else float(alpha)
        out.setdefault(f"{module}.alpha", torch.tensor(effective, dtype=torch.float32))
    return out


# --------------------------------------------------------------------------------------------
# Fitting a LoRA to a model


def _model_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    shapes = {k: v.shape for k, v in model.named_parameters()}
    shapes.update((k, v.shape) for k, v in model.named_buffers())
    return shapes


def describe_model(config: DiTConfig, model_name: Optional[str] = None) -> str:
    family = KNOWN_WIDTHS.get(config.dim, "an unknown Wan size")
    named = f"{model_name} " if model_name else "the model "
    return f"{named}({config.model_type} DiT of width {config.dim}, {config.num_layers} blocks: {family})"


def _lora_width(lora: Lora) -> Optional[int]:
    """The model width a LoRA's block deltas imply (their attention matrices are [dim, dim])."""
    for target, delta in lora.deltas.items():
        if re.fullmatch(r"blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]\.weight", target):
            return delta.up.shape[0] if delta.full is None else delta.full.shape[0]
    return None


def fit_lora(lora: Lora, model: torch.nn.Module, *, strict: bool = True, model_name: Optional[str] = None) -> Lora:
    """`lora` restricted to the parameters `model` has, after checking it was made for it.

    A LoRA whose block deltas do not fit the model's blocks (a Wan2.1 1.3B LoRA on a 14B expert,
    a 5B LoRA on A14B) is refused naming both. Keys that match no parameter (or fit none outside
    the blocks) are an error listing a few of them when `strict`; otherwise they are skipped
    with a warning, as when a LoRA targets layers this variant lacks (a Wan2.1 I2V LoRA's image
    cross-attention on Wan2.2).
    """
    shapes = _model_shapes(model)
    config = model.config
    wrong_blocks = [t for t, d in lora.deltas.items()
                    if t in shapes and t.startswith("blocks.") and not d.fits(shapes[t])]
    if wrong_blocks:
        target = wrong_blocks[0]
        width = _lora_width(lora)
        made_for = KNOWN_WIDTHS.get(width, f"a model of width {width}") if width else "another model"
        raise ValueError(f"{lora.name} is a LoRA for {made_for}, not for {describe_model(config, model_name)}: "
                         f"its change to {target} ({lora.deltas[target].source!r}) does not fit that parameter "
                         f"of shape {tuple(shapes[target])}. Use a LoRA made for this model")
    unmatched = [d.source for t, d in lora.deltas.items() if t not in shapes or not d.fits(shapes[t])]
    unmatched += list(lora.unknown_keys)
    if not unmatched:
        return lora
    if len(unmatched) == len(lora.deltas) + len(lora.unknown_keys):
        raise ValueError(f"none of the {len(unmatched)} keys of {lora.name} ({lora.format} names, e.g. "
                         f"{unmatched[:3]}) matches a layer of {describe_model(config, model_name)}; "
                         f"it is not a LoRA for this model")
    message = (f"{len(unmatched)} keys of {lora.name} match no layer of {describe_model(config, model_name)} "
               f"(e.g. {unmatched[:5]})")
    if strict:
        raise ValueError(f"{message}. If the LoRA was made for a variant with layers this one lacks (e.g. a "
                         f"Wan2.1 I2V LoRA's image cross-attention), apply it leniently to skip those keys")
    logger.warning("%s; skipping them", message)
    skipped = set(unmatched)
    return replace(lora, deltas={t: d for t, d in lora.deltas.items() if d.source not in skipped}, unknown_keys=())


# --------------------------------------------------------------------------------------------
# Applying


def _unit_prefix(name: str) -> str:
    """The weight unit (wan_core.dit.weights) a parameter belongs to: its block, or ""."""
    match = re.match(r"blocks\.\d+\.", name)
    return match.group(0) if match else ""


class LoraPatches:
    """Base + sum of strength * delta over (LoRA, strength) pairs, as a `WeightPatches`."""

    def __init__(self, loras: Sequence[tuple[Lora, float]]):
        self.loras = tuple(loras)
        self._key = tuple((lora.key, strength) for lora, strength in self.loras)
        self._units: dict[str, dict[str, list[tuple[Delta, float]]]] = {}
        for lora, strength in self.loras:
            for target, delta in lora.deltas.items():
                prefix = _unit_prefix(target)
                self._units.setdefault(prefix, {}).setdefault(target[len(prefix):], []).append((delta, strength))

    @property
    def key(self) -> Hashable:
        return self._key

    def patch(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        for name, changes in self._units.get(prefix, {}).items():
            if name not in tensors:
                raise KeyError(f"the LoRA changes {prefix}{name}, which this model does not have")
            base = tensors[name]
            scale_name = name[: -len("weight")] + "weight_scale" if name.endswith("weight") else None
            fp8 = base.dtype in FP8_DTYPES
            if fp8 and scale_name not in tensors:
                raise KeyError(f"{prefix}{name} is stored in fp8 without its weight_scale")
            if fp8:
                merged = fp8_to_dtype(base, tensors[scale_name], torch.float32)
            else:
                merged = base.to(torch.float32, copy=True)
            for delta, strength in changes:
                merged.add_(delta.value(base.shape, base.device), alpha=strength)
            if fp8:
                stored, scale = quantize_fp8(merged, base.dtype)
                out[name] = stored
                out[scale_name] = scale.expand(tensors[scale_name].shape).clone()
            else:
                out[name] = merged.to(base.dtype)
        return out


class LoraModel:
    """A DiT computing with base + LoRA deltas; everything else (config, dtype, device,
    attention_backend, parameters, ...) is the base model's. The base's stored weights are
    never changed: before each forward the view hands its patches to the base, which merges
    them into copies (and does nothing when the same patches are already merged)."""

    def __init__(self, base: torch.nn.Module, patches: Optional[LoraPatches]):
        self._base = base
        self._patches = patches

    @property
    def base(self) -> torch.nn.Module:
        return self._base

    @property
    def loras(self) -> tuple[tuple[Lora, float], ...]:
        return () if self._patches is None else self._patches.loras

    @property
    def weight_patches(self) -> Optional[LoraPatches]:
        return self._patches

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._base.set_weight_patches(self._patches)
        return self._base(*args, **kwargs)

    __call__ = forward

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "_base" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self._base, name)

    def __repr__(self) -> str:
        shown = ", ".join(f"{Path(lora.name).name} x {strength:g}" for lora, strength in self.loras) or "no LoRA"
        return f"LoraModel({type(self._base).__name__}, {shown})"


def with_loras(model: Union[torch.nn.Module, LoraModel], loras: Sequence[tuple[LoraSource, float]], *,
               strict: bool = True, model_name: Optional[str] = None) -> LoraModel:
    """A view of `model` whose forward computes with base + sum of strength * delta.

    `loras`: (a `Lora`, a path or a state dict; strength) pairs, strength any finite number
    (negative subtracts the LoRA, 0 leaves it out). A `LoraModel` given as `model` keeps its own
    LoRAs and gets these stacked on top. Each LoRA is checked against the model (`fit_lora`,
    with `strict` and `model_name` for the messages). With no LoRA the view computes with the
    base alone (and undoes what another view merged).
    """
    base = model.base if isinstance(model, LoraModel) else model
    stacked = list(model.loras) if isinstance(model, LoraModel) else []
    if isinstance(loras, (str, os.PathLike, Lora)) or not isinstance(loras, Sequence):
        raise TypeError(f"loras must be a list of (lora, strength) pairs, got {type(loras).__name__}")
    for item in loras:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"each LoRA must be a (lora or path, strength) pair, got {item!r}")
        source, strength = item
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength):
            raise ValueError(f"LoRA strength must be a finite number (negative allowed), got {strength!r}")
        if strength == 0:
            continue
        stacked.append((fit_lora(load_lora(source), base, strict=strict, model_name=model_name), float(strength)))
    return LoraModel(base, LoraPatches(stacked) if stacked else None)
