"""Full-size umt5-xxl name and shape sets: the official checkpoint converted by our rename rows
must be exactly what transformers' UMT5EncoderModel holds (shared/manifests, made from the
reference code and from transformers on the meta device)."""
from __future__ import annotations

import json

import torch

from wan_core.loading import convert_layout, to_layout
from wan_core.text import detect_umt5_config

# transformers names the one token embedding twice: `shared.weight` (the model's) and
# `encoder.embed_tokens.weight` (the encoder stack's), tied and saved with the same values.
# The official file stores it once as `token_embedding.weight`, which converts to `shared.weight`.
ENCODER_ALIAS = "encoder.embed_tokens.weight"


def _manifest(manifest_dir, name: str) -> dict[str, tuple]:
    tensors = json.loads((manifest_dir / f"{name}.json").read_text())["tensors"]
    return {k: (tuple(shape), dtype) for k, (shape, dtype) in tensors.items()}


def test_official_names_convert_to_the_transformers_names(manifest_dir):
    official = _manifest(manifest_dir, "official_umt5_xxl_encoder")
    hf = _manifest(manifest_dir, "hf_umt5_xxl_encoder")
    converted, layouts = convert_layout(official, "text")
    assert layouts == ("official",)
    assert converted == {k: v for k, v in hf.items() if k != ENCODER_ALIAS}
    assert hf[ENCODER_ALIAS] == hf["shared.weight"]
    # and back: the writer's direction gives the official names again
    assert to_layout(converted, "text", ["official"]) == official


def test_detected_config_builds_exactly_the_manifest(manifest_dir):
    from transformers import UMT5EncoderModel

    hf = _manifest(manifest_dir, "hf_umt5_xxl_encoder")
    config = detect_umt5_config({k: shape for k, (shape, _) in hf.items()})
    # umt5-xxl as the reference's umt5_xxl() defines it
    assert (config.vocab_size, config.d_model, config.d_ff, config.num_heads, config.d_kv, config.num_layers,
            config.relative_attention_num_buckets, config.relative_attention_max_distance) == \
        (256384, 4096, 10240, 64, 64, 24, 32, 128)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: shape for k, (shape, _) in hf.items()}
