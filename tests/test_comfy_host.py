"""The pack inside a real ComfyUI: server API, example workflows, queueing, interrupt, editor.

Needs a ComfyUI checkout in COMFYUI_PATH and the Python of its environment (COMFYUI_PYTHON, or
$COMFYUI_PATH/../venv/bin/python) with the pack's dependencies installed; the graph-editor tests
also need Chromium (/usr/bin/chromium) and playwright in that Python. Without them every test
here skips and says why. COMFYUI_FRONTEND_ROOT, when set, is the static folder of another
comfyui-frontend-package (e.g. the newest one installed with `pip install --target`), passed
as --front-end-root. The server runs with --cpu on 127.0.0.1 and a free port; its models,
inputs, outputs and the pack's link in custom_nodes live in a temporary folder. The editor
tests run in both node renderings (the classic canvas and Vue nodes, "Nodes 2.0").
"""
from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from wan_core.testing import write_audio_encoder_checkpoint, write_dit_checkpoint
from siblings import sibling

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_LINK_NAME = "comfyui-wan22"
SERVER_START_TIMEOUT_S = 180
PROMPT_TIMEOUT_S = 300
CHROMIUM = Path("/usr/bin/chromium")


workflows = sibling("test_workflows")


def _comfy_paths() -> tuple[Path, Path]:
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        pytest.skip("COMFYUI_PATH is not set: these tests need a ComfyUI checkout "
                    "(see shared/docs/comfy-host.md); set COMFYUI_PATH (and COMFYUI_PYTHON) to run them")
    root = Path(root)
    if not (root / "main.py").is_file():
        pytest.skip(f"COMFYUI_PATH={root} has no main.py; point it at a ComfyUI checkout")
    python = Path(os.environ.get("COMFYUI_PYTHON") or root.parent / "venv" / "bin" / "python")
    if not python.exists():
        pytest.skip(f"no Python for ComfyUI at {python}; set COMFYUI_PYTHON to the interpreter of "
                    f"ComfyUI's environment")
    return root, python


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running ComfyUI: HTTP helpers over urllib (no extra client libraries)."""

    def __init__(self, url: str, process: subprocess.Popen, base: Path, log: Path, python: Path):
        self.url, self.process, self.base, self.log, self.python = url, process, base, log, python
        self.client_id = uuid.uuid4().hex

    def request(self, method: str, path: str, body=None) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def get(self, path: str):
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path} answered {status}: {body}"
        return body

    def queue(self, prompt: dict) -> str:
        status, body = self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        assert status == 200, f"/prompt refused the prompt ({status}): {json.dumps(body)[:2000]}"
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = PROMPT_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            assert self.process.poll() is None, f"ComfyUI exited:\n{self.log_tail()}"
            time.sleep(0.2)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


nodes_tests = sibling("test_nodes")

# Small enough for a 2-core CPU: the sizes and steps the tests put into the example workflows,
# and the start image (written into the server's input folder) for LoadImage.
TINY_RUN = {"width": 64, "height": 64, "length": 5, "steps": 3, "image": nodes_tests.START_IMAGE}
# S2V: one clip of length + 3 frames (the first clip drops 3), so its video has TINY_RUN's length too.
TINY_S2V_RUN = {"num_clips": 1, "frames_per_clip": TINY_RUN["length"] + 3}
PREVIEW_EVENTS = (1, 4)  # ComfyUI's binary websocket events PREVIEW_IMAGE and PREVIEW_IMAGE_WITH_METADATA
EXAMPLE_IMAGE = "example.png"  # ComfyUI ships input/example.png; the i2v workflow's LoadImage uses it
EXAMPLE_AUDIO = "example.wav"  # the S2V workflows' LoadAudio
EXAMPLE_POSE_VIDEO = "example.mp4"  # s2v_14B_pose's LoadVideo
# The S2V files the example workflows name, written beside test_nodes' tiny models.
S2V_MODEL = ("diffusion_models", "wan2.2_s2v_14B_fp8_scaled.safetensors")
AUDIO_ENCODER = ("audio_encoders", "wav2vec2_large_english_fp16.safetensors")
MODEL_FOLDERS = (*nodes_tests.MODEL_FOLDERS, AUDIO_ENCODER[0])


def _write_tiny_s2v_models(root: Path) -> None:
    write_dit_checkpoint(root.joinpath(*S2V_MODEL), "s2v", "comfy_fp8_scaled", dtype=torch.bfloat16, seed=21)
    write_audio_encoder_checkpoint(root.joinpath(*AUDIO_ENCODER), "comfy", seed=22)


def _write_speech(path: Path, seconds: float = 1.0, rate: int = 16000) -> None:
    """A voiced tone with a syllable rhythm, 16-bit mono WAV (the standard library writes it)."""
    import wave

    t = np.arange(int(seconds * rate)) / rate
    voice = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((voice * 32767).astype("<i2").tobytes())


def _write_pose_video(path: Path, frames: int = 8, size: int = 64, fps: int = 16) -> None:
    """A moving bright stick on black, like a rendered pose, as an MPEG-4 video."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            picture = np.zeros((size, size, 3), np.uint8)
            picture[8:56, 20 + 2 * i:26 + 2 * i] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root, python = _comfy_paths()
    base = tmp_path_factory.mktemp("comfyui")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_LINK_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
    models = base / "tiny_models"
    nodes_tests.write_tiny_models(models)
    _write_tiny_s2v_models(models)
    config = base / "extra_model_paths.yaml"
    config.write_text("wan22_tests:\n"
                      f"  base_path: {models}\n"
                      + "".join(f"  {kind}: {kind}\n" for kind in MODEL_FOLDERS))
    (base / "input").mkdir()
    for image in (nodes_tests.START_IMAGE, EXAMPLE_IMAGE):  # the i2v workflow's LoadImage names the latter
        nodes_tests.write_start_image(base / "input" / image)
    _write_speech(base / "input" / EXAMPLE_AUDIO)
    _write_pose_video(base / "input" / EXAMPLE_POSE_VIDEO)
    port = _free_port()
    log = base / "comfyui.log"
    command = [str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--extra-model-paths-config", str(config),
               "--database-url", "sqlite:///:memory:", "--disable-auto-launch", "--preview-method", "auto"]
    if os.environ.get("COMFYUI_FRONTEND_ROOT"):
        command += ["--front-end-root", os.environ["COMFYUI_FRONTEND_ROOT"]]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=root, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", process, base, log, python)
    srv.models = models
    started = time.monotonic()
    try:
        while True:
            assert process.poll() is None, f"ComfyUI exited while starting:\n{srv.log_tail()}"
            assert time.monotonic() - started < SERVER_START_TIMEOUT_S, \
                f"ComfyUI did not answer in {SERVER_START_TIMEOUT_S} s:\n{srv.log_tail()}"
            try:
                if srv.request("GET", "/")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "unknown"
        print(f"ComfyUI {commit} answered after {time.monotonic() - started:.1f} s")
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


@pytest.fixture(scope="module")
def output_dir() -> Path:
    """Where screenshots are kept (git-ignored): tests/output/comfy_host, or $WAN22_TEST_OUTPUT."""
    folder = Path(os.environ.get("WAN22_TEST_OUTPUT", REPO_ROOT / "tests" / "output" / "comfy_host"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _api_prompt(name: str, object_info: dict, **overrides) -> dict:
    """The example workflow `name` in API format, shrunk to TINY_RUN plus `overrides`."""
    inputs = {cls: {**info["input"], "input_order": info.get("input_order")} for cls, info in object_info.items()}
    prompt = workflows.ui_to_api(workflows.load_workflow(name), inputs)
    values = {**TINY_RUN, **overrides}
    for node in prompt.values():
        for key in node["inputs"]:
            if key in values and not isinstance(node["inputs"][key], list):
                node["inputs"][key] = values[key]
    return prompt


def _node_of(prompt: dict, class_type: str) -> str:
    return next(i for i, n in prompt.items() if n["class_type"] == class_type)


def _saved_video(server: Server, entry: dict) -> Path:
    for output in entry["outputs"].values():
        for item in output.get("images", []) + output.get("videos", []):
            if item.get("filename", "").endswith((".mp4", ".webm", ".mov")):
                return server.base / "output" / item.get("subfolder", "") / item["filename"]
    raise AssertionError(f"no saved video in the outputs: {entry['outputs']}")


def test_server_loaded_the_pack(server):
    """The pack's line in the log's "Import times for custom nodes" is there and not marked
    "(IMPORT FAILED)". ComfyUI also lists its own extras that failed ("IMPORT FAILED:
    nodes_audio.py" on a host without torchaudio): those are the host's, not the pack's."""
    lines = [line for line in server.log_tail(200_000).splitlines()
             if line.rstrip().endswith(f"custom_nodes/{PACK_LINK_NAME}")]
    assert lines and not any("IMPORT FAILED" in line for line in lines), server.log_tail()


def test_object_info_lists_every_node_with_its_types(object_info):
    pack = workflows.load_pack()
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert name in object_info, f"{name} missing from /object_info"
        info = object_info[name]
        assert info["output"] == list(cls.RETURN_TYPES)
        assert info["display_name"] == pack.NODE_DISPLAY_NAME_MAPPINGS[name]
        assert info["category"].startswith("Wan2.2/")
        local = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            served = info["input"].get(section, {})
            assert list(served) == list(local.get(section, {})), f"{name} {section} inputs differ"
            for input_name, spec in local.get(section, {}).items():
                if isinstance(spec[0], (list, tuple)):  # model lists: the server's own folders
                    assert isinstance(served[input_name][0], list)
                else:
                    assert served[input_name][0] == spec[0], f"{name}.{input_name}"


def test_core_nodes_are_declared_as_the_offline_tests_assume(object_info):
    """test_workflows.py checks the workflows against CORE_NODE_INPUTS; this host must declare
    those inputs, in that order and of those kinds, and the outputs the workflows link. Newer
    hosts may add outputs and optional inputs with defaults (CreateVideo's bit_depth), and turn
    a choice into a dynamic combo (SaveVideo's format); the converter handles both."""
    for name, sections in workflows.CORE_NODE_INPUTS.items():
        if name in workflows.AUDIO_CORE_NODES and name not in object_info:
            continue  # a host without torchaudio has no audio nodes (the S2V workflows need one)
        served = object_info[name]
        expected_outputs = workflows.CORE_OUTPUTS[name]
        assert served["output"][:len(expected_outputs)] == expected_outputs, name
        for section, specs in sections.items():
            served_specs = served["input"].get(section, {})
            nested = {n for spec in served_specs.values() if workflows.input_kind(spec) == workflows.DYNAMIC_COMBO
                      for option in spec[1].get("options", []) for part in option.get("inputs", {}).values()
                      for n in part}  # e.g. SaveVideo's codec, now chosen inside format
            expected = [n for n in specs if n in served_specs or n not in nested]
            known = [n for n in served_specs if n in specs]
            assert known == expected, f"{name} {section}: {list(served_specs)}"
            for extra in set(served_specs) - set(specs):
                assert section == "optional", f"{name}: new required input {extra}"
                if workflows.is_widget(served_specs[extra]) and not served_specs[extra][1].get("hidden"):
                    workflows.default_value(served_specs[extra])  # the converter can fill it
            for input_name, spec in specs.items():
                if input_name not in served_specs:
                    continue  # nested in a dynamic combo (above)
                kind = served_specs[input_name][0]
                if isinstance(spec[0], list):
                    assert kind in ("COMBO", workflows.DYNAMIC_COMBO) or isinstance(kind, list), f"{name}.{input_name}"
                else:
                    assert kind == spec[0], f"{name}.{input_name}"


def test_example_workflows_are_listed_as_the_packs_templates(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates.get(PACK_LINK_NAME, [])) == sorted(n.removesuffix(".json") for n in workflows.ALL_WORKFLOWS)
    for name in workflows.ALL_WORKFLOWS:  # the template browser's card picture, where the editor asks for it
        thumbnail = name.removesuffix(".json") + workflows.THUMBNAIL_SUFFIX
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK_LINK_NAME}/{thumbnail}") as resp:
            assert resp.status == 200 and resp.read(3) == b"\xff\xd8\xff", thumbnail


def _skip_without_core_nodes(server: Server, object_info: dict, name: str) -> None:
    """Skip, saying why, where this host did not load a core node the workflow uses (a host
    without a working torchaudio has no audio nodes: comfy_extras/nodes_audio.py imports it)."""
    used = {node["type"] for node in workflows.load_workflow(name)["nodes"]}
    missing = sorted(used & workflows.AUDIO_CORE_NODES - set(object_info))
    if missing:
        said = [line.strip() for line in server.log_tail(200_000).splitlines()
                if "Cannot import" in line and "nodes_audio.py" in line]
        pytest.skip(f"{name}: this ComfyUI did not load its core node(s) {missing}, which its "
                    f"comfy_extras/nodes_audio.py defines and which imports torchaudio; the server said: "
                    f"{said[-1] if said else 'nothing about nodes_audio.py'}")


@pytest.mark.parametrize("name", workflows.ALL_WORKFLOWS)
def test_example_workflow_runs_and_saves_its_video(server, object_info, name):
    import av

    _skip_without_core_nodes(server, object_info, name)
    prompt = _api_prompt(name, object_info, **(TINY_S2V_RUN if name in workflows.S2V_WORKFLOWS else {}))
    started = time.monotonic()
    entry = server.wait(server.queue(prompt))
    seconds = time.monotonic() - started
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:4000]
    video = _saved_video(server, entry)
    with av.open(str(video)) as container:
        frames = sum(1 for _ in container.decode(video=0))
        stream = container.streams.video[0]
        size = (stream.codec_context.width, stream.codec_context.height)
        has_sound = bool(container.streams.audio)
    assert frames == TINY_RUN["length"]
    assert size == (TINY_RUN["width"], TINY_RUN["height"])
    assert has_sound == (name in workflows.S2V_WORKFLOWS)  # S2V's video carries the speech
    print(f"{name}: {seconds:.1f} s, {frames} frames {size[0]}x{size[1]} -> {video.name}")


def test_five_prompts_queued_at_once_all_finish(server, object_info):
    base = _api_prompt("t2v_A14B.json", object_info)
    sampler = _node_of(base, "W22MoESampler")
    ids = []
    started = time.monotonic()
    for seed in range(5):
        prompt = json.loads(json.dumps(base))
        prompt[sampler]["inputs"]["seed"] = 1000 + seed  # a new seed each: nothing served from cache
        ids.append(server.queue(prompt))
    entries = [server.wait(i) for i in ids]
    seconds = time.monotonic() - started
    assert [e["status"]["status_str"] for e in entries] == ["success"] * 5
    videos = {_saved_video(server, e) for e in entries}
    assert len(videos) == 5 and all(v.is_file() for v in videos)
    print(f"5 queued t2v prompts finished in {seconds:.1f} s")


def test_interrupt_during_sampling_then_the_next_prompt_succeeds(server, object_info):
    websocket = pytest.importorskip("websocket", reason="needs websocket-client to watch the progress")
    prompt = _api_prompt("t2v_A14B.json", object_info, steps=400, seed=77)
    sampler = _node_of(prompt, "W22MoESampler")
    ws = websocket.create_connection(server.url.replace("http", "ws", 1) + f"/ws?clientId={server.client_id}",
                                     timeout=120)
    try:
        prompt_id = server.queue(prompt)
        while True:  # wait until the sampler has run a couple of steps
            message = ws.recv()
            if isinstance(message, str):
                event = json.loads(message)
                data = event.get("data", {})
                assert event["type"] != "execution_error", message
                if event["type"] == "progress" and data.get("node") == sampler and data["value"] >= 2:
                    break
    finally:
        ws.close()
    status, _ = server.request("POST", "/interrupt", {})
    assert status == 200
    entry = server.wait(prompt_id)
    events = {kind: data for kind, data in entry["status"]["messages"]}
    assert "execution_interrupted" in events, entry["status"]
    assert events["execution_interrupted"]["node_id"] == sampler
    assert entry["status"]["status_str"] == "error"

    follow_up = _api_prompt("t2v_A14B.json", object_info, seed=78)
    assert server.wait(server.queue(follow_up))["status"]["status_str"] == "success"


def test_the_sampler_sends_a_preview_per_step(server, object_info):
    """With the host's previews on (--preview-method auto), each sampling step sends one JPEG
    preview of the denoised estimate over the websocket, as ComfyUI's own samplers do."""
    websocket = pytest.importorskip("websocket", reason="needs websocket-client to watch the previews")
    prompt = _api_prompt("t2v_A14B.json", object_info, seed=4242)
    sampler = _node_of(prompt, "W22MoESampler")
    ws = websocket.create_connection(server.url.replace("http", "ws", 1) + f"/ws?clientId={server.client_id}",
                                     timeout=120)
    previews, progress, running = [], [], None
    try:
        prompt_id = server.queue(prompt)
        while True:
            message = ws.recv()
            if isinstance(message, bytes):
                if running == sampler and int.from_bytes(message[:4], "big") in PREVIEW_EVENTS:
                    previews.append(message)
                continue
            event = json.loads(message)
            data = event.get("data", {})
            assert event["type"] != "execution_error", message
            if event["type"] == "executing" and data.get("prompt_id") == prompt_id:
                running = data.get("node")
                if running is None:
                    break
            if event["type"] == "progress" and data.get("node") == sampler:
                progress.append(data["value"])
    finally:
        ws.close()
    assert progress[-TINY_RUN["steps"]:] == list(range(1, TINY_RUN["steps"] + 1)), progress
    assert len(previews) == TINY_RUN["steps"], len(previews)
    assert all(b"\xff\xd8\xff" in frame[:400] for frame in previews)  # JPEG pictures


def test_invalid_prompt_returns_node_errors_naming_the_input(server, object_info):
    prompt = _api_prompt("t2v_A14B.json", object_info)
    loader = _node_of(prompt, "W22ModelLoader")
    prompt[loader]["inputs"]["model_name"] = "no_such_model.safetensors"
    status, body = server.request("POST", "/prompt", {"prompt": prompt, "client_id": server.client_id})
    assert status == 400
    errors = body["node_errors"][loader]["errors"]
    assert any(e["extra_info"].get("input_name") == "model_name" for e in errors), errors


def test_free_memory_request_releases_our_models(server, object_info):
    """'Free model and node cache' drops ComfyUI's node outputs; our cache must let go too."""
    entry = server.wait(server.queue(_api_prompt("t2v_A14B.json", object_info, seed=5)))
    assert entry["status"]["status_str"] == "success"
    assert server.get("/wan22/cache")["models"], "the run left no model in the cache"
    deadline = time.monotonic() + 30
    while True:
        # The prompt worker applies the request between prompts. A request that arrives while it
        # is between reading the flags and waiting for the next prompt is only seen at the next
        # prompt (ComfyUI's queue wakes its waiter, but nobody waits yet), so it is sent again.
        status, _ = server.request("POST", "/free", {"unload_models": True, "free_memory": True})
        assert status == 200
        time.sleep(2)
        if not server.get("/wan22/cache")["models"] or time.monotonic() > deadline:
            break
    assert server.get("/wan22/cache")["models"] == []


def _server_workers(server: Server) -> list[int]:
    """Pids of the multi-GPU worker processes the server started (from the process table)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except (OSError, NotADirectoryError):
            continue
        if b"wan_core.parallel.workers" in cmdline and f"PPid:\t{server.process.pid}\n" in status:
            found.append(int(entry.name))
    return sorted(found)


def test_multi_gpu_node_samples_on_persistent_workers_that_unload_stops(server, object_info):
    """Wan2.2 Multi-GPU with two CPU workers (gloo): prompts run on the same two processes, an
    interrupt stops the workers and leaves them up, "Unload models" ends them, and the server
    runs prompts after that (ComfyUI's prompt worker unloads the claim while it walks its list
    of loaded models: the claim must not take itself off that list)."""
    websocket = pytest.importorskip("websocket", reason="needs websocket-client to watch the progress")

    def on_workers(**overrides) -> tuple[dict, str]:
        prompt = _api_prompt("t2v_A14B.json", object_info, **overrides)
        sampler = _node_of(prompt, "W22MoESampler")
        prompt["900"] = {"class_type": "W22MultiGPU", "inputs": {"gpus": "cpu,cpu", "cfg_parallel": False,
                                                                 "dit_fsdp": False}}
        prompt[sampler]["inputs"]["parallel"] = ["900", 0]
        return prompt, sampler

    entry = server.wait(server.queue(on_workers(seed=91)[0]))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:4000]
    workers = _server_workers(server)
    assert len(workers) == 2
    assert server.wait(server.queue(on_workers(seed=92)[0]))["status"]["status_str"] == "success"
    assert _server_workers(server) == workers  # the same processes: models loaded once

    prompt, sampler = on_workers(seed=93, steps=400)
    ws = websocket.create_connection(server.url.replace("http", "ws", 1) + f"/ws?clientId={server.client_id}",
                                     timeout=120)
    try:
        prompt_id = server.queue(prompt)
        while True:  # progress from the workers reaches the node's bar
            message = ws.recv()
            if isinstance(message, str):
                event = json.loads(message)
                assert event["type"] != "execution_error", message
                if event["type"] == "progress" and event["data"].get("node") == sampler and event["data"]["value"] >= 2:
                    break
    finally:
        ws.close()
    assert server.request("POST", "/interrupt", {})[0] == 200
    events = dict(server.wait(prompt_id)["status"]["messages"])
    assert events["execution_interrupted"]["node_id"] == sampler
    assert _server_workers(server) == workers

    assert server.request("POST", "/free", {"unload_models": True})[0] == 200
    deadline = time.monotonic() + 60
    while _server_workers(server) and time.monotonic() < deadline:
        time.sleep(0.5)  # the prompt worker applies the request between prompts
    assert _server_workers(server) == []
    follow_up = server.wait(server.queue(_api_prompt("t2v_A14B.json", object_info, seed=94)), timeout=120)
    assert follow_up["status"]["status_str"] == "success", json.dumps(follow_up["status"], indent=1)[:4000]


# Runs in ComfyUI's Python (which has playwright): opens the editor in one node rendering
# ("classic" canvas or "vue" nodes), loads each workflow, reads what the pack's extension shows
# (`wan22Lines`, and whether its widget was drawn), sets the latent's width to 1000 and its
# length to 80 frames and reads again. Then the error and retry paths: a loader names a file
# that is not there; the file is added (the lookup is retried by itself), removed again and
# Refresh pressed. Screenshots of each state.
EDITOR_SCRIPT = r"""
import json, shutil, sys
from pathlib import Path
from playwright.sync_api import sync_playwright
url, workflow_paths, shot_dir, rendering, models_dir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
NODES_JS = '''() => window.app.graph._nodes.map(n => {
    const w = (n.widgets || []).find(w => w.name === "wan22_info");
    let drawn = false;
    if (w) {  // draw through what the renderer set up: LiteGraph's canvas or the Vue node's widget canvas
        const draw = w.draw; w.draw = function () { drawn = true; return draw.apply(this, arguments); };
        if (w.triggerDraw) w.triggerDraw(); else window.app.canvas.draw(true, true);
        w.draw = draw;
    }
    let fits = true;
    if (w && w.wrapped) {
        const ctx = document.createElement("canvas").getContext("2d"); ctx.font = "12px sans-serif";
        fits = w.wrapped.every(([, t]) => ctx.measureText(t).width <= n.size[0] - 20 + 0.5);
    }
    // the area the node covers on screen, title included: its element with Vue nodes, else LiteGraph's bounds
    const element = document.querySelector(`[data-node-id="${n.id}"]`);
    let box = Array.from(n.getBounding());
    if (element) { const r = element.getBoundingClientRect(); const s = window.app.canvas.ds.scale;
                   box = [r.x / s, r.y / s, r.width / s, r.height / s]; }
    return {type: n.type, id: n.id, registered: n.type in LiteGraph.registered_node_types, has_errors: !!n.has_errors, box,
            lines: n.wan22Lines || null, has_widget: !!w, drawn, fits, vue_mounted: !!(w && w.triggerDraw),
            tall_enough: n.size[1] + 0.5 >= n.computeSize()[1]};
})'''
SET_SIZE_JS = '''([width, length]) => { const node = window.app.graph._nodes.find(n => n.type === "W22VideoLatent");
    if (!node) return;  // S2V sizes its video in its own node
    node.widgets.find(w => w.name === "width").value = width;
    node.widgets.find(w => w.name === "length").value = length; window.app.graph.setDirtyCanvas(true, true); }'''
SET_MODEL_JS = '''(name) => { for (const n of window.app.graph._nodes.filter(n => n.type === "W22ModelLoader"))
    n.widgets.find(w => w.name === "model_name").value = name; window.app.graph.setDirtyCanvas(true, true); }'''
SAVED_JS = '''() => window.app.graph.serialize().nodes.filter(n => n.type.startsWith("W22")).map(n => [n.type, n.widgets_values])'''
PROMPT_JS = '''async () => { const p = await window.app.graphToPrompt(); return Object.values(p.output).map(n => [n.class_type, Object.keys(n.inputs)]); }'''
results = {"rendering": rendering}
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
    page = browser.new_page(viewport={"width": 1800, "height": 1000})
    console = []
    page.on("console", lambda m: console.append(m.text))
    page.goto(url)
    page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=90000)
    page.wait_for_timeout(1500)
    page.evaluate('''async (on) => { const s = window.app.extensionManager && window.app.extensionManager.setting;
        if (s && s.set) await s.set("Comfy.VueNodes.Enabled", on); else window.app.ui.settings.setSettingValue("Comfy.VueNodes.Enabled", on); }''',
        rendering == "vue")
    page.reload()  # the renderer is chosen when the editor starts
    page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=90000)
    page.wait_for_timeout(1500)
    page.keyboard.press("Escape")
    results["frontend"] = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || '0'")
    def settle(ms=2500):
        page.wait_for_timeout(ms)
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
    def shoot(name):
        path = f"{shot_dir}/{rendering}_{name}.png"
        page.screenshot(path=path)
        return path
    for path in workflow_paths:
        name = path.rsplit("/", 1)[-1].removesuffix(".json")
        workflow = json.load(open(path))
        page.evaluate("wf => window.app.loadGraphData(wf)", workflow)
        settle()
        page.evaluate('''async () => { const c = window.app.extensionManager && window.app.extensionManager.command;
            if (c && c.execute) try { await c.execute("Comfy.Canvas.FitView"); } catch (e) {} }''')  # the whole graph in the shot
        settle(800)
        missing_dialog = page.get_by_text("Some Nodes Are Missing").count()
        shot = shoot(name)
        nodes = page.evaluate(NODES_JS)
        saved = page.evaluate(SAVED_JS)
        prompt = page.evaluate(PROMPT_JS)
        page.evaluate(SET_SIZE_JS, [1000, 80])
        settle(1200)
        bad_shot = shoot(f"{name}_bad_size")
        results[name] = {"nodes": nodes, "after_bad_size": page.evaluate(NODES_JS), "saved": saved, "prompt": prompt,
                         "shipped": [[n["type"], n.get("widgets_values")] for n in workflow["nodes"] if n["type"].startswith("W22")],
                         "missing_dialog": missing_dialog, "screenshots": [shot, bad_shot]}
    # error and retry paths on the t2v workflow
    page.evaluate("wf => window.app.loadGraphData(wf)", json.load(open(workflow_paths[0])))
    settle()
    added = Path(models_dir) / "diffusion_models" / "wan22_added_later.safetensors"
    page.evaluate(SET_MODEL_JS, added.name)
    settle(2500)
    missing = page.evaluate(NODES_JS)
    missing_shot = shoot("missing_model")
    source = sorted((Path(models_dir) / "diffusion_models").glob("wan2.2_t2v_high*"))[0]
    shutil.copy(source, added)
    settle(6000)  # longer than the extension's retry interval, no Refresh pressed
    found = page.evaluate(NODES_JS)
    found_shot = shoot("model_added")
    added.unlink()
    page.evaluate("async () => { await window.app.refreshComboInNodes(); }")
    settle(2500)
    removed = page.evaluate(NODES_JS)
    removed_shot = shoot("model_removed_after_refresh")
    results["errors"] = {"missing": missing, "found": found, "removed": removed,
                         "screenshots": [missing_shot, found_shot, removed_shot]}
    results["console"] = console
    browser.close()
print(json.dumps(results))
"""

# What the extension must show on each example workflow: the task its loaders detect, and its
# sampler's hand-off for the shipped settings (the first low-noise step is index 26 of 40 for
# T2V, 15 of 40 for I2V, 2 of 4 for Lightning; S2V has no MoE sampler). t2v_A14B comes first:
# the error and retry paths run on it.
EDITOR_EXPECTED = {
    "t2v_A14B": ("t2v-A14B", "hand-off after step 26 of 40"),
    "i2v_A14B": ("i2v-A14B", "hand-off after step 15 of 40"),
    "ti2v_5B": ("ti2v-5B", "ti2v-5B: one model runs all 50 steps"),
    "t2v_A14B_lightning": ("t2v-A14B", "hand-off after step 2 of 4"),
    "i2v_A14B_lightning": ("i2v-A14B", "hand-off after step 2 of 4"),
    "s2v_14B": ("s2v-14B", None),
    "s2v_14B_pose": ("s2v-14B", None),
}
RENDERINGS = ("classic", "vue")
# Frontends older than this have Vue nodes that draw no extension widgets: checked on 1.27.10 (the
# 2025-10 ComfyUI's pin), which lacks them, and 1.49.6 and 1.58.1, which have them; the minors in
# between were not checked.
VUE_EXTENSION_WIDGETS_SINCE = (1, 28)


def _lines(nodes: list[dict], node_type: str) -> list[str]:
    return [line for n in nodes if n["type"] == node_type for line in (n["lines"] or [])]


@pytest.fixture(scope="module")
def editor_runs(server, output_dir):
    """run(rendering) -> the editor script's results (run once per rendering for the module)."""
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    if subprocess.run([str(server.python), "-c", "import playwright"], capture_output=True).returncode:
        pytest.skip(f"playwright is not installed in {server.python} (pip install playwright; the test "
                    f"drives Debian's Chromium, no 'playwright install' needed)")
    runs = {}

    def run(rendering: str) -> dict:
        if rendering not in runs:
            paths = [str(workflows.WORKFLOW_DIR / f"{name}.json") for name in EDITOR_EXPECTED]
            done = subprocess.run([str(server.python), "-c", EDITOR_SCRIPT, server.url, json.dumps(paths),
                                   str(output_dir), rendering, str(server.models)],
                                  capture_output=True, text=True, timeout=400)
            assert done.returncode == 0, done.stderr[-4000:]
            runs[rendering] = json.loads(done.stdout.strip().splitlines()[-1])
        result = runs[rendering]
        version = tuple(int(part) for part in result["frontend"].split(".")[:2] if part.isdigit())
        if rendering == "vue" and version < VUE_EXTENSION_WIDGETS_SINCE:
            pytest.skip(f"frontend {result['frontend']}: its Vue nodes are the opt-in preview that renders no "
                        f"extension widgets (no legacy-widget canvas) and shows widget values as of loading; "
                        f"the classic canvas is its rendering")
        return result

    return run


def test_every_example_workflow_is_checked_in_the_editor():
    assert sorted(EDITOR_EXPECTED) == sorted(n.removesuffix(".json") for n in workflows.ALL_WORKFLOWS)


def _overlap(a: list[float], b: list[float], tolerance: float = 1.0) -> bool:
    """Whether two [x, y, width, height] boxes share more than `tolerance` in both directions."""
    return (min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]) > tolerance
            and min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]) > tolerance)


@pytest.mark.parametrize("name", EDITOR_EXPECTED)
@pytest.mark.parametrize("rendering", RENDERINGS)
def test_example_workflow_loads_in_the_graph_editor(editor_runs, server, object_info, rendering, name):
    results = editor_runs(rendering)
    assert any("[comfyui-wan22] web extension loaded" in line for line in results["console"]), results["console"]
    _skip_without_core_nodes(server, object_info, f"{name}.json")
    task, handoff = EDITOR_EXPECTED[name]
    result = results[name]
    types = [n["type"] for n in result["nodes"]]
    assert any(t.startswith("W22") for t in types), types
    unregistered = [n["type"] for n in result["nodes"] if not n["registered"]]
    flagged = [n["type"] for n in result["nodes"] if n["has_errors"]]
    assert unregistered == [] and flagged == [], (name, unregistered, flagged)
    assert result["missing_dialog"] == 0, f"{name}: the editor reported missing nodes"
    # the extension's lines: the variant read from the file, the hand-off step, size checks
    loader_lines = _lines(result["nodes"], "W22ModelLoader")
    assert any(line.startswith(f"detected: {task}") for line in loader_lines), loader_lines
    assert all(line.startswith((f"detected: {task}", "MoE expert")) for line in loader_lines), loader_lines
    sampler_lines = _lines(result["nodes"], "W22MoESampler")
    if handoff is None:
        assert "W22MoESampler" not in types and "W22VideoLatent" not in types
    else:
        assert any(handoff in line for line in sampler_lines), sampler_lines
        assert _lines(result["nodes"], "W22VideoLatent") == []  # the shipped sizes are trained ones
        bad = _lines(result["after_bad_size"], "W22VideoLatent")
        assert any("length must be 4k+1 frames (got 80)" in line for line in bad), bad
        multiple = {"t2v-A14B": 16, "ti2v-5B": 32, "i2v-A14B": None}[task]  # i2v: the size sets only the area
        assert any(f"multiples of {multiple} (got 1000x" in line for line in bad) == (multiple is not None), bad
    # the text is drawn by this renderer, fits the node's width, and the node is tall enough for it
    shown = [n for n in result["nodes"] + result["after_bad_size"] if n["lines"]]
    assert shown and all(n["has_widget"] and n["drawn"] and n["fits"] and n["tall_enough"] for n in shown), \
        [n for n in shown if not (n["drawn"] and n["fits"] and n["tall_enough"])]
    if rendering == "vue":
        assert all(n["vue_mounted"] for n in shown), "the Vue renderer did not mount the info widget"
    # no node hides part of another (Vue nodes are taller than the classic ones for the same widgets)
    overlapping = [(a["type"], a["id"], b["type"], b["id"]) for a, b in itertools.combinations(result["nodes"], 2)
                   if _overlap(a["box"], b["box"])]
    assert overlapping == [], f"{name} ({rendering}): nodes overlap: {overlapping}"
    # the info widget is neither saved with the workflow nor sent with a prompt
    assert result["saved"] == result["shipped"], (result["saved"], result["shipped"])
    assert not any("wan22_info" in inputs for _, inputs in result["prompt"]), result["prompt"]
    assert all(Path(shot).is_file() for shot in result["screenshots"])
    print(f"{rendering} {name} (frontend {results['frontend']}): {(sampler_lines or loader_lines)[0]}; screenshots "
          f"{', '.join(Path(shot).name for shot in result['screenshots'])}")


@pytest.mark.parametrize("rendering", RENDERINGS)
def test_the_editor_shows_a_missing_model_briefly_and_retries(editor_runs, server, rendering):
    errors = editor_runs(rendering)["errors"]
    loader = _lines(errors["missing"], "W22ModelLoader")
    assert loader and all(line == "wan22_added_later.safetensors is not in models/diffusion_models: add it, then "
                          "press Refresh" for line in loader), loader
    everything = " ".join(line for n in errors["missing"] for line in (n["lines"] or []))
    assert str(server.base) not in everything and str(server.models) not in everything and "/tmp" not in everything
    assert "undefined" not in everything and "null" not in everything
    sampler = _lines(errors["missing"], "W22MoESampler")
    assert sampler == ["the high-noise model cannot be read: see its loader"], sampler
    assert _lines(errors["missing"], "W22VideoLatent") == []  # the problem is shown once, on the loader
    found = _lines(errors["found"], "W22ModelLoader")
    assert found and all(line.startswith(("detected: t2v-A14B", "MoE expert")) for line in found), found
    assert any("hand-off after step 26 of 40" in line for line in _lines(errors["found"], "W22MoESampler"))
    removed = _lines(errors["removed"], "W22ModelLoader")
    assert removed and all("is not in models/diffusion_models" in line for line in removed), removed
    assert all(Path(shot).is_file() for shot in errors["screenshots"])
    print(f"{rendering} error path screenshots: {', '.join(errors['screenshots'])}")
