"""What every back-end shares: the request, the answer's clean-up, images, and failure policy."""
from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np
import torch
from PIL import Image

from .system_prompts import LANGUAGES, system_prompt

logger = logging.getLogger("wan_core.prompt_extend")

ON_ERROR = ("raise", "fallback")
MAX_SEED = 2**63 - 1


class PromptExtendError(RuntimeError):
    """The back-end could not extend the prompt (model missing or failing, service refusing or
    unreachable, unusable answer). Bad arguments raise ValueError/TypeError instead."""


class Extender(Protocol):
    """A back-end: sends one system prompt + user prompt (+ image) and returns the raw answer."""

    name: str

    def generate(self, system_prompt: str, prompt: str, *, image: Optional[Image.Image],
                 seed: int) -> str: ...


@dataclass
class ExtendResult:
    prompt: str            # the extended prompt, or the original one after a fallback
    original: str
    extended: bool         # False when the original came back because the back-end failed
    seed: int
    system_prompt: str
    message: str = ""      # why it failed, when it did


def extend_prompt(extender: Extender, prompt: str, *, language: str = "zh",
                  image: Any = None, seed: int = -1, on_error: str = "raise",
                  system_prompt_override: Optional[str] = None) -> ExtendResult:
    """Extend `prompt` with `extender`.

    `image` (PIL image, HxWx3 array, or a ComfyUI IMAGE tensor whose first frame is used) selects
    the image-to-video instructions. A negative `seed` draws one. On a back-end failure
    (`PromptExtendError`) `on_error="raise"` raises it and `on_error="fallback"` logs a warning
    and returns the original prompt with `extended=False`.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r} is not one of {ON_ERROR}")
    if language not in LANGUAGES:
        raise ValueError(f"target language {language!r} is not supported; choose one of {LANGUAGES}")
    pil_image = None if image is None else to_pil_image(image)
    instructions = system_prompt_override or system_prompt(
        language, image=pil_image is not None, empty_prompt=not prompt.strip())
    if seed < 0:
        seed = random.randint(0, MAX_SEED)
    try:
        answer = clean_extended_prompt(
            extender.generate(instructions, prompt.strip(), image=pil_image, seed=seed))
    except PromptExtendError as err:
        if on_error == "raise":
            raise
        logger.warning("prompt extension with %s failed, the original prompt is used: %s",
                       extender.name, err)
        return ExtendResult(prompt, prompt, False, seed, instructions, str(err))
    return ExtendResult(answer, prompt, True, seed, instructions)


_THINKING = re.compile(r"<think>.*?(</think>|\Z)", re.DOTALL)
_QUOTES = [('"', '"'), ("'", "'"), ("“", "”"), ("「", "」"), ("『", "』")]


def clean_extended_prompt(answer: str) -> str:
    """The prompt inside a model's answer, on one line.

    Removes a reasoning block (<think>…</think>, emitted by thinking models), a first line that
    only announces the answer ("Here is the rewritten prompt:"), quotes around the whole answer,
    and line breaks (a video prompt is one paragraph). An empty result is a failure.
    """
    text = _THINKING.sub("", answer).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith((":", "：")):
        lines = lines[1:]
    text = " ".join(lines)
    for left, right in _QUOTES:
        if len(text) >= 2 and text.startswith(left) and text.endswith(right):
            text = text[len(left):-len(right)].strip()
            break
    if not text:
        raise PromptExtendError(f"the model's answer holds no prompt: {answer[:200]!r}")
    return text


def to_pil_image(image: Any) -> Image.Image:
    """An RGB PIL image from a PIL image, an HxWx3 array (uint8, or float in 0..1), or a torch
    tensor [H,W,3] / [B,H,W,3] in 0..1 (ComfyUI's IMAGE; the first frame is used)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().to("cpu", torch.float32).numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a PIL image, a numpy array or a torch tensor, "
                        f"got {type(image).__name__}")
    if image.ndim == 4:
        image = image[0]
    if image.ndim != 3 or image.shape[-1] not in (3, 4) or 0 in image.shape:
        raise ValueError(f"image must be [H, W, 3] or [B, H, W, 3] (RGB, channels last), "
                         f"got shape {list(image.shape)}")
    if image.dtype != np.uint8:
        image = (np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(image[..., :3]), "RGB")


def fit_image(image: Image.Image, max_pixels: int) -> Image.Image:
    """`image` scaled down (aspect kept) to at most `max_pixels` pixels; never scaled up."""
    width, height = image.size
    if width * height <= max_pixels:
        return image
    scale = (max_pixels / (width * height)) ** 0.5
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)
