"""Tiny Qwen chat models whose answer is known in advance, for the prompt-extension back-end.

Real transformers models built from configs (no downloads): a small byte-level BPE tokenizer
trained here with Qwen's special tokens and a Qwen-style chat template, a one-layer Qwen2 and a
one-layer Qwen2.5-VL. The "bigram" weights make the model a fixed bigram machine: attention and
MLP outputs are zero, each token embeds as a one-hot vector, and the output head maps the last
token to a chosen next token. Generation after "<|im_start|>assistant\\n" therefore spells out
BIGRAM_ANSWER token by token and stops at <|im_end|>, whatever the sampling settings.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from wan_core.prompt_extend.system_prompts import (I2V_EMPTY_EN, I2V_EMPTY_ZH, I2V_EN, I2V_ZH,
                                                   T2V_EN, T2V_ZH)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen's layout: string content for text models, a list of typed parts for VL models.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# What the bigram models answer: quoted and padded, as chat models sometimes do.
BIGRAM_ANSWER = '  "Calm waves roll onto the shore at dawn"  '
GENERATION_PROMPT = "<|im_start|>assistant\n"


def make_chat_tokenizer():
    """Qwen2's tokenizer class (its byte-level pre-tokenizer, so any text round-trips) over a
    small BPE vocabulary trained here, with Qwen's special tokens and chat template."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    qwen = Qwen2Tokenizer().backend_tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.normalizer, bpe.pre_tokenizer, bpe.decoder = qwen.normalizer, qwen.pre_tokenizer, qwen.decoder
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [T2V_EN, T2V_ZH, I2V_EN, I2V_ZH, I2V_EMPTY_EN, I2V_EMPTY_ZH] + [BIGRAM_ANSWER] * 50
    bpe.train_from_iterator(corpus, trainer)
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]],
                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def answer_chain(tokenizer) -> list[int]:
    """Token ids of BIGRAM_ANSWER then <|im_end|>; the bigram needs every one distinct."""
    ids = tokenizer(BIGRAM_ANSWER, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(set(ids)) != len(ids):
        raise ValueError("BIGRAM_ANSWER must tokenize into distinct tokens")
    return ids


def _hidden_size_for(vocab: int) -> int:
    return -(-vocab // 16) * 16  # one-hot embeddings need hidden >= vocab; 8 heads of even size


def _make_bigram(text_model: torch.nn.Module, lm_head: torch.nn.Module, tokenizer) -> None:
    """Program `text_model` + `lm_head` to continue the generation prompt with BIGRAM_ANSWER."""
    start = tokenizer(GENERATION_PROMPT)["input_ids"][-1]
    chain = answer_chain(tokenizer)
    if start in chain:
        raise ValueError("the generation prompt's last token also occurs in BIGRAM_ANSWER")
    vocab = len(tokenizer)
    with torch.no_grad():
        for layer in text_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        text_model.embed_tokens.weight.zero_()
        text_model.embed_tokens.weight[:vocab, :vocab] = torch.eye(vocab)
        lm_head.weight.zero_()
        for current, following in zip([start] + chain[:-1], chain):
            lm_head.weight[following, current] = 1.0


def _qwen_sampling(config):
    """The sampling settings Qwen2.5 Instruct checkpoints ship with."""
    from transformers import GenerationConfig
    return GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                            repetition_penalty=1.05, eos_token_id=config.eos_token_id,
                            pad_token_id=config.pad_token_id)


def tiny_qwen2(tokenizer, *, bigram: bool = True, seed: int = 0):
    """A one-layer Qwen2ForCausalLM: the bigram machine, or random weights (`bigram=False`)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab = len(tokenizer)
    hidden = _hidden_size_for(vocab) if bigram else 32
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = _qwen_sampling(config)
    if bigram:
        _make_bigram(model.model, model.lm_head, tokenizer)
    return model


def tiny_qwen2_5_vl(tokenizer):
    """A one-layer Qwen2.5-VL (one vision block, 14-pixel patches merged 2x2) that answers
    BIGRAM_ANSWER."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocab = len(tokenizer)
    hidden = _hidden_size_for(vocab)
    half_head = hidden // 8 // 2
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   bos_token_id=None)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         rope_scaling={"type": "mrope", "mrope_section": [
                             half_head - 2 * (half_head // 3), half_head // 3, half_head // 3]},
                         **special),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0]),
        tie_word_embeddings=False, **ids, **special)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = _qwen_sampling(config.text_config)
    _make_bigram(model.model.language_model, model.lm_head, tokenizer)
    return model


def image_only_vl_processor(tokenizer):
    """Qwen2.5-VL's processor for images only.

    transformers 5 builds the Qwen2.5-VL video processor only when torchvision is installed,
    and the processor checks that one is given; where torchvision is missing (there is none for
    every torch build) the check is skipped for the absent video processor. ComfyUI installs
    torchvision, where `load_chat_model` builds the full processor.
    """
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer,
                              video_processor=None, chat_template=CHAT_TEMPLATE)


def write_chat_model(folder: Path, tokenizer=None, *, vision: bool = False) -> Path:
    """A tiny bigram chat model folder as `from_pretrained` reads it: Qwen2, or Qwen2.5-VL with
    its image-processor settings when `vision` is set."""
    folder = Path(folder)
    tokenizer = tokenizer if tokenizer is not None else make_chat_tokenizer()
    if vision:
        tiny_qwen2_5_vl(tokenizer).save_pretrained(folder)
        image_only_vl_processor(tokenizer).image_processor.save_pretrained(folder)
    else:
        tiny_qwen2(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
