"""The umt5 text encoder: layouts, parity with transformers, tokenizer, cleaning, bad input.

Tiny random encoders (d_model 24, 2 blocks) with a tiny sentencepiece tokenizer, written in
every real layout by `wan_core.testing.text`. Oracles: transformers' `UMT5EncoderModel`
loaded by transformers itself, transformers' T5 tokenizer, and a restatement of the official
t5.py math over the official tensor names (so a wrong rename, e.g. swapped FFN branches,
fails even though the checkpoint writer and the loader share the rename table).
"""
from __future__ import annotations

import io
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from wan_core.loading import read_state_dict
from wan_core.testing.compare import PLACEMENT_TOLERANCE, max_relative_error
from wan_core.testing.text import (OFFICIAL_FILE, TINY_CORPUS, TEXT_LAYOUTS, text_encoder_state_dict,
                                   tiny_spiece_model, tiny_text_config, write_text_encoder_checkpoint,
                                   write_tokenizer_folder)
from wan_core.text import clean_prompt, load_text_encoder, load_tokenizer

PROMPTS = [
    "A white cat sits on a wooden windowsill and watches the rain fall outside.",
    "一只白色的猫坐在木制窗台上，看着窗外的雨。",
    "  Two astronauts &amp;amp; the   moon\n\t rising ",
    "x",
]
FP32_RTOL = 1e-5
# fp8 e4m3 keeps 3 mantissa bits (up to 6% error per weight); through two random blocks the
# output's relative (Frobenius) error measured 8-9%.
FP8_REL_TOL = 0.15


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("text")
    return {layout: write_text_encoder_checkpoint(root / layout, layout, dtype=torch.float32, seed=3)
            for layout in TEXT_LAYOUTS}


@pytest.fixture(scope="module")
def fp32_embeddings(checkpoints) -> dict:
    return {layout: load_text_encoder(path, dtype=torch.float32).encode(PROMPTS)
            for layout, path in checkpoints.items()}


# ------------------------------------------------------------------------------------------
# (a) layouts and parity


def test_official_comfy_and_transformers_layouts_give_identical_embeddings(fp32_embeddings):
    # identical weights in files laid out differently: equal to MKL's alignment-dependent rounding
    for layout in ("comfy", "transformers"):
        for ours, official in zip(fp32_embeddings[layout], fp32_embeddings["official"]):
            assert max_relative_error(ours, official) <= PLACEMENT_TOLERANCE, layout


def test_official_layout_matches_transformers_loading_its_own_folder(checkpoints, fp32_embeddings):
    from transformers import UMT5EncoderModel

    oracle = UMT5EncoderModel.from_pretrained(str(checkpoints["transformers"]), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    ids, mask = load_tokenizer(checkpoints["transformers"])(PROMPTS)
    with torch.no_grad():
        expected = oracle(input_ids=ids, attention_mask=mask).last_hidden_state
    for row, ours in enumerate(fp32_embeddings["official"]):
        length = int(mask[row].sum())
        assert ours.shape == (length, 24)
        assert _rel(ours, expected[row, :length]) <= FP32_RTOL


def _official_math(weights: dict, ids: torch.Tensor, mask: torch.Tensor, num_heads: int, num_buckets: int = 32,
                   max_distance: int = 128) -> torch.Tensor:
    """Wan's umt5 encoder as the official t5.py defines it, over the official names (fp32)."""
    length = ids.shape[1]
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # key position - query position
    half = num_buckets // 2  # bidirectional: one half of the buckets per direction
    exact = half // 2
    dist = rel.abs()
    log_bucket = exact + (torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()
    bucket = (rel > 0).long() * half + torch.where(dist < exact, dist, log_bucket.clamp(max=half - 1))

    def rms(v, w):
        return w * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6))

    def gelu_tanh(v):
        return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))

    x = weights["token_embedding.weight"][ids]
    batch = ids.shape[0]
    n = 0
    while f"blocks.{n}.norm1.weight" in weights:
        w = {k[len(f"blocks.{n}."):-len(".weight")]: v for k, v in weights.items() if k.startswith(f"blocks.{n}.")}
        h = rms(x, w["norm1"])
        q, k, v = (F.linear(h, w[f"attn.{c}"]).view(batch, length, num_heads, -1).transpose(1, 2) for c in "qkv")
        scores = q @ k.transpose(-1, -2) + w["pos_embedding.embedding"][bucket].permute(2, 0, 1)  # no 1/sqrt(d)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        x = x + F.linear((scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1), w["attn.o"])
        h = rms(x, w["norm2"])
        x = x + F.linear(F.linear(h, w["ffn.fc1"]) * gelu_tanh(F.linear(h, w["ffn.gate.0"])), w["ffn.fc2"])
        n += 1
    return rms(x, weights["norm.weight"])


def test_official_names_mean_what_the_reference_computes(checkpoints, fp32_embeddings):
    weights = read_state_dict(checkpoints["official"])
    assert "blocks.1.pos_embedding.embedding.weight" in weights  # umt5: a bias table per block
    ids, mask = load_tokenizer(checkpoints["official"].parent / "google" / "umt5-xxl")(PROMPTS)
    expected = _official_math(weights, ids, mask, num_heads=tiny_text_config().num_heads)
    for row, ours in enumerate(fp32_embeddings["official"]):
        assert _rel(ours, expected[row, :len(ours)]) <= FP32_RTOL


def test_fp8_file_and_fp8_kept_weights(checkpoints, fp32_embeddings):
    fp8_file = checkpoints["comfy_fp8_scaled"]
    dequantized = load_text_encoder(fp8_file, dtype=torch.float32).encode(PROMPTS)
    kept = load_text_encoder(fp8_file, dtype=torch.float32, quant="fp8_e4m3fn")
    assert kept.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float8_e4m3fn
    quantized_on_load = load_text_encoder(checkpoints["comfy"], dtype=torch.float32, quant="fp8_e4m3fn")
    for a, b, c, exact in zip(dequantized, kept.encode(PROMPTS), quantized_on_load.encode(PROMPTS),
                              fp32_embeddings["comfy"]):
        # the same stored fp8 values and scales, upcast per matmul or once at load: identical
        assert torch.equal(a, b) and torch.equal(a, c)
        assert float((a - exact).norm() / exact.norm()) <= FP8_REL_TOL
    # an fp8 token embedding without a scale (a plain cast) is read as scale 1
    weights = read_state_dict(fp8_file)
    weights["shared.weight"] = weights["shared.weight"].to(torch.float8_e4m3fn)
    encoder = load_text_encoder(weights, dtype=torch.float32, quant="fp8_e4m3fn")
    assert encoder.model.shared.weight.dtype == torch.float32
    assert torch.equal(encoder.model.shared.weight, weights["shared.weight"].float())


def test_bf16_encoder(checkpoints, fp32_embeddings):
    encoder = load_text_encoder(checkpoints["official"])  # default dtype bf16
    assert encoder.dtype == torch.bfloat16 and encoder.device == torch.device("cpu")
    for ours, exact in zip(encoder.encode(PROMPTS), fp32_embeddings["official"]):
        assert ours.dtype == torch.bfloat16
        assert float((ours.float() - exact).norm() / exact.norm()) <= 2e-2


def test_transformers_folder_with_inconsistent_embeddings_is_refused(checkpoints, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(checkpoints["transformers"], folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["encoder.embed_tokens.weight"] = tensors["encoder.embed_tokens.weight"] + 1
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="two different token embeddings"):
        load_text_encoder(folder, dtype=torch.float32)


# ------------------------------------------------------------------------------------------
# (b) tokenizer


def _train_spiece(sentences) -> bytes:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=150, hard_vocab_limit=False,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1,
        minloglevel=2)
    return model.getvalue()


def test_spiece_model_tensor_round_trips(tmp_path):
    proto = _train_spiece(list(TINY_CORPUS[::2]) + ["The river flows past the mill, 水车慢慢转动。"] * 3)
    model_file = tmp_path / "spiece.model"
    model_file.write_bytes(proto)
    save_file({"spiece_model": torch.frombuffer(bytearray(proto), dtype=torch.uint8)}, str(tmp_path / "t.safetensors"))
    stored = load_file(str(tmp_path / "t.safetensors"))["spiece_model"]
    assert stored.dtype == torch.uint8 and bytes(stored.numpy().tobytes()) == proto
    from_file, from_tensor = load_tokenizer(model_file)(PROMPTS), load_tokenizer(stored)(PROMPTS)
    assert torch.equal(from_file[0], from_tensor[0]) and torch.equal(from_file[1], from_tensor[1])
    assert torch.equal(from_file[0], load_tokenizer(proto)(PROMPTS)[0])


def test_sentencepiece_and_transformers_tokenizers_agree(tmp_path):
    import sentencepiece

    folder = write_tokenizer_folder(tmp_path / "tok")
    prompts = PROMPTS + list(TINY_CORPUS) + ["Ｆｕｌｌ－width “quotes” and ﬁ ligature", "cafÃ© crème", ""]
    hf_ids, hf_mask = load_tokenizer(folder)(prompts)
    sp_ids, sp_mask = load_tokenizer(tiny_spiece_model())(prompts)
    assert torch.equal(hf_ids, sp_ids) and torch.equal(hf_mask, sp_mask)
    processor = sentencepiece.SentencePieceProcessor(model_proto=tiny_spiece_model())
    for row, prompt in enumerate(prompts):
        expected = processor.encode(clean_prompt(prompt)) + [1]  # </s> appended, no <s>
        length = int(sp_mask[row].sum())
        assert sp_ids[row, :length].tolist() == expected
        assert sp_mask[row, length:].sum() == 0 and bool((sp_ids[row, length:] == 0).all())  # <pad> = 0


def test_long_prompts_are_truncated_to_512_with_eos_last(tmp_path):
    folder = write_tokenizer_folder(tmp_path / "tok")
    long_prompt = " ".join(TINY_CORPUS * 4)
    for tokenizer in (load_tokenizer(folder), load_tokenizer(tiny_spiece_model())):
        ids, mask = tokenizer([long_prompt, "x"])
        assert ids.shape == (2, 512) and int(mask[0].sum()) == 512
        assert int(ids[0, -1]) == 1
    assert torch.equal(load_tokenizer(folder)([long_prompt])[0], load_tokenizer(tiny_spiece_model())([long_prompt])[0])


# ------------------------------------------------------------------------------------------
# (c) cleaning and trimming


@pytest.mark.parametrize("raw, cleaned", [
    ("  a   cat\n\twalks \u3000 home  ", "a cat walks home"),      # every Unicode space run -> one space
    ("salt &amp;amp; pepper", "salt & pepper"),                   # entities unescaped repeatedly
    ("&lt;b&gt;bold&lt;/b&gt;", "<b>bold</b>"),
    ("cafÃ© crÃ¨me", "café crème"),                               # mojibake repaired
    ("色调艳丽，过曝", "色调艳丽,过曝"),                              # full-width comma -> ','
    ("“quoted” ‘text’", "\"quoted\" 'text'"),                    # curly quotes straightened
    ("ﬁne", "fine"),                                             # ligature split
])
def test_clean_prompt_like_the_reference(raw, cleaned):
    assert clean_prompt(raw) == cleaned


def test_embeddings_are_trimmed_to_the_token_count(checkpoints, fp32_embeddings):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_proto=tiny_spiece_model())
    for prompt, embedding in zip(PROMPTS, fp32_embeddings["comfy"]):
        assert embedding.shape == (len(processor.encode(clean_prompt(prompt))) + 1, 24)
    encoder = load_text_encoder(checkpoints["comfy"], dtype=torch.float32)
    alone = encoder.encode([PROMPTS[3]])[0]
    assert torch.allclose(alone, fp32_embeddings["comfy"][3], rtol=1e-6, atol=1e-6)  # batch does not leak
    assert not torch.allclose(alone, fp32_embeddings["comfy"][0][:len(alone)])


# ------------------------------------------------------------------------------------------
# (e) bad input


def test_dit_and_vae_files_are_refused_with_the_right_loader_named(tmp_path):
    dit = {"patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2), "blocks.0.self_attn.q.weight": torch.zeros(8, 8),
           "text_embedding.0.weight": torch.zeros(8, 24), "head.head.weight": torch.zeros(64, 8)}
    vae = {"encoder.conv1.weight": torch.zeros(4, 3, 3, 3, 3), "decoder.conv1.weight": torch.zeros(4, 4, 3, 3, 3)}
    for name, tensors, kind in (("dit.safetensors", dit, "diffusion transformer"), ("vae.safetensors", vae, "VAE")):
        save_file(tensors, str(tmp_path / name))
        with pytest.raises(ValueError, match=kind):
            load_text_encoder(tmp_path / name)


def test_missing_tokenizer_is_a_clear_error(checkpoints, tmp_path):
    lonely = tmp_path / OFFICIAL_FILE
    shutil.copy(checkpoints["official"], lonely)  # no google/umt5-xxl/ beside it
    with pytest.raises(FileNotFoundError, match="tokenizer="):
        load_text_encoder(lonely)
    encoder = load_text_encoder(lonely, dtype=torch.float32, tokenizer=checkpoints["official"].parent / "google" / "umt5-xxl")
    assert encoder.encode(PROMPTS[:1])[0].shape[1] == 24
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        load_text_encoder(lonely, tokenizer=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        load_text_encoder(lonely, tokenizer=b"not a model")


def test_mismatched_or_foreign_encoders_are_refused(tmp_path):
    weights = text_encoder_state_dict(tiny_text_config(), seed=0)
    t5_v11 = {k: v for k, v in weights.items() if "block.1.layer.0.SelfAttention.relative_attention_bias" not in k}
    with pytest.raises(ValueError, match="T5 encoder .* not umt5"):
        load_text_encoder(t5_v11, tokenizer=tiny_spiece_model())
    truncated = {k: v for k, v in weights.items() if k != "encoder.block.1.layer.1.DenseReluDense.wo.weight"}
    with pytest.raises(ValueError, match="1 missing"):
        load_text_encoder(truncated, tokenizer=tiny_spiece_model())
    small_vocab = text_encoder_state_dict(tiny_text_config(vocab_size=64), seed=0)
    with pytest.raises(ValueError, match="do not belong together"):
        load_text_encoder(small_vocab, tokenizer=tiny_spiece_model())
    with pytest.raises(ValueError, match="quant"):
        load_text_encoder(weights, tokenizer=tiny_spiece_model(), quant="int4")
    with pytest.raises(ValueError, match="dtype"):
        load_text_encoder(weights, tokenizer=tiny_spiece_model(), dtype=torch.float8_e4m3fn)
    with pytest.raises(FileNotFoundError):
        load_text_encoder(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="list of str"):
        load_text_encoder(weights, tokenizer=tiny_spiece_model()).encode("a bare string")


def test_transformers_folder_of_another_model_is_refused(checkpoints, tmp_path):
    folder = tmp_path / "t5"
    shutil.copytree(checkpoints["transformers"], folder)
    (folder / "config.json").write_text((folder / "config.json").read_text().replace('"umt5"', '"t5"'))
    with pytest.raises(ValueError, match="not umt5"):
        load_text_encoder(folder)
