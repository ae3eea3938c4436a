"""The pack inside a real ComfyUI: server API, example workflows, queueing, interrupt, editor.

Needs a ComfyUI checkout in COMFYUI_PATH and the Python of its environment (COMFYUI_PYTHON, or
$COMFYUI_PATH/../venv/bin/python) with the pack's dependencies installed; the graph-editor test
also needs Chromium (/usr/bin/chromium) and playwright in that Python. Without them every test
here skips and says why. The server runs with --cpu on 127.0.0.1 and a free port; its models,
inputs, outputs and the pack's link in custom_nodes live in a temporary folder.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_LINK_NAME = "comfyui-wan22"
SERVER_START_TIMEOUT_S = 180
PROMPT_TIMEOUT_S = 300
CHROMIUM = Path("/usr/bin/chromium")


def _import_sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"_wan22_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


workflows = _import_sibling("test_workflows")


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


nodes_tests = _import_sibling("test_nodes")

# Small enough for a 2-core CPU: the sizes and steps the tests put into the example workflows,
# and the start image (written into the server's input folder) for LoadImage.
TINY_RUN = {"width": 64, "height": 64, "length": 5, "steps": 3, "image": nodes_tests.START_IMAGE}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root, python = _comfy_paths()
    base = tmp_path_factory.mktemp("comfyui")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_LINK_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
    models = base / "tiny_models"
    nodes_tests.write_tiny_models(models)
    config = base / "extra_model_paths.yaml"
    config.write_text("wan22_tests:\n"
                      f"  base_path: {models}\n"
                      + "".join(f"  {kind}: {kind}\n" for kind in nodes_tests.MODEL_FOLDERS))
    (base / "input").mkdir()
    nodes_tests.write_start_image(base / "input" / nodes_tests.START_IMAGE)
    port = _free_port()
    log = base / "comfyui.log"
    command = [str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--extra-model-paths-config", str(config),
               "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=root, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", process, base, log, python)
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
    log = server.log_tail(200_000)
    assert "IMPORT FAILED" not in log, log
    assert PACK_LINK_NAME in log


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
    """test_workflows.py checks the workflows against CORE_NODE_INPUTS; this host must agree."""
    for name, sections in workflows.CORE_NODE_INPUTS.items():
        if name in workflows.AUDIO_CORE_NODES and name not in object_info:
            continue  # a host without torchaudio has no audio nodes (the S2V workflows need one)
        served = object_info[name]
        assert served["output"] == workflows.CORE_OUTPUTS[name], name
        for section, specs in sections.items():
            assert list(served["input"][section]) == list(specs), f"{name} {section}"
            for input_name, spec in specs.items():
                kind = served["input"][section][input_name][0]
                if isinstance(spec[0], list):
                    assert kind == "COMBO" or isinstance(kind, list), f"{name}.{input_name}"
                else:
                    assert kind == spec[0], f"{name}.{input_name}"


def test_example_workflows_are_listed_as_the_packs_templates(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates.get(PACK_LINK_NAME, [])) == sorted(n.removesuffix(".json") for n in workflows.ALL_WORKFLOWS)


@pytest.mark.parametrize("name", workflows.WORKFLOWS)
def test_example_workflow_runs_and_saves_its_video(server, object_info, name):
    import av

    prompt = _api_prompt(name, object_info)
    started = time.monotonic()
    entry = server.wait(server.queue(prompt))
    seconds = time.monotonic() - started
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:4000]
    video = _saved_video(server, entry)
    with av.open(str(video)) as container:
        frames = sum(1 for _ in container.decode(video=0))
        stream = container.streams.video[0]
        size = (stream.codec_context.width, stream.codec_context.height)
    assert frames == TINY_RUN["length"]
    assert size == (TINY_RUN["width"], TINY_RUN["height"])
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
    status, _ = server.request("POST", "/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    deadline = time.monotonic() + 30
    while server.get("/wan22/cache")["models"] and time.monotonic() < deadline:
        time.sleep(0.5)  # the prompt worker applies the request between prompts
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
    interrupt stops the workers and leaves them up, "Unload models" ends them."""
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


# Runs in ComfyUI's Python (which has playwright): loads each workflow into the real editor,
# reads what the pack's extension shows on its nodes (`wan22Lines`), then sets the latent's
# width to 1000 and its length to 80 frames and reads again. Screenshots before and after.
EDITOR_SCRIPT = r"""
import json, sys
from playwright.sync_api import sync_playwright
url, workflow_paths, shot_dir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
NODES_JS = '''() => window.app.graph._nodes.map(n => ({
    type: n.type, registered: n.type in LiteGraph.registered_node_types, has_errors: !!n.has_errors,
    lines: n.wan22Lines || null}))'''
SET_SIZE_JS = '''([width, length]) => { const node = window.app.graph._nodes.find(n => n.type === "W22VideoLatent");
    node.widgets.find(w => w.name === "width").value = width;
    node.widgets.find(w => w.name === "length").value = length; window.app.graph.setDirtyCanvas(true, true); }'''
results = {}
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    console = []
    page.on("console", lambda m: console.append(m.text))
    page.goto(url)
    page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=60000)
    page.wait_for_timeout(1500)
    page.keyboard.press("Escape")
    for path in workflow_paths:
        name = path.rsplit("/", 1)[-1].removesuffix(".json")
        page.evaluate("wf => window.app.loadGraphData(wf)", json.load(open(path)))
        page.wait_for_timeout(2500)
        missing_dialog = page.get_by_text("Some Nodes Are Missing").count()
        page.keyboard.press("Escape")
        page.wait_for_timeout(500)
        shot = f"{shot_dir}/{name}.png"
        page.screenshot(path=shot)
        nodes = page.evaluate(NODES_JS)
        page.evaluate(SET_SIZE_JS, [1000, 80])
        page.wait_for_timeout(800)
        bad_shot = f"{shot_dir}/{name}_bad_size.png"
        page.screenshot(path=bad_shot)
        results[name] = {"nodes": nodes, "after_bad_size": page.evaluate(NODES_JS),
                         "missing_dialog": missing_dialog, "screenshots": [shot, bad_shot]}
    results["console"] = console
    browser.close()
print(json.dumps(results))
"""

# What the extension must show on each workflow's sampler for the reference settings
# (the first low-noise step is index 26 of 40 for T2V, 15 of 40 for I2V).
HANDOFF_LINES = {"t2v_A14B": "hand-off after step 26 of 40", "i2v_A14B": "hand-off after step 15 of 40",
                 "ti2v_5B": "ti2v-5B: one model runs all 50 steps"}
TASKS_OF = {"t2v_A14B": "t2v-A14B", "i2v_A14B": "i2v-A14B", "ti2v_5B": "ti2v-5B"}


def _lines(nodes: list[dict], node_type: str) -> list[str]:
    return [line for n in nodes if n["type"] == node_type for line in (n["lines"] or [])]


def test_example_workflows_load_in_the_graph_editor(server, output_dir):
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    if subprocess.run([str(server.python), "-c", "import playwright"], capture_output=True).returncode:
        pytest.skip(f"playwright is not installed in {server.python} (pip install playwright; the test "
                    f"drives Debian's Chromium, no 'playwright install' needed)")
    paths = [str(workflows.WORKFLOW_DIR / name) for name in workflows.WORKFLOWS]
    run = subprocess.run([str(server.python), "-c", EDITOR_SCRIPT, server.url, json.dumps(paths), str(output_dir)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert any("[comfyui-wan22] web extension loaded" in line for line in results["console"]), results["console"]
    for name, task in TASKS_OF.items():
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
        sampler_lines = _lines(result["nodes"], "W22MoESampler")
        assert any(HANDOFF_LINES[name] in line for line in sampler_lines), sampler_lines
        assert _lines(result["nodes"], "W22VideoLatent") == []  # the shipped sizes are trained ones
        bad = _lines(result["after_bad_size"], "W22VideoLatent")
        assert any("length must be 4k+1 frames (got 80)" in line for line in bad), bad
        multiple = {"t2v-A14B": 16, "ti2v-5B": 32, "i2v-A14B": None}[task]  # i2v: the size sets only the area
        assert any(f"multiples of {multiple} (got 1000x" in line for line in bad) == (multiple is not None), bad
        assert all(Path(shot).is_file() for shot in result["screenshots"])
        print(f"{name}: {len(types)} nodes; {sampler_lines[0]}; screenshots {', '.join(result['screenshots'])}")
