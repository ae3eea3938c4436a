"""DashScope back-end: Qwen through Alibaba Cloud's API, with the official `dashscope` SDK.

The key comes from the DASH_API_KEY environment variable (DASHSCOPE_API_KEY, the SDK's own name,
is accepted too) and is passed to the SDK per request, never stored in the SDK's globals, never
logged, and cut out of every error message and of the SDK's own log lines (at DEBUG the SDK logs
whole answers, which a misbehaving endpoint could fill with the key). DASH_API_URL sets the
endpoint; users of the international service set it to https://dashscope-intl.aliyuncs.com/api/v1.
"""
from __future__ import annotations

import base64
import io
import logging
import os
import threading
import time
from collections import Counter
from contextlib import contextmanager
from http import HTTPStatus
from typing import Any, Iterator, Optional

from PIL import Image

from .core import PromptExtendError, fit_image

KEY_ENV = "DASH_API_KEY"
SDK_KEY_ENV = "DASHSCOPE_API_KEY"
URL_ENV = "DASH_API_URL"
DEFAULT_URL = "https://dashscope.aliyuncs.com/api/v1"
TEXT_MODEL = "qwen-plus"
VL_MODEL = "qwen-vl-max"
# The reference sends images of at most 512x512 pixels' area.
DEFAULT_MAX_IMAGE_PIXELS = 512 * 512
# DashScope takes seeds below 2**31.
SEED_LIMIT = 2**31
MAX_RETRY_DELAY_S = 60.0
REDACTED = "***"


class DashScopeExtender:
    """Extends prompts with qwen-plus (text) or qwen-vl-max (with an image) on DashScope.

    `model` overrides both names. Failed requests are retried `retries` times when the service
    is busy or failing (HTTP 429 or 5xx), the answer does not arrive within `timeout` seconds,
    or the connection fails; the waits grow from `backoff` seconds (doubling), or follow the
    server's Retry-After. A rejected key, a refused request or an unreadable answer fails at once.
    """

    name = "dashscope"

    def __init__(self, model: Optional[str] = None, *, api_key: Optional[str] = None,
                 base_url: Optional[str] = None, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 1.0, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        if timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout}")
        if retries < 0 or backoff < 0:
            raise ValueError(f"retries and backoff must not be negative, got {retries}, {backoff}")
        self.model_name = model or None
        self._api_key = api_key or os.environ.get(KEY_ENV) or os.environ.get(SDK_KEY_ENV) or None
        self.base_url = base_url or os.environ.get(URL_ENV) or DEFAULT_URL
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_image_pixels = int(max_image_pixels)

    def __repr__(self) -> str:
        return (f"DashScopeExtender(model={self.model_name!r}, base_url={self.base_url!r}, "
                f"key={'set' if self._api_key else 'missing'})")

    def generate(self, system_prompt: str, prompt: str, *, image: Optional[Image.Image],
                 seed: int) -> str:
        sdk = _import_sdk()
        if not self._api_key:
            raise PromptExtendError(
                f"DashScope needs an API key: set the {KEY_ENV} environment variable before "
                f"starting ComfyUI (or Python); keys are never typed into a node")
        if image is None:
            model = self.model_name or TEXT_MODEL
            messages = [{"role": "system", "content": system_prompt},
                        {"role": "user", "content": prompt}]
            response = self._call(sdk.Generation.call, model, messages, seed)
            return _answer_text(response, self._redact)
        model = self.model_name or VL_MODEL
        if prompt and _sdk_would_upload(prompt):
            raise ValueError("the prompt is the path of a local file, which the DashScope SDK "
                             "would upload; write a description instead")
        user: list[dict] = [{"text": prompt}] if prompt else []
        user.append({"image": _data_url(fit_image(image, self.max_image_pixels))})
        messages = [{"role": "system", "content": [{"text": system_prompt}]},
                    {"role": "user", "content": user}]
        response = self._call(sdk.MultiModalConversation.call, model, messages, seed)
        return _answer_text(response, self._redact)

    def _call(self, call, model: str, messages: list, seed: int):
        """One request with retries; the successful response, or PromptExtendError."""
        with _SDK_LOG_REDACTION.hiding(self._api_key):
            return self._call_with_retries(call, model, messages, seed)

    def _call_with_retries(self, call, model: str, messages: list, seed: int):
        import requests  # the SDK's HTTP client

        attempts = self.retries + 1
        failure = ""
        for attempt in range(attempts):
            retry_after = 0.0
            try:
                response = call(model, messages=messages, api_key=self._api_key,
                                base_address=self.base_url, request_timeout=self.timeout,
                                seed=seed % SEED_LIMIT, result_format="message")
            except ValueError as err:  # an answer declared as JSON is not JSON
                raise PromptExtendError(
                    f"DashScope at {self.base_url} answered with something that is not JSON "
                    f"({self._redact(str(err))}); check that {URL_ENV} points at the DashScope "
                    f"API (…/api/v1)") from None
            except requests.Timeout:
                failure = f"no answer within {self.timeout:g} s"
            except requests.RequestException as err:
                failure = f"could not reach {self.base_url}: {self._redact(str(err))}"
            else:
                status = response.status_code
                if status == HTTPStatus.OK:
                    return response
                detail = self._redact(f"HTTP {status} {response.code}: {response.message}")
                if status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
                    raise PromptExtendError(
                        f"DashScope rejected the API key ({detail}); check {KEY_ENV}. Keys of the "
                        f"international service work only with {URL_ENV}="
                        f"https://dashscope-intl.aliyuncs.com/api/v1")
                if status != HTTPStatus.TOO_MANY_REQUESTS and status < 500:
                    raise PromptExtendError(f"DashScope refused the request for {model} ({detail})")
                failure = detail
                retry_after = _retry_after(response)
            if attempt + 1 < attempts:
                time.sleep(min(max(self.backoff * 2**attempt, retry_after), MAX_RETRY_DELAY_S))
        raise PromptExtendError(f"DashScope request for {model} failed after {attempts} "
                                f"attempt{'s' if attempts > 1 else ''}: {failure}")

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, REDACTED) if self._api_key else text


class _RedactingFilter(logging.Filter):
    """Replaces the keys of requests in flight with REDACTED in the records of a logger."""

    def __init__(self) -> None:
        super().__init__()
        self._keys: Counter = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def hiding(self, key: str) -> Iterator[None]:
        with self._lock:
            self._keys[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._keys[key] -= 1
                if not self._keys[key]:
                    del self._keys[key]

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            keys = list(self._keys)
        if not keys:
            return True
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        for key in keys:
            message = message.replace(key, REDACTED)
            if record.exc_text:
                record.exc_text = record.exc_text.replace(key, REDACTED)
        record.msg, record.args = message, None
        return True


_SDK_LOG_REDACTION = _RedactingFilter()
logging.getLogger("dashscope").addFilter(_SDK_LOG_REDACTION)


def _import_sdk():
    try:
        import dashscope
    except ImportError as err:
        raise PromptExtendError(
            "the DashScope back-end needs the 'dashscope' package: pip install dashscope "
            "(or the pack's 'extend' extra)") from err
    return dashscope


def _answer_text(response: Any, redact) -> str:
    """The text of the first choice; multimodal answers hold a list of {"text": …} parts."""
    try:
        content = response.output["choices"][0]["message"]["content"]
        if isinstance(content, list):
            content = "".join(part["text"] for part in content if "text" in part)
        if not isinstance(content, str):
            raise TypeError(type(content).__name__)
    except (KeyError, IndexError, TypeError) as err:
        raise PromptExtendError(f"DashScope's answer has an unexpected shape ({err!r}): "
                                f"{redact(str(response))[:300]}") from None
    return content


def _retry_after(response: Any) -> float:
    headers = {k.lower(): v for k, v in (getattr(response, "headers", None) or {}).items()}
    try:
        return max(0.0, float(headers.get("retry-after", 0)))
    except ValueError:
        return 0.0


def _data_url(image: Image.Image) -> str:
    """The image inline as a PNG data URL, so the SDK sends it in the request (no upload)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _sdk_would_upload(text: str) -> bool:
    # The SDK treats a multimodal text part that names an existing file (or a file:// URL) as
    # a file to upload to Alibaba Cloud storage.
    return text.startswith("file://") or os.path.isfile(os.path.expanduser(text))
