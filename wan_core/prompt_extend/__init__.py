"""Prompt extension: rewrite a short prompt into the detailed kind Wan2.2 was trained on.

Two back-ends, one call:

    from wan_core.prompt_extend import LocalExtender, DashScopeExtender, extend_prompt
    result = extend_prompt(LocalExtender("Qwen2.5_7B"), "a cat surfing", language="en", seed=42)
    result.prompt      # the extended prompt (or the original one after a fallback)

`LocalExtender` runs a transformers chat model (Qwen2.5 Instruct; Qwen2.5-VL when an image is
given); `DashScopeExtender` calls Alibaba Cloud's DashScope with the key from DASH_API_KEY.
"""
from .core import (ON_ERROR, ExtendResult, Extender, PromptExtendError, clean_extended_prompt,
                   extend_prompt, fit_image, to_pil_image)
from .dashscope_api import DashScopeExtender
from .local import (MODEL_ALIASES, ChatModel, LocalExtender, cached_models, load_chat_model,
                    release_local_models)
from .system_prompts import LANGUAGES, system_prompt

__all__ = [
    "ON_ERROR", "ExtendResult", "Extender", "PromptExtendError", "clean_extended_prompt",
    "extend_prompt", "fit_image", "to_pil_image", "DashScopeExtender", "MODEL_ALIASES",
    "ChatModel", "LocalExtender", "cached_models", "load_chat_model", "release_local_models",
    "LANGUAGES", "system_prompt",
]
