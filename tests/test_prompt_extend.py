"""Prompt extension: instructions, answer clean-up, images, and the local transformers back-end.

The local back-end runs real transformers models built here from configs (no downloads): a tiny
byte-level BPE tokenizer trained in-process with a Qwen-style chat template, a one-layer Qwen2
and a one-layer Qwen2.5-VL. Their weights are set so that the model is a fixed bigram machine:
attention and MLP outputs are zero, each token embeds as a one-hot vector, and the output head
maps the last token to a chosen next token. Generation after "<|im_start|>assistant\\n" therefore
spells out ANSWER token by token and stops with <|im_end|>, whatever the sampling settings, so
the tests know exactly what the real `generate` call must return.
"""
from __future__ import annotations

import gc
import inspect
import json
import logging
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wan_core.prompt_extend import (ChatModel, LocalExtender, PromptExtendError,
                                    clean_extended_prompt, extend_prompt, fit_image,
                                    load_chat_model, release_local_models, system_prompt,
                                    to_pil_image)
from wan_core.prompt_extend import local as local_backend
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
ANSWER = '  "Calm waves roll onto the shore at dawn"  '
CLEAN_ANSWER = "Calm waves roll onto the shore at dawn"


# --- tiny models --------------------------------------------------------------------------------

def make_tokenizer():
    """Qwen2's tokenizer class (its pre-tokenizer, byte-level so any text round-trips) over a
    small BPE vocabulary trained here, with Qwen's special tokens and chat template."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    qwen = Qwen2Tokenizer().backend_tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.normalizer, bpe.pre_tokenizer, bpe.decoder = qwen.normalizer, qwen.pre_tokenizer, qwen.decoder
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [T2V_EN, T2V_ZH, I2V_EN, I2V_ZH, I2V_EMPTY_EN, I2V_EMPTY_ZH] + [ANSWER] * 50
    bpe.train_from_iterator(corpus, trainer)
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]],
                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def answer_chain(tokenizer) -> list[int]:
    """Token ids of ANSWER then <|im_end|>; the bigram needs every one distinct."""
    ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(set(ids)) == len(ids), "ANSWER must tokenize into distinct tokens"
    return ids


def hidden_size_for(vocab: int) -> int:
    return -(-vocab // 16) * 16  # one-hot embeddings need hidden >= vocab; 8 heads of even size


def make_bigram(text_model: torch.nn.Module, lm_head: torch.nn.Module, tokenizer) -> None:
    """Program `text_model` + `lm_head` to continue the generation prompt with ANSWER."""
    start = tokenizer("<|im_start|>assistant\n")["input_ids"][-1]
    chain = answer_chain(tokenizer)
    assert start not in chain
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


def qwen_sampling(config) -> None:
    """The sampling settings Qwen2.5 Instruct checkpoints ship with."""
    from transformers import GenerationConfig
    return GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                            repetition_penalty=1.05, eos_token_id=config.eos_token_id,
                            pad_token_id=config.pad_token_id)


def make_text_model(tokenizer, *, bigram: bool, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab = len(tokenizer)
    hidden = hidden_size_for(vocab) if bigram else 32
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = qwen_sampling(config)
    if bigram:
        make_bigram(model.model, model.lm_head, tokenizer)
    return model


def make_vl_model(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocab = len(tokenizer)
    hidden = hidden_size_for(vocab)
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
    model.generation_config = qwen_sampling(config.text_config)
    make_bigram(model.model.language_model, model.lm_head, tokenizer)
    return model


def make_vl_processor(tokenizer):
    """Qwen2.5-VL's processor for images only.

    transformers 5 builds the Qwen2.5-VL video processor only when torchvision is installed,
    and the processor checks that one is given; this test environment has no torchvision (there
    is none for its torch build), so the check is skipped for the absent video processor.
    ComfyUI installs torchvision, where `load_chat_model` builds the full processor.
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


def write_text_model(folder: Path, tokenizer) -> Path:
    """A tiny bigram Qwen2 chat model folder, as from_pretrained reads it."""
    model = make_text_model(tokenizer, bigram=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def expected_chat_text(system: str, user: str) -> str:
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n")


class FirstCall:
    """Records the arguments (by name) of a module's first forward call."""

    def __init__(self, module: torch.nn.Module):
        self.arguments = None
        self._signature = inspect.signature(module.forward)
        self._handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if self.arguments is None:
            self.arguments = dict(self._signature.bind(*args, **kwargs).arguments)

    def remove(self):
        self._handle.remove()


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory, tokenizer) -> Path:
    return write_text_model(tmp_path_factory.mktemp("qwen2_tiny"), tokenizer)


@pytest.fixture(scope="module")
def vl_chat(tokenizer) -> ChatModel:
    return ChatModel("tiny-qwen2.5-vl", make_vl_model(tokenizer), tokenizer,
                     make_vl_processor(tokenizer))


@pytest.fixture(autouse=True)
def _release_models():
    yield
    release_local_models()


# --- instructions, clean-up, images ---------------------------------------------------------------

def test_system_prompt_follows_image_prompt_and_language():
    assert system_prompt("en", image=False) == T2V_EN
    assert system_prompt("zh", image=False) == T2V_ZH
    assert system_prompt("en", image=True) == I2V_EN
    assert system_prompt("zh", image=True) == I2V_ZH
    assert system_prompt("en", image=True, empty_prompt=True) == I2V_EMPTY_EN
    assert system_prompt("zh", image=True, empty_prompt=True) == I2V_EMPTY_ZH
    for text in (T2V_EN, I2V_EN, I2V_EMPTY_EN):
        assert "English only" in text
    for text in (T2V_ZH, I2V_ZH, I2V_EMPTY_ZH):
        assert "只用中文输出" in text
    with pytest.raises(ValueError, match="target language 'fr'"):
        system_prompt("fr", image=False)
    with pytest.raises(ValueError, match="nothing to extend"):
        system_prompt("en", image=False, empty_prompt=True)


@pytest.mark.parametrize("answer, expected", [
    ('  "A red fox runs."  ', "A red fox runs."),
    ("<think>the user wants a fox</think>\nA red fox runs.", "A red fox runs."),
    ("Here is the rewritten prompt:\nA red fox runs\nthrough snow.", "A red fox runs through snow."),
    ("改写后的提示词：\n“一只红狐狸在雪地里奔跑。”", "一只红狐狸在雪地里奔跑。"),
    ("Day time: a red fox runs.", "Day time: a red fox runs."),
])
def test_clean_extended_prompt(answer, expected):
    assert clean_extended_prompt(answer) == expected


@pytest.mark.parametrize("answer", ["", "  \n ", '""', "<think>still thinking when cut off"])
def test_clean_extended_prompt_rejects_answers_without_a_prompt(answer):
    with pytest.raises(PromptExtendError, match="holds no prompt"):
        clean_extended_prompt(answer)


def test_to_pil_image_takes_comfy_images_arrays_and_pil():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3)).astype(np.uint8)
    comfy = torch.from_numpy(pixels.astype(np.float32) / 255.0)  # ComfyUI IMAGE [B,H,W,3]
    assert np.array_equal(np.asarray(to_pil_image(comfy)), pixels[0])
    assert np.array_equal(np.asarray(to_pil_image(pixels[1])), pixels[1])
    rgba = Image.fromarray(np.dstack([pixels[0], np.full((5, 7), 255, np.uint8)]), "RGBA")
    assert np.array_equal(np.asarray(to_pil_image(rgba)), pixels[0])
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        to_pil_image(torch.zeros(1, 3, 5, 7))
    with pytest.raises(TypeError, match="got str"):
        to_pil_image("image.png")


def test_fit_image_keeps_aspect_and_never_upscales():
    big = Image.new("RGB", (1600, 900))
    fitted = fit_image(big, 512 * 512)
    assert fitted.width * fitted.height <= 512 * 512
    assert abs(fitted.width / fitted.height - 16 / 9) < 0.01
    small = Image.new("RGB", (300, 200))
    assert fit_image(small, 512 * 512) is small


def test_extend_prompt_checks_its_arguments(tokenizer, text_model_dir):
    extender = LocalExtender(str(text_model_dir), device="cpu")
    with pytest.raises(ValueError, match="on_error='ignore'"):
        extend_prompt(extender, "a cat", on_error="ignore")
    with pytest.raises(ValueError, match="target language 'de'"):
        extend_prompt(extender, "a cat", language="de")
    with pytest.raises(TypeError, match="prompt must be a string"):
        extend_prompt(extender, None)
    with pytest.raises(ValueError, match="nothing to extend"):
        extend_prompt(extender, "   ", language="en")
    assert local_backend.cached_models() == []  # nothing was loaded for bad arguments


# --- local back-end: text ----------------------------------------------------------------------

def test_local_text_assembles_the_chat_generates_and_cleans(tokenizer, text_model_dir):
    extender = LocalExtender(str(text_model_dir), device="cpu")
    chat = extender.load()
    first = FirstCall(chat.model)
    try:
        result = extend_prompt(extender, "  waves at dawn ", language="en", seed=7)
    finally:
        first.remove()
    expected_ids = tokenizer(expected_chat_text(T2V_EN, "waves at dawn"))["input_ids"]
    assert first.arguments["input_ids"][0].tolist() == expected_ids
    assert result.prompt == CLEAN_ANSWER
    assert result.extended and result.original == "  waves at dawn "
    assert result.seed == 7 and result.system_prompt == T2V_EN

    zh = extend_prompt(extender, "海边的日出", language="zh", seed=7)
    assert zh.system_prompt == T2V_ZH and zh.prompt == CLEAN_ANSWER


def test_local_max_new_tokens_bounds_the_answer(tokenizer, text_model_dir):
    extender = LocalExtender(str(text_model_dir), device="cpu", max_new_tokens=3)
    result = extend_prompt(extender, "waves", language="en", seed=0)
    first_three = tokenizer.decode(answer_chain(tokenizer)[:3], skip_special_tokens=True)
    assert result.prompt == clean_extended_prompt(first_three)
    assert result.prompt != CLEAN_ANSWER


def test_local_seed_is_reproducible_and_leaves_global_rng_alone(tokenizer):
    sampler = ChatModel("tiny-random", make_text_model(tokenizer, bigram=False, seed=3), tokenizer)
    extender = LocalExtender(chat_model=sampler, max_new_tokens=24)
    state = torch.get_rng_state()
    first = extender.generate(T2V_EN, "a cat", image=None, seed=1)
    again = extender.generate(T2V_EN, "a cat", image=None, seed=1)
    other = extender.generate(T2V_EN, "a cat", image=None, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert first == again
    assert first != other


def test_local_models_are_cached_and_released(text_model_dir):
    first = LocalExtender(str(text_model_dir), device="cpu").load()
    second = LocalExtender(str(text_model_dir), device="cpu").load()
    assert second is first
    assert load_chat_model(str(text_model_dir), dtype="fp32") is not first  # other options
    assert len(local_backend.cached_models()) == 2
    model = weakref.ref(first.model)
    del first, second
    assert release_local_models(str(text_model_dir)) == 2
    gc.collect()
    assert model() is None
    assert local_backend.cached_models() == []


def test_local_missing_model_raises_or_falls_back(tmp_path, caplog):
    extender = LocalExtender(str(tmp_path / "no-such-model"), device="cpu")
    with pytest.raises(PromptExtendError, match="no folder at"):
        extend_prompt(extender, "a cat", language="en")
    with caplog.at_level(logging.WARNING, logger="wan_core.prompt_extend"):
        result = extend_prompt(extender, "a cat", language="en", on_error="fallback")
    assert result.prompt == "a cat" and not result.extended
    assert "no folder at" in result.message
    assert any("original prompt is used" in r.getMessage() for r in caplog.records)


def test_local_folder_without_chat_template_is_refused(tmp_path, tokenizer):
    folder = write_text_model(tmp_path / "base-model", tokenizer)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(PromptExtendError, match="no chat template"):
        load_chat_model(str(folder))


def test_local_text_model_refuses_an_image(text_model_dir):
    extender = LocalExtender(str(text_model_dir), device="cpu")
    with pytest.raises(ValueError, match="reads text only"):
        extend_prompt(extender, "a cat", language="en", image=Image.new("RGB", (64, 64)),
                      on_error="fallback")


# --- local back-end: image (Qwen2.5-VL) ----------------------------------------------------------

def test_local_vl_sends_the_image_and_the_chat(tokenizer, vl_chat):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 180, 3)).astype(np.uint8))
    budget = 84 * 56  # the 180x120 image is scaled to 84x56: a 4x6 grid of 14-pixel patches
    extender = LocalExtender(chat_model=vl_chat, max_image_pixels=budget)
    first = FirstCall(vl_chat.model)
    vision = FirstCall(vl_chat.model.model.visual)
    try:
        result = extend_prompt(extender, "the waves roll in", language="en", image=image, seed=3)
    finally:
        first.remove()
        vision.remove()
    assert result.prompt == CLEAN_ANSWER and result.system_prompt == I2V_EN

    grid = vision.arguments["grid_thw"]
    assert grid.tolist() == [[1, 4, 6]]
    image_tokens = int(grid.prod()) // 4  # 2x2 patches merge into one token
    expected_text = expected_chat_text(
        I2V_EN, "<|vision_start|>" + "<|image_pad|>" * image_tokens + "<|vision_end|>"
        + "the waves roll in")
    assert first.arguments["input_ids"][0].tolist() == tokenizer(expected_text)["input_ids"]
    expected_pixels = vl_chat.processor.image_processor(
        images=[fit_image(image, budget)], return_tensors="pt")["pixel_values"]
    assert torch.equal(vision.arguments["hidden_states"], expected_pixels)


def test_local_vl_with_empty_prompt_invents_motion(tokenizer, vl_chat):
    extender = LocalExtender(chat_model=vl_chat)
    first = FirstCall(vl_chat.model)
    try:
        result = extend_prompt(extender, "", language="zh", image=Image.new("RGB", (56, 56)), seed=0)
    finally:
        first.remove()
    assert result.system_prompt == I2V_EMPTY_ZH and result.prompt == CLEAN_ANSWER
    text = tokenizer.decode(first.arguments["input_ids"][0])
    assert text.endswith("<|vision_end|><|im_end|>\n<|im_start|>assistant\n")  # no text part


def test_local_vl_folder_loads_or_names_torchvision(tmp_path, tokenizer):
    folder = tmp_path / "tiny-vl"
    make_vl_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    make_vl_processor(tokenizer).image_processor.save_pretrained(folder)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(PromptExtendError, match="needs torchvision"):
            load_chat_model(str(folder))
    else:
        assert load_chat_model(str(folder)).is_vl
