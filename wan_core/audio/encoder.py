"""The S2V audio encoder: transformers' Wav2Vec2Model (wav2vec2-large-xlsr-53-english).

Two layouts ship: the transformers folder inside the official S2V release
(wav2vec2-large-xlsr-53-english/: config.json + weights of Wav2Vec2ForCTC, names behind
"wav2vec2.") and ComfyUI's single file in models/audio_encoders/ (the same names with or without
the prefix, fp16, no config). Either names the positional convolution's weight norm as torch's
parametrization (parametrizations.weight.original0/1) or the older weight_g/weight_v. The CTC head
is not used (S2V reads the hidden states), so Wav2Vec2Model is built and lm_head is dropped.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Union

import torch

from wan_core.loading import (check_load_options, convert_layout, layout_names, mismatch_report, read_state_dict,
                              require_kind)

Source = Union[str, os.PathLike, Mapping[str, torch.Tensor]]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# The conv feature extractor of every wav2vec2 (the weights carry the kernels, not the strides).
CONV_STRIDES = (5, 2, 2, 2, 2, 2, 2)
HEAD_SIZE = 64  # wav2vec2 base and large: 768 / 12, 1024 / 16
# Unused at inference (it replaces masked frames in training); ComfyUI's files do not carry it.
_TRAINING_ONLY = "masked_spec_embed"


def load_audio_encoder(source: Source, *, dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"):
    """transformers' `Wav2Vec2Model` with the checkpoint's weights, in eval mode.

    `source`: a transformers folder (config.json + model.safetensors or pytorch_model.bin), a
    single safetensors/.pth file (ComfyUI's audio_encoders/ file; its config is read from the
    shapes), or a state dict. The reference runs it in float32 on the CPU (the defaults).
    """
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    check_load_options(dtype)
    name = "the given state dict" if isinstance(source, Mapping) else str(source)
    folder = Path(source) if not isinstance(source, Mapping) and Path(source).is_dir() else None
    if folder is not None:
        weights = next((folder / f for f in _WEIGHT_FILES if (folder / f).is_file()), None)
        if weights is None or not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a transformers wav2vec2 folder: it needs config.json and one "
                                    f"of {list(_WEIGHT_FILES)} (the official S2V release has "
                                    f"wav2vec2-large-xlsr-53-english/)")
        state_dict = read_state_dict(weights)
    else:
        state_dict = read_state_dict(source)
    state_dict, layouts = convert_layout(state_dict, "audio")
    require_kind(list(state_dict), "audio", name)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("lm_head.")}
    config = Wav2Vec2Config.from_pretrained(folder) if folder is not None else wav2vec2_config(state_dict)
    with torch.device("meta"):
        model = Wav2Vec2Model(config)
    expected = model.state_dict()
    if _TRAINING_ONLY in expected and _TRAINING_ONLY not in state_dict:
        state_dict[_TRAINING_ONLY] = torch.zeros(expected[_TRAINING_ONLY].shape)
    problems = mismatch_report({k: tuple(v.shape) for k, v in expected.items()},
                               {k: tuple(v.shape) for k, v in state_dict.items()})
    if problems:
        raise ValueError(f"{name} (read as the {layout_names(layouts)} layout) does not match the wav2vec2 model "
                         f"its {'config.json' if folder is not None else 'shapes'} describe: tensors {problems}")
    device = torch.device(device)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()},
                          strict=True, assign=True)
    return model.eval().requires_grad_(False)


def wav2vec2_config(state_dict: Mapping[str, torch.Tensor]):
    """The Wav2Vec2Config of a state dict in canonical names (for files without config.json).

    Widths, kernels and layer counts come from the shapes; the conv strides are every wav2vec2's;
    heads are width / 64. A conv extractor with a LayerNorm per layer is the "stable layer norm"
    family (large, xlsr) -- the rule ComfyUI uses too."""
    from transformers import Wav2Vec2Config

    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    conv = sorted(int(m.group(1)) for k in shapes if (m := re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.conv\.weight", k)))
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    if not conv or len(conv) != len(CONV_STRIDES) or not layers:
        raise ValueError(f"not a wav2vec2 state dict: expected {len(CONV_STRIDES)} conv feature layers and encoder "
                         f"layers, found {len(conv)} and {len(layers)}")
    hidden = shapes["feature_projection.projection.weight"][0]
    pos_conv = shapes["encoder.pos_conv_embed.conv.parametrizations.weight.original1"]
    layer_norm = "feature_extractor.conv_layers.1.layer_norm.weight" in shapes
    return Wav2Vec2Config(
        hidden_size=hidden, num_hidden_layers=len(layers), num_attention_heads=hidden // HEAD_SIZE,
        intermediate_size=shapes["encoder.layers.0.feed_forward.intermediate_dense.weight"][0],
        conv_dim=tuple(shapes[f"feature_extractor.conv_layers.{i}.conv.weight"][0] for i in conv),
        conv_kernel=tuple(shapes[f"feature_extractor.conv_layers.{i}.conv.weight"][2] for i in conv),
        conv_stride=CONV_STRIDES, conv_bias="feature_extractor.conv_layers.0.conv.bias" in shapes,
        feat_extract_norm="layer" if layer_norm else "group", do_stable_layer_norm=layer_norm,
        num_conv_pos_embeddings=pos_conv[2], num_conv_pos_embedding_groups=hidden // pos_conv[1])
