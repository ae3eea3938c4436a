"""The umt5-xxl text encoder of Wan2.x, run by transformers' `UMT5EncoderModel`.

Facts from the reference (wan/modules/t5.py, `umt5_xxl(encoder_only=True)`), all of which
`UMT5EncoderModel` with a gated-GELU config computes the same way (checked against the
official names by the tests):
- a token embedding, then 24 pre-norm blocks: RMS norm (eps 1e-6, no mean, no bias) ->
  self-attention without the 1/sqrt(d) scaling -> residual; RMS norm -> gated FFN
  `fc2(fc1(x) * gelu_tanh(gate(x)))` -> residual; a final RMS norm.
- umt5, unlike T5 v1.1, gives *every* block its own relative position bias table
  [32 buckets, 64 heads] (bidirectional buckets, exact below 8, logarithmic up to 128).
- prompts are padded to 512 tokens and the mask keeps padding out of attention; each
  prompt's output is cut to its true length (tokens including the final </s>).

Checkpoints: the official `models_t5_umt5-xxl-enc-bf16.pth` (its own names, converted by the
"text" rows of `wan_core.loading.LAYOUT_CONVERSIONS`), ComfyUI's text-encoder files
(transformers names, bf16/fp16 or fp8 in either ComfyUI format, the tokenizer inside as
`spiece_model`), and transformers folders (config.json + weights).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from transformers import UMT5Config, UMT5EncoderModel
from transformers.models.umt5.modeling_umt5 import UMT5DenseGatedActDense

from wan_core.configs import TEXT_LEN
from wan_core.loading import (QUANT_MODES, Source, check_load_options, convert_layout, read_state_dict,
                              require_kind, split_fp8)
from wan_core.ops.linear import convert_linears_to_fp8, fp8_to_dtype, quantize_fp8
from wan_core.text.tokenizer import (TokenizerSource, UMT5Tokenizer, is_tokenizer_folder,
                                     load_tokenizer)

# Not stored in the weights: umt5's bucket range and norm epsilon, and where the official
# release keeps the tokenizer relative to the .pth file.
MAX_DISTANCE = 128
LAYER_NORM_EPS = 1e-6
OFFICIAL_TOKENIZER_DIR = Path("google") / "umt5-xxl"
SPIECE_KEY = "spiece_model"

EMBEDDING = "shared.weight"
ENCODER_EMBEDDING = "encoder.embed_tokens.weight"  # transformers' second name for the same table
_BLOCK = re.compile(r"encoder\.block\.(\d+)\.")


class WanTextEncoder:
    """umt5 encoder + tokenizer. `encode(prompts)` gives one [L_i, d_model] tensor per prompt."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: UMT5Tokenizer, *, text_len: int = TEXT_LEN) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    def to(self, device: Union[str, torch.device]) -> "WanTextEncoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Embeddings [L_i, d_model] on the encoder's device, L_i = the prompt's token count
        (including </s>, at most `text_len`); padding positions are not returned."""
        if isinstance(prompts, (list, tuple)) and not prompts:
            return []
        ids, mask = self.tokenizer(prompts, self.text_len)
        hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        return [row[:length] for row, length in zip(hidden, mask.sum(dim=1).tolist())]

    def __repr__(self) -> str:
        c = self.model.config
        return (f"WanTextEncoder(umt5 d_model={c.d_model}, layers={c.num_layers}, heads={c.num_heads}, "
                f"dtype={self.dtype}, device={self.device}, tokenizer={self.tokenizer!r})")


def umt5_config(**dims) -> UMT5Config:
    """A `UMT5Config` for Wan's encoder (gated GELU, eager attention like the reference's
    einsum + float softmax) with the given dimensions."""
    config = UMT5Config(feed_forward_proj="gated-gelu", relative_attention_max_distance=MAX_DISTANCE,
                        layer_norm_epsilon=LAYER_NORM_EPS, dropout_rate=0.0, tie_word_embeddings=False,
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **dims)
    config._attn_implementation = "eager"
    return config


def detect_umt5_config(shapes: Mapping[str, Sequence[int]]) -> UMT5Config:
    """The encoder's `UMT5Config` from the shapes of a state dict in transformers names."""
    shapes = {k: tuple(v) for k, v in shapes.items()}
    required = (EMBEDDING, "encoder.block.0.layer.0.SelfAttention.q.weight",
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    missing = [k for k in required if k not in shapes]
    if missing:
        raise ValueError(f"not a umt5 encoder state dict: missing {missing}")
    blocks = sorted({int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))})
    if blocks != list(range(len(blocks))):
        raise ValueError(f"encoder blocks are not numbered 0..{len(blocks) - 1}: found {blocks}")
    without_bias = [n for n in blocks
                    if f"encoder.block.{n}.layer.0.SelfAttention.relative_attention_bias.weight" not in shapes]
    if without_bias:
        raise ValueError(f"blocks {without_bias[:5]} have no relative position bias of their own: this is a "
                         f"T5 encoder (one bias table in block 0), not umt5. Wan uses umt5-xxl")
    if "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in shapes:
        raise ValueError("the encoder's FFN is not gated (no DenseReluDense.wi_0): not umt5-xxl")
    vocab_size, d_model = shapes[EMBEDDING]
    num_buckets, num_heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    if inner % num_heads:
        raise ValueError(f"attention width {inner} is not a multiple of the {num_heads} heads of the position bias")
    return umt5_config(vocab_size=vocab_size, d_model=d_model, d_kv=inner // num_heads, num_heads=num_heads,
                       d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
                       num_layers=len(blocks), relative_attention_num_buckets=num_buckets)


class _GatedFFNForFP8(UMT5DenseGatedActDense):
    """The gated FFN without transformers' cast of the hidden activations to `wo.weight.dtype`
    (meant for an fp32 `wo` in a half-precision model): with an fp8 `wo` it would round the
    activations to fp8. `FP8Linear` computes in its input's dtype, so no cast is needed."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gated = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
        return self.wo(self.dropout(gated))


def load_text_encoder(source: Source, *, dtype: torch.dtype = torch.bfloat16,
                      device: Union[str, torch.device] = "cpu", tokenizer: Optional[TokenizerSource] = None,
                      quant: Optional[str] = None) -> WanTextEncoder:
    """A `WanTextEncoder` from the official .pth, a ComfyUI text-encoder file, a transformers
    folder (config.json + weights) or a state dict.

    `dtype`: the parameters' and activations' dtype (fp8 files are dequantized into it).
    `device`: where the encoder runs ("cpu" is the reference's `t5_cpu`).
    `tokenizer`: a tokenizer folder, sentencepiece .model file, its bytes or a uint8 tensor;
    by default the checkpoint's own `spiece_model`, the tokenizer files of a transformers
    folder, or the `google/umt5-xxl` folder beside an official .pth.
    `quant`: None, or "fp8_e4m3fn"/"fp8_e5m2" to keep the blocks' linear weights in fp8 (one
    scale per tensor, upcast to `dtype` per matmul); fp8 files keep their stored weights.
    """
    name = "the given state dict" if isinstance(source, Mapping) else str(source)
    check_load_options(dtype, quant)
    device = torch.device(device)

    folder_config = _transformers_folder_config(source)
    raw = read_state_dict(source)
    spiece = raw.pop(SPIECE_KEY, None)
    state_dict, _ = convert_layout(raw, "text")
    require_kind(list(state_dict), "text", name)
    plain, quantized = split_fp8(state_dict)
    _merge_embedding_names(plain, quantized, name)
    shapes = {**{k: v.shape for k, v in plain.items()}, **{k: s.shape for k, (s, _) in quantized.items()}}
    try:
        config = folder_config or detect_umt5_config(shapes)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    # before any weight is copied: a missing tokenizer should fail fast
    text_tokenizer = load_tokenizer(_find_tokenizer(source, tokenizer, spiece, name))
    if text_tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer ({text_tokenizer.description}) has {text_tokenizer.vocab_size} tokens but "
                         f"the encoder in {name} embeds only {config.vocab_size}: they do not belong together. "
                         f"Pass the umt5-xxl tokenizer (google/umt5-xxl) as tokenizer=")

    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    fp8_weights: set[str] = set()
    if quant is not None:
        replaced = convert_linears_to_fp8(model.encoder.block, fp8_dtype=QUANT_MODES[quant], bias_dtype=dtype)
        fp8_weights = {f"encoder.block.{n}.weight" for n in replaced}
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.__class__ = _GatedFFNForFP8
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if k != ENCODER_EMBEDDING and not (k.endswith("_scale") and k.removesuffix("_scale") in fp8_weights)}
    _check_shapes(expected, shapes, name, config)

    tensors: dict[str, torch.Tensor] = {}
    for key in expected:
        if key in fp8_weights:
            stored, scale = quantized[key] if key in quantized else quantize_fp8(plain[key].to(device), QUANT_MODES[quant])
            tensors[key] = stored.to(device)
            tensors[key + "_scale"] = scale.to(device=device, dtype=torch.float32)
        elif key in quantized:
            stored, scale = quantized[key]
            tensors[key] = fp8_to_dtype(stored.to(device), scale, dtype)
        else:
            tensors[key] = plain[key].to(device=device, dtype=dtype)
    tensors[ENCODER_EMBEDDING] = tensors[EMBEDDING]
    model.load_state_dict(tensors, strict=True, assign=True)
    model.set_input_embeddings(model.shared)  # one embedding table, not two copies
    model.eval().requires_grad_(False)
    return WanTextEncoder(model, text_tokenizer)


def _transformers_folder_config(source: Source) -> Optional[UMT5Config]:
    """The config of a transformers folder (None for anything else)."""
    if isinstance(source, Mapping) or not Path(source).is_dir() or not (Path(source) / "config.json").is_file():
        return None
    path = Path(source) / "config.json"
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable JSON config: {e}") from None
    if values.get("model_type") != "umt5":
        raise ValueError(f"{path} describes a {values.get('model_type')!r} model, not umt5; Wan's text encoder "
                         f"is umt5-xxl (a folder made with transformers' UMT5EncoderModel.save_pretrained)")
    if values.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        raise ValueError(f"{path}: feed_forward_proj is {values['feed_forward_proj']!r}; umt5-xxl uses gated-gelu")
    dims = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets")
    config = umt5_config(**{k: values[k] for k in dims if k in values})
    config.relative_attention_max_distance = values.get("relative_attention_max_distance", MAX_DISTANCE)
    config.layer_norm_epsilon = values.get("layer_norm_epsilon", LAYER_NORM_EPS)
    return config


def _merge_embedding_names(plain: dict[str, torch.Tensor], quantized: dict, name: str) -> None:
    """Keep one embedding under `shared.weight`. transformers files store it twice
    (`shared.weight` and `encoder.embed_tokens.weight`, the same values); ComfyUI's store
    `shared.weight` only."""
    for table in (plain, quantized):
        if ENCODER_EMBEDDING not in table:
            continue
        encoder_copy = table.pop(ENCODER_EMBEDDING)
        if EMBEDDING not in plain and EMBEDDING not in quantized:
            table[EMBEDDING] = encoder_copy
        elif table is plain and EMBEDDING in plain and not torch.equal(plain[EMBEDDING], encoder_copy):
            raise ValueError(f"{name} holds two different token embeddings ({EMBEDDING} and {ENCODER_EMBEDDING}); "
                             f"umt5 has one. The file is inconsistent")


def _check_shapes(expected: Mapping[str, tuple], shapes: Mapping[str, Sequence[int]], name: str,
                  config: UMT5Config) -> None:
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k}: {tuple(shapes[k])} (expected {expected[k]})" for k in sorted(set(expected) & set(shapes))
             if tuple(shapes[k]) != expected[k]]
    if not (missing or unexpected or wrong):
        return
    problems = [f"{len(v)} {what} (e.g. {v[:3]})" for what, v in
                (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong)) if v]
    raise ValueError(f"{name} does not match a umt5 encoder with d_model {config.d_model}, {config.num_layers} "
                     f"layers, {config.num_heads} heads: tensors {'; '.join(problems)}. Is the file complete?")


def _find_tokenizer(source: Source, tokenizer: Optional[TokenizerSource], spiece: Optional[torch.Tensor],
                    name: str) -> TokenizerSource:
    if tokenizer is not None:
        return tokenizer
    if spiece is not None:
        return spiece
    if not isinstance(source, Mapping):
        path = Path(source)
        candidates = [path] if path.is_dir() else [path.parent / OFFICIAL_TOKENIZER_DIR]
        for folder in candidates:
            if folder.is_dir() and is_tokenizer_folder(folder):
                return folder
    raise FileNotFoundError(f"no tokenizer for {name}: it carries no '{SPIECE_KEY}' tensor and no tokenizer files "
                            f"were found (looked for {OFFICIAL_TOKENIZER_DIR}/ beside an official .pth, or "
                            f"tokenizer files in a transformers folder). Pass tokenizer= the google/umt5-xxl "
                            f"tokenizer folder or its spiece.model")
