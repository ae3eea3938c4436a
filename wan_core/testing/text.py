"""Tiny random umt5 text encoders written in every real layout, with a tiny tokenizer.

The canonical state dict has transformers' names (`UMT5EncoderModel`); each layout is that
dict renamed through `wan_core.loading.LAYOUT_CONVERSIONS` and stored the way the real files
are. The tokenizer is a small sentencepiece unigram model trained here on built-in English
and Chinese text (umt5's special ids: <pad> 0, </s> 1, <unk> 2, no <s>).

Layouts:
- "official": `models_t5_umt5-xxl-enc-bf16.pth` names in a .pth, with the tokenizer folder
  `google/umt5-xxl/` beside it as in the official release.
- "comfy": a safetensors file in transformers names (one embedding, `shared.weight`) with the
  tokenizer inside as the uint8 tensor `spiece_model`.
- "comfy_fp8_scaled": the same, the blocks' linear weights in fp8 e4m3fn with a
  `scale_weight` each and the `scaled_fp8` marker (ComfyUI's older fp8 format).
- "transformers": a folder as `save_pretrained` writes it: config.json, model.safetensors
  (with both embedding names) and the tokenizer files.
"""
from __future__ import annotations

import io
import json
import math
import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file

from wan_core.loading import FP8_MARKER, to_layout
from wan_core.ops.linear import quantize_fp8
from wan_core.text.encoder import ENCODER_EMBEDDING, SPIECE_KEY, umt5_config
from wan_core.text.tokenizer import SPIECE_FILE

TEXT_LAYOUTS = ("official", "comfy", "comfy_fp8_scaled", "transformers")
OFFICIAL_FILE = "models_t5_umt5-xxl-enc-bf16.pth"

_FP8_LAYERS = r"encoder\.block\.\d+\.layer\.(0\.SelfAttention\.[qkvo]|1\.DenseReluDense\.(wi_0|wi_1|wo))"

TINY_CORPUS = (
    "A white cat sits on a wooden windowsill and watches the rain fall outside.",
    "Two astronauts walk slowly across the surface of the moon, the earth rising behind them.",
    "A red sports car drives along a coastal road at sunset, waves crashing on the rocks below.",
    "Close-up of a chef slicing fresh vegetables on a cutting board in a busy kitchen.",
    "An old man plays the violin in a quiet park while pigeons gather at his feet.",
    "Aerial view of a dense green forest with a river winding through the valley.",
    "A little girl in a yellow raincoat jumps into a puddle, splashing water everywhere.",
    "The camera slowly pans across a city skyline at night, lights reflecting on the water.",
    "Cinematic shot, soft lighting, shallow depth of field, 4k, highly detailed, realistic style.",
    "A dog runs along the beach chasing a ball, the quick brown fox jumps over the lazy dog.",
    "一只白色的猫坐在木制窗台上，看着窗外的雨。",
    "两名宇航员在月球表面缓慢行走，地球在他们身后升起。",
    "一辆红色跑车在日落时分沿着海岸公路行驶，海浪拍打着下面的岩石。",
    "厨师在繁忙的厨房里切新鲜的蔬菜，特写镜头。",
    "一位老人在安静的公园里拉小提琴，鸽子聚集在他的脚边。",
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量。",
    "镜头缓缓扫过夜晚的城市天际线，灯光倒映在水面上。",
    "一个穿着黄色雨衣的小女孩跳进水坑，水花四溅。",
)


@lru_cache(maxsize=None)
def tiny_spiece_model(vocab_size: int = 256) -> bytes:
    """The bytes of a sentencepiece unigram model trained on `TINY_CORPUS` (umt5's special
    ids; at most `vocab_size` pieces). Trained once per process, in well under a second."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_CORPUS), model_writer=model, vocab_size=vocab_size, hard_vocab_limit=False,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1,
        minloglevel=2)
    return model.getvalue()


def tiny_text_config(d_model: int = 24, **overrides):
    """A small umt5 config. d_model 24 is the text width of `DiTConfig.tiny()`, so tiny
    encoders feed tiny DiTs; the vocabulary covers the tiny tokenizer (padded to a multiple of
    64 like umt5-xxl's 256384)."""
    import sentencepiece

    pieces = sentencepiece.SentencePieceProcessor(model_proto=tiny_spiece_model()).get_piece_size()
    dims = dict(vocab_size=64 * math.ceil(pieces / 64), d_model=d_model, d_kv=6, num_heads=4, d_ff=40, num_layers=2,
                relative_attention_num_buckets=32)
    dims.update(overrides)
    return umt5_config(**dims)


def text_encoder_state_dict(config, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights in transformers names, the embedding once (`shared.weight`).

    Embedding ~ N(0, 1), matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.2^2), position
    bias tables ~ N(0, 1): large enough that a wrong or swapped tensor changes the output.
    """
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UMT5EncoderModel(config).state_dict().items() if k != ENCODER_EMBEDDING}
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        noise = torch.randn(shapes[name], generator=generator, dtype=torch.float32)
        if name.endswith("layer_norm.weight"):
            value = 1 + 0.2 * noise
        elif name == "shared.weight" or "relative_attention_bias" in name:
            value = noise
        else:
            value = noise / math.sqrt(shapes[name][1])
        out[name] = value.to(dtype)
    return out


def write_tokenizer_folder(folder: Union[str, Path], model_proto: Optional[bytes] = None) -> Path:
    """A transformers tokenizer folder (tokenizer.json, tokenizer_config.json and spiece.model,
    like google/umt5-xxl) for the sentencepiece model `model_proto` (default: the tiny one)."""
    from transformers import T5Tokenizer

    model_proto = model_proto or tiny_spiece_model()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / SPIECE_FILE).write_bytes(model_proto)
        T5Tokenizer.from_pretrained(scratch, extra_ids=0).save_pretrained(str(folder))
    (folder / SPIECE_FILE).write_bytes(model_proto)
    return folder


def write_text_encoder_checkpoint(path: Union[str, Path], layout: str, *, dtype: torch.dtype = torch.float32,
                                  seed: int = 0, config=None) -> Path:
    """Write a random umt5 encoder in `layout` and return what to pass to `load_text_encoder`.

    "transformers" creates the folder `path`; the other layouts write the file `path`, or a
    file named like the real one inside `path` if that is a folder or has no suffix. `config` defaults to
    `tiny_text_config()`. Weights are drawn in float32 and cast to `dtype` (the fp8 layout
    quantizes from float32 and stores its other tensors in `dtype`).
    """
    if layout not in TEXT_LAYOUTS:
        raise ValueError(f"unknown text encoder layout {layout!r}; expected one of {TEXT_LAYOUTS}")
    config = config or tiny_text_config()
    weights = text_encoder_state_dict(config, seed=seed)
    spiece = torch.frombuffer(bytearray(tiny_spiece_model()), dtype=torch.uint8)
    path = Path(path)

    if layout == "transformers":
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.to(dtype) for k, v in weights.items()}
        tensors[ENCODER_EMBEDDING] = tensors["shared.weight"].clone()
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        config_json = {**config.to_dict(), "architectures": ["UMT5EncoderModel"], "torch_dtype": str(dtype)[6:]}
        (path / "config.json").write_text(json.dumps(config_json, indent=2))
        write_tokenizer_folder(path)
        return path

    name = OFFICIAL_FILE if layout == "official" else f"umt5_tiny_{layout}.safetensors"
    if path.is_dir() or not path.suffix:
        path = path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "official":
        torch.save({k: v.to(dtype).contiguous() for k, v in to_layout(weights, "text", ["official"]).items()}, path)
        write_tokenizer_folder(path.parent / "google" / "umt5-xxl")
        return path
    tensors = {}
    for key, value in weights.items():
        if layout == "comfy_fp8_scaled" and re.fullmatch(_FP8_LAYERS, key.removesuffix(".weight")):
            tensors[key], tensors[key.removesuffix("weight") + "scale_weight"] = quantize_fp8(value)
        else:
            tensors[key] = value.to(dtype)
    if layout == "comfy_fp8_scaled":
        tensors[FP8_MARKER] = torch.empty(0, dtype=torch.float8_e4m3fn)
    tensors[SPIECE_KEY] = spiece
    save_file(tensors, str(path))
    return path
