"""Tiny random wav2vec2 checkpoints in the layouts the S2V audio encoder ships in.

The real conv stack's kernels and strides (so frame counts are the real model's) and all 25
hidden states (24 layers), at a width of 64: a few hundred thousand weights.

- "transformers": the official release's folder (Wav2Vec2ForCTC's save_pretrained:
  config.json + model.safetensors, names behind "wav2vec2.");
- "transformers_legacy": the same as config.json + pytorch_model.bin with the positional conv's
  weight norm as weight_g / weight_v (files saved before torch's parametrization);
- "comfy": ComfyUI's single fp16 file in audio_encoders/ (Wav2Vec2Model names, no prefix);
- "comfy_legacy": a single file with the prefix and the weight_g / weight_v names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from wan_core.loading import to_layout
from wan_core.testing.dit import TINY_S2V_AUDIO_DIM
from wan_core.testing.files import write_single_file

AUDIO_LAYOUTS = ("transformers", "transformers_legacy", "comfy", "comfy_legacy")


def tiny_wav2vec2_config():
    """wav2vec2-large-xlsr-53's architecture (stable layer norm, LayerNorm conv extractor, conv
    bias, 24 layers) at width 64 with one head of 64 and 16-channel convolutions."""
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(hidden_size=TINY_S2V_AUDIO_DIM, num_hidden_layers=24, num_attention_heads=1,
                          intermediate_size=64, conv_dim=(16,) * 7, conv_bias=True, feat_extract_norm="layer",
                          do_stable_layer_norm=True, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
                          vocab_size=33)


def tiny_ctc_model(seed: int = 0):
    """A seeded random Wav2Vec2ForCTC of `tiny_wav2vec2_config()` (transformers' own init)."""
    from transformers import Wav2Vec2ForCTC

    torch.manual_seed(seed)
    return Wav2Vec2ForCTC(tiny_wav2vec2_config()).eval()


def write_audio_encoder_checkpoint(path: Union[str, Path], layout: str, *, seed: int = 0) -> Path:
    """Write a tiny random wav2vec2 in `layout` and return what to pass to `load_audio_encoder`:
    the folder `path` (transformers layouts) or the file (suffix added when `path` has none)."""
    if layout not in AUDIO_LAYOUTS:
        raise ValueError(f"unknown audio encoder layout {layout!r}; expected one of {AUDIO_LAYOUTS}")
    model = tiny_ctc_model(seed)
    path = Path(path)
    if layout == "transformers":
        model.save_pretrained(path)
        return path
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout.endswith("legacy"):
        encoder = {k.removeprefix("wav2vec2."): v for k, v in tensors.items() if k.startswith("wav2vec2.")}
        head = {k: v for k, v in tensors.items() if not k.startswith("wav2vec2.")}
        tensors = {**{"wav2vec2." + k: v for k, v in to_layout(encoder, "audio", ["weight_norm_legacy"]).items()},
                   **head}
    if layout == "transformers_legacy":
        path.mkdir(parents=True, exist_ok=True)
        model.config.to_json_file(path / "config.json")
        torch.save(tensors, path / "pytorch_model.bin")
        return path
    if layout == "comfy":
        tensors = {k.removeprefix("wav2vec2."): v.half() for k, v in tensors.items() if not k.startswith("lm_head.")}
    return write_single_file(path, f"wav2vec2_tiny_{layout}", tensors, as_pickle=False)
