"""Prompt extension node: a short prompt in, the detailed prompt Wan2.2 likes out.

The DashScope key is read from the DASH_API_KEY environment variable only. It is not an input,
so it is never stored in a workflow, in the prompt ComfyUI writes into image/video metadata, or
in this node's outputs; the back-end cuts it out of every error and log line.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from wan_core.prompt_extend import (ON_ERROR, ChatModel, DashScopeExtender, LocalExtender,
                                    extend_prompt, release_local_models)
from wan_core.prompt_extend.dashscope_api import KEY_ENV, TEXT_MODEL, URL_ENV, VL_MODEL
from wan_core.prompt_extend.local import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEXT_MODEL,
                                          DEFAULT_VL_MODEL, MODEL_ALIASES)
from wan_core.prompt_extend.system_prompts import LANGUAGES

from . import host

BACKENDS = ("local", "dashscope")
MAX_SEED = 0xFFFFFFFFFFFFFFFF


# Each loaded local model is registered with the host's model manager once; the entry goes when
# wan_core's cache releases the model (nothing here refers back to the ChatModel key).
_hosted: "weakref.WeakKeyDictionary[ChatModel, host.HostedModel]" = weakref.WeakKeyDictionary()


def _place_on_compute_device(chat: ChatModel) -> None:
    """Let the host make room for the model and move it to the text-encoder device."""
    hosted = _hosted.get(chat)
    if hosted is None:
        hosted = _hosted[chat] = host.HostedModel(chat.model, "text")
    host.load_to_compute([hosted])


class W22PromptExtend:
    DESCRIPTION = (
        "Rewrites a short prompt into the detailed kind Wan2.2 was trained on, as the reference's "
        "prompt extension does: subject, scene, motion, camera and style detail for text-to-video; "
        "the motion of the picture for image-to-video (connect the start image). Runs a Qwen model "
        f"locally (transformers) or through Alibaba Cloud DashScope, whose key is read from the "
        f"{KEY_ENV} environment variable (set {URL_ENV} for the international endpoint) and is "
        "never a widget, never saved.")
    CATEGORY = "Wan2.2/text"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("extended_prompt", "original_prompt")
    OUTPUT_TOOLTIPS = ("The extended prompt (the original one if extension failed and on_error "
                       "is 'fallback').", "The prompt as given.")
    FUNCTION = "extend"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prompt": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "What the video shows, in any language. May be empty when an image "
                               "is connected: the model then invents the motion."}),
                "backend": (list(BACKENDS), {
                    "default": "local",
                    "tooltip": "local: a Qwen chat model run here with transformers. dashscope: "
                               f"Alibaba Cloud's API (needs the {KEY_ENV} environment variable "
                               "and the 'dashscope' package)."}),
                "model": ("STRING", {
                    "default": "",
                    "tooltip": "Empty picks the reference's choice: local "
                               f"{DEFAULT_TEXT_MODEL} ({DEFAULT_VL_MODEL} with an image), "
                               f"DashScope {TEXT_MODEL} ({VL_MODEL} with an image). Local also "
                               f"takes a model folder, a Hugging Face id or one of "
                               f"{', '.join(MODEL_ALIASES)}; DashScope any of its model names."}),
                "target_language": (list(LANGUAGES), {
                    "default": "en",
                    "tooltip": "Language of the extended prompt: zh (Chinese) or en (English)."}),
                "seed": ("INT", {
                    "default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                    "tooltip": "Sampling seed of the rewriting model; the same seed gives the "
                               "same extension."}),
                "on_error": (list(ON_ERROR), {
                    "default": "raise",
                    "tooltip": "When extension fails (no key, service down, model missing): "
                               "raise stops the run with the reason; fallback logs a warning "
                               "and passes the original prompt on."}),
            },
            "optional": {
                "image": ("IMAGE", {
                    "tooltip": "The start image of an image-to-video run (its first frame is "
                               "used); the prompt then describes how the picture moves."}),
                "max_new_tokens": ("INT", {
                    "default": DEFAULT_MAX_NEW_TOKENS, "min": 16, "max": 4096,
                    "tooltip": "Local back-end: the longest answer, in tokens."}),
                "keep_model_loaded": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Local back-end: keep the model in memory for the next run "
                               "(otherwise it is released after this one)."}),
            },
        }

    def extend(self, prompt: str, backend: str, model: str, target_language: str, seed: int,
               on_error: str, image: Optional[torch.Tensor] = None,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, keep_model_loaded: bool = True):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
        model = model.strip()
        if backend == "dashscope":
            extender = DashScopeExtender(model or None)
        else:
            model = model or (DEFAULT_VL_MODEL if image is not None else DEFAULT_TEXT_MODEL)
            extender = LocalExtender(model, device=host.offload_device("text"),
                                     max_new_tokens=max_new_tokens,
                                     place_model=_place_on_compute_device,
                                     on_token=host.step_callback(max_new_tokens))
        try:
            result = extend_prompt(extender, prompt, language=target_language, image=image,
                                   seed=seed, on_error=on_error)
        finally:
            if backend == "local" and not keep_model_loaded:
                release_local_models(model)
        return {"ui": {"text": [result.prompt]}, "result": (result.prompt, result.original)}


NODE_CLASS_MAPPINGS = {"W22PromptExtend": W22PromptExtend}
NODE_DISPLAY_NAME_MAPPINGS = {"W22PromptExtend": "Wan2.2 Prompt Extend"}
