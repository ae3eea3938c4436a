"""The DashScope back-end through the real `dashscope` SDK, against a local HTTP server.

`wan_core.testing.fake_dashscope.FakeDashScope` on 127.0.0.1 stands in for DashScope's HTTP API:
it records every request (path, headers, JSON body) and answers with scripted replies — good
answers, a rejected key, a busy service, server errors, malformed JSON, an answer of the wrong
shape, and a reply slower than the client's timeout. DASH_API_URL points the SDK at it, as
international users point it at their endpoint.
"""
from __future__ import annotations

import base64
import io
import logging
import socket
import sys
import traceback
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from wan_core.prompt_extend import DashScopeExtender, PromptExtendError, extend_prompt, fit_image
from wan_core.prompt_extend import dashscope_api
from wan_core.prompt_extend.dashscope_api import DEFAULT_URL, SEED_LIMIT
from wan_core.prompt_extend.system_prompts import I2V_EMPTY_EN, I2V_EN, T2V_EN, T2V_ZH
from wan_core.testing.fake_dashscope import (IMAGE_PATH, TEXT_PATH, Reply,
                                             all_log_output, answer)

pytest.importorskip("dashscope", reason="the DashScope SDK is the 'extend' extra")

KEY = f"sk-test-{uuid.uuid4().hex}"


@pytest.fixture
def dash_key():
    """The key the shared `dashscope_env` fixture (conftest.py) puts in DASH_API_KEY."""
    return KEY


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The back-off waits the back-end asks for between attempts (it still waits them)."""
    asked: list[float] = []

    def sleep(seconds: float) -> None:
        asked.append(seconds)
        time_module.sleep(seconds)

    time_module = dashscope_api.time
    monkeypatch.setattr(dashscope_api, "time", SimpleNamespace(sleep=sleep))
    return asked


def extender(**options) -> DashScopeExtender:
    return DashScopeExtender(**{"timeout": 5.0, "retries": 2, "backoff": 0.01, **options})


def random_image(width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3)).astype(np.uint8)
    return Image.fromarray(pixels)


def closed_port_url() -> str:
    """An endpoint on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/v1"


# --- request shape and good answers ------------------------------------------------------------

def test_text_request_shape_and_answer(dashscope_env):
    fake = dashscope_env
    fake.script(answer('"A red fox trots through fresh snow."\n'), answer("一只红狐狸在雪地里小跑。"))
    result = extend_prompt(extender(), "a fox in snow", language="en", seed=42)
    assert result.extended and result.prompt == "A red fox trots through fresh snow."

    request = fake.requests[0]
    assert request.path == TEXT_PATH
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.body["model"] == "qwen-plus"
    assert request.body["input"]["messages"] == [{"role": "system", "content": T2V_EN},
                                                 {"role": "user", "content": "a fox in snow"}]
    assert request.body["parameters"]["seed"] == 42
    assert request.body["parameters"]["result_format"] == "message"

    zh = extend_prompt(extender(), "雪中的狐狸", language="zh", seed=1)
    assert zh.prompt == "一只红狐狸在雪地里小跑。"
    assert fake.requests[1].body["input"]["messages"][0] == {"role": "system", "content": T2V_ZH}


def test_image_request_attaches_the_scaled_image(dashscope_env):
    fake = dashscope_env
    fake.script(answer([{"text": "The fox leaps "}, {"text": "over the fence."}]))
    image = random_image(1024, 768)
    result = extend_prompt(extender(), "the fox jumps", language="en", image=image, seed=5)
    assert result.prompt == "The fox leaps over the fence."

    request = fake.requests[0]
    assert request.path == IMAGE_PATH
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.body["model"] == "qwen-vl-max"
    system, user = request.body["input"]["messages"]
    assert system == {"role": "system", "content": [{"text": I2V_EN}]}
    assert user["role"] == "user" and user["content"][0] == {"text": "the fox jumps"}
    prefix = "data:image/png;base64,"
    assert user["content"][1]["image"].startswith(prefix)
    sent = Image.open(io.BytesIO(base64.b64decode(user["content"][1]["image"][len(prefix):])))
    expected = fit_image(image, 512 * 512)
    assert sent.size == expected.size and sent.width * sent.height <= 512 * 512
    assert np.array_equal(np.asarray(sent.convert("RGB")), np.asarray(expected))


def test_image_with_empty_prompt_sends_only_the_image(dashscope_env):
    fake = dashscope_env
    fake.script(answer([{"text": "Leaves drift down as the camera pushes in."}]))
    result = extend_prompt(extender(), "", language="en", image=random_image(64, 48), seed=0)
    assert result.system_prompt == I2V_EMPTY_EN
    system, user = fake.requests[0].body["input"]["messages"]
    assert system["content"] == [{"text": I2V_EMPTY_EN}]
    assert [list(part) for part in user["content"]] == [["image"]]


def test_model_name_and_seed_range(dashscope_env):
    fake = dashscope_env
    fake.script(answer("A fox."))
    extend_prompt(extender(model="qwen-max"), "a fox", language="en", seed=2**40 + 5)
    body = fake.requests[0].body
    assert body["model"] == "qwen-max"
    assert body["parameters"]["seed"] == (2**40 + 5) % SEED_LIMIT


def test_endpoint_comes_from_dash_api_url(monkeypatch):
    monkeypatch.delenv("DASH_API_URL", raising=False)
    assert DashScopeExtender(api_key="k").base_url == DEFAULT_URL
    monkeypatch.setenv("DASH_API_URL", "https://dashscope-intl.aliyuncs.com/api/v1")
    assert DashScopeExtender(api_key="k").base_url == "https://dashscope-intl.aliyuncs.com/api/v1"


# --- retries ---------------------------------------------------------------------------------------

def test_busy_service_then_success_waits_as_the_server_asks(dashscope_env, waits):
    fake = dashscope_env
    fake.script(Reply(429, {"code": "Throttling", "message": "Requests rate limit exceeded"},
                      headers={"Retry-After": "0.3"}),
                answer("A fox runs."))
    result = extend_prompt(extender(backoff=0.01), "a fox", language="en")
    assert result.prompt == "A fox runs."
    assert len(fake.requests) == 2
    assert fake.requests[0].body == fake.requests[1].body  # the same request again
    assert waits == [0.3]  # Retry-After wins over the shorter back-off


def test_server_errors_then_success_back_off_doubling(dashscope_env, waits):
    fake = dashscope_env
    fake.script(Reply(500, {"code": "InternalError", "message": "oops"}),
                Reply(502, b"<html>Bad Gateway</html>", headers={"Content-Type": "text/html"}),
                answer("A fox runs."))
    result = extend_prompt(extender(retries=2, backoff=0.01), "a fox", language="en")
    assert result.prompt == "A fox runs." and result.extended
    assert len(fake.requests) == 3
    assert waits == [0.01, 0.02]


def test_server_errors_exhaust_the_retries(dashscope_env, waits):
    fake = dashscope_env
    fake.script(*[Reply(503, {"code": "ServiceUnavailable", "message": "try later"})] * 3)
    with pytest.raises(PromptExtendError, match=r"failed after 3 attempts: HTTP 503 ServiceUnavailable"):
        extend_prompt(extender(retries=2), "a fox", language="en")
    assert len(fake.requests) == 3
    assert len(waits) == 2  # no wait after the last attempt


def test_slow_answer_then_success(dashscope_env):
    fake = dashscope_env
    fake.script(Reply(200, {"output": {}}, delay_s=1.0), answer("A fox runs."))
    result = extend_prompt(extender(timeout=0.2, retries=1), "a fox", language="en")
    assert result.prompt == "A fox runs."
    assert len(fake.requests) == 2


def test_slow_answer_times_out_after_the_retries(dashscope_env):
    fake = dashscope_env
    # Had the client waited, the (empty) answer would fail as "unexpected shape" instead.
    fake.script(*[Reply(200, {"output": {}}, delay_s=1.0)] * 2)
    with pytest.raises(PromptExtendError, match=r"failed after 2 attempts: no answer within 0.2 s"):
        extend_prompt(extender(timeout=0.2, retries=1), "a fox", language="en")
    assert len(fake.requests) == 2


def test_unreachable_endpoint_is_named(monkeypatch):
    url = closed_port_url()
    monkeypatch.setenv("DASH_API_KEY", KEY)
    monkeypatch.setenv("DASH_API_URL", url)
    with pytest.raises(PromptExtendError, match=f"failed after 2 attempts: could not reach {url}"):
        extend_prompt(extender(retries=1), "a fox", language="en")


# --- failures that are not retried -----------------------------------------------------------------

@pytest.mark.parametrize("status", [401, 403])
def test_rejected_key_fails_at_once_and_is_never_echoed(dashscope_env, status):
    fake = dashscope_env
    fake.script(Reply(status, {"code": "InvalidApiKey",
                               "message": f"Invalid API-key provided: {KEY}"}))
    with pytest.raises(PromptExtendError, match="rejected the API key") as err:
        extend_prompt(extender(), "a fox", language="en")
    assert "DASH_API_KEY" in str(err.value) and "InvalidApiKey" in str(err.value)
    assert KEY not in str(err.value) and "***" in str(err.value)
    assert len(fake.requests) == 1


def test_refused_request_is_not_retried(dashscope_env):
    fake = dashscope_env
    fake.script(Reply(400, {"code": "InvalidParameter", "message": "model not found"}))
    with pytest.raises(PromptExtendError, match="refused the request for qwen-plus.*InvalidParameter"):
        extend_prompt(extender(), "a fox", language="en")
    assert len(fake.requests) == 1


def test_malformed_json_is_reported(dashscope_env):
    fake = dashscope_env
    fake.script(Reply(200, b'{"output": {"choices": [oops'))
    with pytest.raises(PromptExtendError, match="not JSON.*DASH_API_URL"):
        extend_prompt(extender(), "a fox", language="en")
    assert len(fake.requests) == 1


def test_answer_of_the_wrong_shape_is_reported(dashscope_env):
    fake = dashscope_env
    fake.script(Reply(200, {"output": {"choices": []}, "request_id": "r"}))
    with pytest.raises(PromptExtendError, match="unexpected shape"):
        extend_prompt(extender(), "a fox", language="en")


def test_empty_answer_is_a_failure(dashscope_env):
    fake = dashscope_env
    fake.script(answer('  ""  '))
    with pytest.raises(PromptExtendError, match="holds no prompt"):
        extend_prompt(extender(), "a fox", language="en")


def test_missing_key_is_named_and_nothing_is_sent(dashscope_env, monkeypatch):
    fake = dashscope_env
    monkeypatch.delenv("DASH_API_KEY")
    with pytest.raises(PromptExtendError, match="set the DASH_API_KEY environment variable"):
        extend_prompt(extender(), "a fox", language="en")
    assert fake.requests == []


def test_missing_sdk_names_the_package(dashscope_env, monkeypatch):
    monkeypatch.setitem(sys.modules, "dashscope", None)  # `import dashscope` now fails
    with pytest.raises(PromptExtendError, match="pip install dashscope"):
        extend_prompt(extender(), "a fox", language="en")


def test_local_file_named_as_prompt_is_never_uploaded(dashscope_env, tmp_path):
    fake = dashscope_env
    secret = tmp_path / "notes.txt"
    secret.write_text("private")
    with pytest.raises(ValueError, match="path of a local file"):
        extend_prompt(extender(), str(secret), language="en", image=random_image(32, 32))
    assert fake.requests == []


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="timeout must be positive"):
        DashScopeExtender(timeout=0)
    with pytest.raises(ValueError, match="retries and backoff"):
        DashScopeExtender(retries=-1)


# --- the caller's choice on failure, and the key ----------------------------------------------------

def test_fallback_returns_the_original_with_a_warning(dashscope_env, caplog):
    fake = dashscope_env
    fake.script(Reply(401, {"code": "InvalidApiKey", "message": f"bad key {KEY}"}))
    with caplog.at_level(logging.WARNING, logger="wan_core.prompt_extend"):
        result = extend_prompt(extender(), "a fox", language="en", on_error="fallback")
    assert result.prompt == "a fox" and result.original == "a fox" and not result.extended
    assert "rejected the API key" in result.message and KEY not in result.message
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("original prompt is used" in w and "rejected the API key" in w for w in warnings)


# Every path a request can take, and whether it ends in failure; the server echoes the key
# wherever an answer can carry it.
KEY_SCENARIOS = {
    "text answer": ([answer("A fox.")], False),
    "image answer": ([answer([{"text": "The fox turns."}])], False),
    "rejected key": ([Reply(401, {"code": "InvalidApiKey", "message": f"key {KEY} is invalid"})],
                     True),
    "busy then answer": ([Reply(429, {"code": "Throttling", "message": KEY}), answer("A fox.")],
                         False),
    "server error then answer": ([Reply(500, {"code": "InternalError", "message": KEY}),
                                  answer("A fox.")], False),
    "server errors": ([Reply(503, {"code": "Busy", "message": KEY})] * 2, True),
    "refused": ([Reply(400, {"code": "InvalidParameter", "message": KEY})], True),
    "malformed JSON": ([Reply(200, f"not json {KEY}".encode())], True),
    "wrong shape": ([Reply(200, {"output": {"echo": KEY}})], True),
    "slow": ([Reply(200, {}, delay_s=0.5)] * 2, True),
}


def test_key_reaches_no_log_line_error_traceback_output_or_repr(dashscope_env, capfd):
    fake = dashscope_env
    capfd.readouterr()
    texts: list[str] = []
    with all_log_output() as lines:
        for name, (replies, fails) in KEY_SCENARIOS.items():
            image = random_image(32, 32) if name == "image answer" else None
            for on_error in ("raise", "fallback"):
                fake.script(*replies)
                try:
                    result = extend_prompt(extender(timeout=0.2, retries=1), "a fox", language="en",
                                           image=image, on_error=on_error)
                except PromptExtendError as err:
                    assert fails and on_error == "raise", name
                    # what a host (ComfyUI) prints when the node fails, causes included
                    texts.append("".join(traceback.format_exception(err)))
                else:
                    assert result.extended != fails, name
                    texts.append(repr(result))
                assert fake.requests and all(r.headers["Authorization"] == f"Bearer {KEY}"
                                             for r in fake.requests), name
        texts.append(repr(extender()))
    out, err = capfd.readouterr()

    assert any(line.startswith("dashscope DEBUG") for line in lines)  # the SDK's own debug lines
    fallbacks = [line for line in lines if "original prompt is used" in line]
    assert len(fallbacks) == sum(fails for _, fails in KEY_SCENARIOS.values())
    for text in [*lines, *texts, out, err]:
        assert KEY not in text
