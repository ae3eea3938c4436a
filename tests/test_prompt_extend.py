"""Prompt extension: instructions, answer clean-up, images, and the local transformers back-end.

The local back-end runs real transformers models built from configs (no downloads) by
`wan_core.testing.chat`: a tiny Qwen2 and a tiny Qwen2.5-VL whose weights make them fixed bigram
machines that answer BIGRAM_ANSWER whatever the sampling settings, so the tests know exactly what
the real `generate` call must return.
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
from wan_core.testing.chat import (BIGRAM_ANSWER, answer_chain, image_only_vl_processor,
                                   make_chat_tokenizer, tiny_qwen2, tiny_qwen2_5_vl,
                                   write_chat_model)

CLEAN_ANSWER = "Calm waves roll onto the shore at dawn"  # BIGRAM_ANSWER without quotes and spaces


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
    return make_chat_tokenizer()


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory, tokenizer) -> Path:
    return write_chat_model(tmp_path_factory.mktemp("qwen2_tiny"), tokenizer)


@pytest.fixture(scope="module")
def vl_chat(tokenizer) -> ChatModel:
    return ChatModel("tiny-qwen2.5-vl", tiny_qwen2_5_vl(tokenizer), tokenizer,
                     image_only_vl_processor(tokenizer))


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
    # the raw answer, before clean-up, is exactly what the bigram machine spells out
    assert extender.generate(T2V_EN, "waves at dawn", image=None, seed=7) == BIGRAM_ANSWER


def test_local_max_new_tokens_bounds_the_answer(tokenizer, text_model_dir):
    extender = LocalExtender(str(text_model_dir), device="cpu", max_new_tokens=3)
    result = extend_prompt(extender, "waves", language="en", seed=0)
    first_three = tokenizer.decode(answer_chain(tokenizer)[:3], skip_special_tokens=True)
    assert result.prompt == clean_extended_prompt(first_three)
    assert result.prompt != CLEAN_ANSWER


def test_local_on_token_sees_every_token_and_can_interrupt(tokenizer, text_model_dir):
    calls = []
    extender = LocalExtender(str(text_model_dir), device="cpu", on_token=lambda: calls.append(1))
    assert extend_prompt(extender, "waves", language="en", seed=0).prompt == CLEAN_ANSWER
    assert len(calls) == len(answer_chain(tokenizer))  # one per new token, <|im_end|> included

    class Interrupted(Exception):  # stands for the host's "cancel pressed" exception
        pass

    def cancel_at_third_token():
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted

    calls.clear()
    extender.on_token = cancel_at_third_token
    with pytest.raises(Interrupted):  # not swallowed by the fallback
        extend_prompt(extender, "waves", language="en", seed=0, on_error="fallback")
    assert len(calls) == 3


def test_local_seed_is_reproducible_and_leaves_global_rng_alone(tokenizer):
    sampler = ChatModel("tiny-random", tiny_qwen2(tokenizer, bigram=False, seed=3), tokenizer)
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
    folder = write_chat_model(tmp_path / "base-model", tokenizer)
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
    folder = write_chat_model(tmp_path / "tiny-vl", tokenizer, vision=True)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(PromptExtendError, match="needs torchvision"):
            load_chat_model(str(folder))
    else:
        assert load_chat_model(str(folder)).is_vl
