"""Local back-end: a transformers chat model (Qwen2.5 Instruct for text, Qwen2.5-VL with an image).

Models load once per (model, dtype, device) and stay cached until `release_local_models`.
Generation uses the checkpoint's own generation settings (Qwen ships sampling settings) with the
request's seed, without disturbing the global random state.
"""
from __future__ import annotations

import gc
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from PIL import Image

from .core import PromptExtendError, fit_image

# The reference's short names for the Qwen checkpoints it uses.
MODEL_ALIASES = {
    "Qwen2.5_3B": "Qwen/Qwen2.5-3B-Instruct",
    "Qwen2.5_7B": "Qwen/Qwen2.5-7B-Instruct",
    "Qwen2.5_14B": "Qwen/Qwen2.5-14B-Instruct",
    "QwenVL2.5_3B": "Qwen/Qwen2.5-VL-3B-Instruct",
    "QwenVL2.5_7B": "Qwen/Qwen2.5-VL-7B-Instruct",
}
DEFAULT_TEXT_MODEL = "Qwen2.5_14B"
DEFAULT_VL_MODEL = "QwenVL2.5_7B"
DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The largest image handed to the VL processor (the reference's max_pixels: 1280 patches of 28²);
# the processor rounds the size to its patch grid.
DEFAULT_MAX_IMAGE_PIXELS = 1280 * 28 * 28
DEFAULT_MAX_NEW_TOKENS = 512


@dataclass(eq=False)
class ChatModel:
    """A loaded chat model: `processor` is the multimodal processor of a VL model, else None."""

    name: str
    model: torch.nn.Module
    tokenizer: Any
    processor: Any = None

    @property
    def is_vl(self) -> bool:
        return self.processor is not None


_cache: dict[tuple, ChatModel] = {}
_cache_lock = threading.Lock()


def resolve_model_name(name: str) -> str:
    """A local folder, or a Hugging Face id (the reference's short names are expanded)."""
    name = name.strip()
    if name in MODEL_ALIASES and not os.path.exists(name):
        return MODEL_ALIASES[name]
    return os.path.expanduser(name)


def _looks_like_path(name: str) -> bool:
    """Hugging Face ids are "org/name"; anything absolute or relative-looking is a folder."""
    return os.path.isabs(name) or name.startswith(("./", "../", ".\\", "..\\", "~"))


def _torch_dtype(dtype: Union[str, torch.dtype]):
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {list(DTYPES)} (or a torch.dtype)")
    return DTYPES[dtype]


def load_chat_model(name: str, *, dtype: Union[str, torch.dtype] = "auto",
                    device: Union[str, torch.device] = "cpu") -> ChatModel:
    """Load (or return the cached) chat model `name` — a folder or a Hugging Face id — with its
    tokenizer, and its processor when the model reads images."""
    resolved = resolve_model_name(name)
    torch_dtype = _torch_dtype(dtype)
    device = torch.device(device)
    key = (resolved, str(torch_dtype), str(device))
    with _cache_lock:
        if key not in _cache:
            _cache[key] = _load(name, resolved, torch_dtype, device)
        return _cache[key]


def _load(name: str, resolved: str, torch_dtype, device: torch.device) -> ChatModel:
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoProcessor, AutoTokenizer)

    if _looks_like_path(resolved) and not os.path.isdir(resolved):
        raise PromptExtendError(f"prompt-extension model {name!r}: no folder at {resolved}; give "
                                f"the folder of a transformers chat model, a Hugging Face id such "
                                f"as Qwen/Qwen2.5-7B-Instruct, or one of {list(MODEL_ALIASES)}")
    try:
        config = AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        raise PromptExtendError(f"prompt-extension model {name!r} could not be found ({err}); give "
                                f"a local folder or a Hugging Face id (downloading needs internet "
                                f"access), e.g. one of {list(MODEL_ALIASES)}") from err
    try:
        if getattr(config, "vision_config", None) is not None:
            try:
                processor = AutoProcessor.from_pretrained(resolved)
            except ImportError as err:
                raise PromptExtendError(
                    f"the processor of {name!r} cannot be built: {err}. Qwen2.5-VL's processor "
                    f"needs torchvision; install the torchvision build that matches your torch") from err
            model = AutoModelForImageTextToText.from_pretrained(resolved, dtype=torch_dtype)
            chat = ChatModel(name, model, processor.tokenizer, processor)
        else:
            tokenizer = AutoTokenizer.from_pretrained(resolved)
            model = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch_dtype)
            chat = ChatModel(name, model, tokenizer)
    except OSError as err:
        raise PromptExtendError(f"prompt-extension model {name!r} could not be loaded: {err}") from err
    template_owner = chat.processor if chat.is_vl else chat.tokenizer
    if getattr(template_owner, "chat_template", None) is None:
        raise PromptExtendError(f"{name!r} has no chat template; use an instruct/chat model such "
                                f"as {MODEL_ALIASES[DEFAULT_TEXT_MODEL]}")
    chat.model.to(device).eval()
    return chat


def release_local_models(name: Optional[str] = None) -> int:
    """Forget cached models (all, or those loaded as `name`) and return their memory to the
    device; returns how many were released."""
    with _cache_lock:
        keys = [k for k, chat in _cache.items() if name is None or chat.name == name
                or k[0] == resolve_model_name(name)]
        for key in keys:
            del _cache[key]
    if keys:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return len(keys)


def cached_models() -> list[tuple]:
    """(model, dtype, device) of every cached model."""
    with _cache_lock:
        return list(_cache)


class LocalExtender:
    """Extends prompts with a local chat model.

    `model`: a folder, a Hugging Face id or a short name from `MODEL_ALIASES`; None picks
    DEFAULT_VL_MODEL for requests with an image and DEFAULT_TEXT_MODEL otherwise. `chat_model`
    uses an already loaded model instead. The model loads to `device`; `place_model`, if given,
    is called with the loaded model before each generation to put it where it should run (a
    host's model manager). Generation runs where the model's weights are. `on_token`, if given,
    is called after each generated token (progress, and the host's interrupt check: an exception
    it raises stops the generation and propagates unchanged).
    """

    name = "local"

    def __init__(self, model: Optional[str] = None, *, dtype: Union[str, torch.dtype] = "auto",
                 device: Union[str, torch.device, None] = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 chat_model: Optional[ChatModel] = None,
                 place_model: Optional[Callable[[ChatModel], None]] = None,
                 on_token: Optional[Callable[[], None]] = None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        _torch_dtype(dtype)
        self.model_name = model
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.max_new_tokens = int(max_new_tokens)
        self.max_image_pixels = int(max_image_pixels)
        self.chat_model = chat_model
        self.place_model = place_model
        self.on_token = on_token

    def load(self, image: bool = False) -> ChatModel:
        """The chat model this extender uses for a request with (or without) an image."""
        if self.chat_model is not None:
            return self.chat_model
        name = self.model_name or (DEFAULT_VL_MODEL if image else DEFAULT_TEXT_MODEL)
        return load_chat_model(name, dtype=self.dtype, device=self.device)

    def generate(self, system_prompt: str, prompt: str, *, image: Optional[Image.Image],
                 seed: int) -> str:
        chat = self.load(image is not None)
        if image is not None and not chat.is_vl:
            raise ValueError(f"model {chat.name!r} reads text only; for a prompt with an image use "
                             f"a vision-language model such as {DEFAULT_VL_MODEL}, or leave the "
                             f"image out")
        inputs = self._inputs(chat, system_prompt, prompt, image)
        try:
            if self.place_model is not None:
                self.place_model(chat)
            output = self._sample(chat, inputs, seed)
        except RuntimeError as err:  # out of memory and other failures inside the model
            raise PromptExtendError(f"model {chat.name!r} failed while generating: {err}") from err
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        return chat.tokenizer.decode(new_tokens, skip_special_tokens=True)

    def _sample(self, chat: ChatModel, inputs: dict, seed: int) -> torch.Tensor:
        """`generate` on the model's device, seeded locally (the global RNG state is restored)."""
        device = next(chat.model.parameters()).device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        options = {}
        if self.on_token is not None:
            options["stopping_criteria"] = _calls_per_token(self.on_token)
        with torch.random.fork_rng(devices=rng_devices), torch.inference_mode():
            torch.manual_seed(seed)
            return chat.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **options)

    def _inputs(self, chat: ChatModel, system_prompt: str, prompt: str,
                image: Optional[Image.Image]) -> dict:
        """Token ids (and pixels) of the conversation, laid out by the model's chat template."""
        if not chat.is_vl:
            messages = [{"role": "system", "content": system_prompt},
                        {"role": "user", "content": prompt}]
            text = chat.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
            return dict(chat.tokenizer([text], return_tensors="pt"))
        user: list[dict] = []
        if image is not None:
            user.append({"type": "image"})
        if prompt:
            user.append({"type": "text", "text": prompt})
        messages = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]},
                    {"role": "user", "content": user}]
        text = chat.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        images = None if image is None else [fit_image(image, self.max_image_pixels)]
        return dict(chat.processor(text=[text], images=images, return_tensors="pt"))


def _calls_per_token(callback: Callable[[], None]):
    """Stopping criteria for `generate` that never stop it but call `callback` once per token."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class EachToken(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            callback()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([EachToken()])
