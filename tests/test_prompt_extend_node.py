"""The prompt-extension node, imported the way ComfyUI imports the pack (no ComfyUI needed).

Runs the node on both back-ends: the local one with the tiny bigram Qwen2 of
`wan_core.testing.chat`, the DashScope one against the local fake server of
`wan_core.testing.fake_dashscope`. Checks that the API key cannot reach a saved workflow, the
metadata ComfyUI writes into images and videos, the node's outputs, an error, or a log line.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import logging
import sys
import traceback
import uuid
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from wan_core.prompt_extend import PromptExtendError, cached_models, release_local_models
from wan_core.testing.chat import write_chat_model
from wan_core.testing.fake_dashscope import (IMAGE_PATH, TEXT_PATH, Reply,
                                             all_log_output, answer)

pytest.importorskip("dashscope", reason="the DashScope SDK is the 'extend' extra")

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK = "comfyui_wan22_pack"
NODE_ID = "W22PromptExtend"
KEY = f"sk-node-test-{uuid.uuid4().hex}"
CLEAN_ANSWER = "Calm waves roll onto the shore at dawn"  # the tiny model's answer, cleaned
WIDGET_TYPES = {"STRING", "INT", "FLOAT", "BOOLEAN"}


def load_pack():
    """Import the pack as ComfyUI does: its folder as a package, by path."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK]


@pytest.fixture(scope="module")
def pack():
    return load_pack()


@pytest.fixture(scope="module")
def node_class(pack):
    return pack.NODE_CLASS_MAPPINGS[NODE_ID]


@pytest.fixture
def node(node_class):
    return node_class()


@pytest.fixture
def dash_key():
    """The key the shared `dashscope_env` fixture (conftest.py) puts in DASH_API_KEY."""
    return KEY


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory) -> Path:
    return write_chat_model(tmp_path_factory.mktemp("qwen2_tiny"))


@pytest.fixture(autouse=True)
def _release_models():
    yield
    release_local_models()


def all_inputs(node_class) -> dict:
    inputs = node_class.INPUT_TYPES()
    return {**inputs["required"], **inputs.get("optional", {})}


def widget_values(node_class, values: dict) -> list:
    """What the editor stores in a saved workflow for this node: its widgets' values in order
    (a seed widget's "control after generate" choice follows its value)."""
    stored = []
    for name, spec in all_inputs(node_class).items():
        options = spec[1] if len(spec) > 1 else {}
        if isinstance(spec[0], (list, tuple)) or spec[0] in WIDGET_TYPES:
            stored.append(values.get(name, options.get("default")))
            if options.get("control_after_generate"):
                stored.append("randomize")
    return stored


def run(node, **inputs):
    values = {"prompt": "a fox", "backend": "dashscope", "model": "", "target_language": "en",
              "seed": 3, "on_error": "raise", **inputs}
    return values, node.extend(**values)


# --- identity, inputs ----------------------------------------------------------------------------

def test_node_is_registered_with_a_readable_name(pack, node_class):
    assert NODE_ID.startswith("W22") and pack.NODE_CLASS_MAPPINGS[NODE_ID] is node_class
    assert pack.NODE_DISPLAY_NAME_MAPPINGS[NODE_ID] == "Wan2.2 Prompt Extend"
    assert node_class.CATEGORY.startswith("Wan2.2/")
    assert node_class.RETURN_TYPES == ("STRING", "STRING")
    assert node_class.RETURN_NAMES == ("extended_prompt", "original_prompt")
    assert len(node_class.OUTPUT_TOOLTIPS) == 2
    assert callable(getattr(node_class, node_class.FUNCTION))


def test_inputs_and_their_tooltips(node_class):
    inputs = node_class.INPUT_TYPES()
    assert list(inputs["required"]) == ["prompt", "backend", "model", "target_language", "seed",
                                        "on_error"]
    assert inputs["required"]["backend"][0] == ["local", "dashscope"]
    assert inputs["required"]["target_language"][0] == ["zh", "en"]
    assert inputs["required"]["on_error"][0] == ["raise", "fallback"]
    assert inputs["optional"]["image"][0] == "IMAGE"
    for name, spec in all_inputs(node_class).items():
        assert len(spec) == 2 and spec[1].get("tooltip", "").strip(), f"{name} has no tooltip"


def test_no_input_can_hold_the_key(node_class, monkeypatch):
    monkeypatch.setenv("DASH_API_KEY", KEY)
    inputs = all_inputs(node_class)
    for name in inputs:
        assert not {"key", "api", "secret", "password", "auth", "credential"} & set(name.split("_"))
    strings = {name for name, spec in inputs.items() if spec[0] == "STRING"}
    assert strings == {"prompt", "model"}
    assert all(inputs[name][1]["default"] == "" for name in strings)
    assert KEY not in json.dumps(node_class.INPUT_TYPES())  # nothing is pre-filled from the env
    assert "DASH_API_KEY" in node_class.DESCRIPTION


# --- DashScope through the node ------------------------------------------------------------------

def test_dashscope_node_sends_the_first_frame_of_an_image(node, dashscope_env):
    fake = dashscope_env
    fake.script(answer([{"text": "The fox turns its head."}]))
    frames = torch.rand(2, 48, 64, 3)  # ComfyUI IMAGE: [frames, H, W, 3] in 0..1
    _, output = run(node, image=frames)
    assert output["result"] == ("The fox turns its head.", "a fox")
    assert output["ui"]["text"] == ["The fox turns its head."]
    request = fake.requests[0]
    assert request.path == IMAGE_PATH and request.body["model"] == "qwen-vl-max"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert any("image" in part for part in request.body["input"]["messages"][1]["content"])


def test_saved_workflow_and_file_metadata_never_hold_the_key(node_class, node, dashscope_env,
                                                              tmp_path):
    import av

    fake = dashscope_env
    fake.script(answer("A red fox trots through snow."))
    values, output = run(node, prompt="a fox in snow")
    assert output["result"] == ("A red fox trots through snow.", "a fox in snow")
    assert fake.requests[0].path == TEXT_PATH

    # What the editor saves, and what it sends to the server (the prompt ComfyUI embeds in files).
    workflow = {"nodes": [{"id": 1, "type": NODE_ID, "widgets_values": widget_values(node_class, values)},
                          {"id": 2, "type": "LoadImage", "widgets_values": ["fox.png", "image"]}],
                "links": [[1, 2, 0, 1, 4, "IMAGE"]]}
    api_prompt = {"1": {"class_type": NODE_ID, "inputs": {**values, "image": ["2", 0]}},
                  "2": {"class_type": "LoadImage", "inputs": {"image": "fox.png"}}}
    extra_pnginfo = {"workflow": workflow}

    # ComfyUI's SaveImage: PNG text chunks "prompt" and one per extra_pnginfo entry.
    png = tmp_path / "frame.png"
    info = PngInfo()
    info.add_text("prompt", json.dumps(api_prompt))
    for name, value in extra_pnginfo.items():
        info.add_text(name, json.dumps(value))
    Image.new("RGB", (16, 16)).save(png, pnginfo=info)
    # ComfyUI's SaveVideo: container metadata tags, the same entries.
    video = tmp_path / "clip.mp4"
    with av.open(str(video), mode="w", options={"movflags": "use_metadata_tags"}) as container:
        container.metadata["prompt"] = json.dumps(api_prompt)
        for name, value in extra_pnginfo.items():
            container.metadata[name] = json.dumps(value)
        stream = container.add_stream("mpeg4", rate=16)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for frame in [np.zeros((16, 16, 3), np.uint8)] * 2:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())

    assert json.loads(Image.open(png).text["prompt"])["1"]["inputs"]["prompt"] == "a fox in snow"
    with av.open(str(video)) as container:
        assert json.loads(container.metadata["prompt"]) == api_prompt
    saved = [json.dumps([workflow, api_prompt, output]), png.read_bytes().decode("latin-1"),
             video.read_bytes().decode("latin-1")]
    for text in saved:
        assert "a fox in snow" in text  # the files really hold the node's inputs
        assert KEY not in text


def test_node_errors_logs_and_output_never_hold_the_key(node, dashscope_env, monkeypatch, capfd):
    fake = dashscope_env
    echo = {"code": "InvalidApiKey", "message": f"Invalid API-key provided: {KEY}"}
    capfd.readouterr()
    texts: list[str] = []
    with all_log_output() as lines:
        for replies, on_error in [([answer("A fox.")], "raise"),
                                  ([Reply(401, echo)], "raise"),
                                  ([Reply(401, echo)], "fallback"),
                                  ([Reply(400, {"code": "Bad", "message": KEY})], "fallback"),
                                  ([Reply(200, f"<html>{KEY}</html>".encode())], "raise"),
                                  ([Reply(200, {"output": {"echo": KEY}})], "fallback")]:
            fake.script(*replies)
            try:
                _, output = run(node, on_error=on_error)
            except PromptExtendError as err:
                texts.append("".join(traceback.format_exception(err)))  # what ComfyUI prints
            else:
                texts.append(json.dumps(output))
        monkeypatch.delenv("DASH_API_KEY")
        with pytest.raises(PromptExtendError, match="DASH_API_KEY") as err:
            run(node)
        texts.append(str(err.value))
    out, err_out = capfd.readouterr()

    assert len(fake.requests) == 1 and fake.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    assert sum("Traceback" in text for text in texts) == 2
    assert sum("original prompt is used" in line for line in lines) == 3
    for text in [*lines, *texts, out, err_out]:
        assert KEY not in text


def test_dashscope_node_raise_or_fallback(node, dashscope_env, caplog):
    fake = dashscope_env
    fake.script(Reply(401, {"code": "InvalidApiKey", "message": "invalid"}))
    with pytest.raises(PromptExtendError, match="rejected the API key.*DASH_API_KEY"):
        run(node)
    fake.script(Reply(401, {"code": "InvalidApiKey", "message": "invalid"}))
    with caplog.at_level(logging.WARNING):
        _, output = run(node, on_error="fallback")
    assert output["result"] == ("a fox", "a fox")
    assert any("original prompt is used" in r.getMessage() for r in caplog.records)


def test_node_without_key_names_the_variable(node, dashscope_env, monkeypatch):
    monkeypatch.delenv("DASH_API_KEY")
    with pytest.raises(PromptExtendError, match="set the DASH_API_KEY environment variable"):
        run(node)
    assert dashscope_env.requests == []


# --- local back-end through the node -------------------------------------------------------------

def test_local_node_extends_and_keeps_or_releases_the_model(node, text_model_dir):
    _, output = run(node, backend="local", model=str(text_model_dir), keep_model_loaded=True)
    assert output["result"] == (CLEAN_ANSWER, "a fox")
    assert len(cached_models()) == 1
    from wan_core.prompt_extend import load_chat_model
    model = weakref.ref(load_chat_model(str(text_model_dir), device="cpu").model)

    _, output = run(node, backend="local", model=str(text_model_dir), keep_model_loaded=False)
    assert output["result"][0] == CLEAN_ANSWER
    assert cached_models() == []
    gc.collect()
    assert model() is None  # nothing of the node's keeps the released model alive


def test_local_node_stops_when_the_host_interrupts(node, text_model_dir, monkeypatch):
    host = sys.modules[f"{PACK}.nodes.host"]
    checks = []

    class Interrupted(Exception):  # ComfyUI's InterruptProcessingException is a plain Exception
        pass

    def cancel_pressed_at_second_token():
        checks.append(1)
        if len(checks) == 2:
            raise Interrupted

    monkeypatch.setattr(host, "check_interrupt", cancel_pressed_at_second_token)
    with pytest.raises(Interrupted):  # the cancel is not turned into a fallback
        run(node, backend="local", model=str(text_model_dir), on_error="fallback")
    assert len(checks) == 2


def test_local_node_refuses_an_image_for_a_text_model(node, text_model_dir):
    with pytest.raises(ValueError, match="reads text only"):
        run(node, backend="local", model=str(text_model_dir), image=torch.rand(1, 32, 32, 3))


def test_local_node_missing_model_falls_back(node, tmp_path):
    _, output = run(node, backend="local", model=str(tmp_path / "absent"), on_error="fallback")
    assert output["result"] == ("a fox", "a fox")


def test_node_rejects_an_unknown_backend(node):
    with pytest.raises(ValueError, match="backend='openai'"):
        run(node, backend="openai")
