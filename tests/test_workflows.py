"""The example workflows: only registered node ids, valid widget values, runnable graphs.

`ui_to_api` turns a UI-format workflow (what the graph editor saves) into the API format that
`POST /prompt` takes, the way the editor does it: each node's widget values are assigned, in
order, to its inputs that are widgets; links become `[source node id, output index]`. A
dynamic combo (newer ComfyUI's COMFY_DYNAMICCOMBO_V3, e.g. SaveVideo's format) is followed by
the widgets of its chosen option, named "<combo>.<input>" ("format.codec"). Widgets a host has
that the workflow has no value for (inputs added after it was saved, like CreateVideo's
bit_depth) take their declared default. The real-host tests (test_comfy_host.py) reuse it with
the input specs from `/object_info`.

Every file in example_workflows/ is checked; those of other tasks are held to the same rules:
registered nodes, valid widgets, a thumbnail beside it, seeds that randomize, and on every node
that names a model file, `properties.models` with its download URL and folder.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOW_DIR = REPO_ROOT / "example_workflows"
ALL_WORKFLOWS = tuple(sorted(p.name for p in WORKFLOW_DIR.glob("*.json")))
S2V_WORKFLOWS = ("s2v_14B.json", "s2v_14B_pose.json")
WORKFLOWS = tuple(name for name in ALL_WORKFLOWS if name not in S2V_WORKFLOWS)  # the MoE-sampler graphs
# The node that makes each workflow's frames, and the pack nodes it must have.
FRAMES_FROM = {**{name: "W22Decode" for name in WORKFLOWS}, **{name: "W22SpeechToVideo" for name in S2V_WORKFLOWS}}
REQUIRED_NODES = {**{name: {"W22ModelLoader", "W22MoESampler", "W22Decode"} for name in WORKFLOWS},
                  **{name: {"W22ModelLoader", "W22AudioEncoderLoader", "W22SpeechToVideo"} for name in S2V_WORKFLOWS}}
THUMBNAIL_SUFFIX = ".jpg"  # the editor's template browser asks for <name>.jpg beside a pack's workflow

# Frontend-only nodes: the editor never sends them to the server.
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
# The ComfyUI core nodes the example workflows use, with their inputs as ComfyUI (a125cd84)
# declares them; test_comfy_host.py checks these against a real server's /object_info.
CORE_NODE_INPUTS = {
    "LoadImage": {"required": {"image": (["example.png"], {"image_upload": True})}},
    "CreateVideo": {"required": {"images": ("IMAGE", {}), "fps": ("FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0})},
                    "optional": {"audio": ("AUDIO", {})}},
    "SaveVideo": {"required": {"video": ("VIDEO", {}), "filename_prefix": ("STRING", {"default": "video/ComfyUI"}),
                               "format": (["auto", "mp4"], {"default": "auto"}),
                               "codec": (["auto", "h264"], {"default": "auto"})}},
    # the S2V workflows'
    "LoadAudio": {"required": {"audio": (["example.wav"], {"audio_upload": True})}},
    "LoadVideo": {"required": {"file": (["example.mp4"], {"video_upload": True})}},
    "GetVideoComponents": {"required": {"video": ("VIDEO", {})}},
}
# ComfyUI without torchaudio does not load its audio nodes (docs/comfy-host.md).
AUDIO_CORE_NODES = {"LoadAudio"}
CORE_NODES = set(CORE_NODE_INPUTS)
CORE_OUTPUTS = {"LoadImage": ["IMAGE", "MASK"], "CreateVideo": ["VIDEO"], "SaveVideo": [], "LoadAudio": ["AUDIO"],
                "LoadVideo": ["VIDEO"], "GetVideoComponents": ["IMAGE", "AUDIO", "FLOAT"]}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO}
MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".pth", ".pt", ".bin", ".ckpt", ".gguf")
MODE_ACTIVE = 0

# Model files as ComfyUI's repackaged Wan2.2 release names them, by model folder.
REPACKAGED = {
    "diffusion_models": {
        "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
        "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
        "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
        "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors",
        "wan2.2_ti2v_5B_fp16.safetensors",
        "wan2.2_s2v_14B_fp8_scaled.safetensors",
        "wan2.2_s2v_14B_bf16.safetensors",
    },
    "text_encoders": {"umt5_xxl_fp8_e4m3fn_scaled.safetensors"},
    "vae": {"wan_2.1_vae.safetensors", "wan2.2_vae.safetensors"},
    # the 4-step LightX2V Lightning LoRAs (split_files/loras/)
    "loras": {
        "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors",
        "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors",
        "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors",
        "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors",
    },
    "audio_encoders": {"wav2vec2_large_english_fp16.safetensors"},
}


def load_pack():
    """Import the pack the way ComfyUI does: its folder as a package, by path."""
    name = "comfyui_wan22_pack"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOW_DIR / name).read_text(encoding="utf-8"))


def input_kind(spec: tuple | list) -> str:
    """'COMBO' for a list of choices (or the COMBO type), else the declared type name."""
    kind = spec[0]
    if isinstance(kind, (list, tuple)):
        return "COMBO"
    return kind


def is_widget(spec: tuple | list) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return input_kind(spec) in WIDGET_TYPES and not options.get("forceInput", False)


def extra_widget_values(spec: tuple | list) -> int:
    """Values the editor stores after an input's own: seed control, image upload button."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    extra = 0
    if options.get("control_after_generate"):
        extra += 1
    if options.get("image_upload") or options.get("video_upload"):
        extra += 1
    if options.get("audio_upload"):
        extra += 2  # the audio player and the upload button
    return extra


def ordered_inputs(input_types: dict) -> list[tuple[str, Any]]:
    """(name, spec) in the order the editor creates widgets: required, then optional (hidden
    inputs, which the editor never shows, left out)."""
    order = input_types.get("input_order")
    result = []
    for section in ("required", "optional"):
        specs = input_types.get(section, {})
        names = order.get(section, list(specs)) if order else list(specs)
        result += [(n, specs[n]) for n in names if not _options(specs[n]).get("hidden")]
    return result


def _options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def default_value(spec) -> Any:
    """The value a new widget of `spec` starts with: its default, else the first choice."""
    options = _options(spec)
    if "default" in options:
        return options["default"]
    if isinstance(spec[0], (list, tuple)):
        return spec[0][0]
    choices = options.get("options", [])
    if choices:
        return choices[0]["key"] if isinstance(choices[0], dict) else choices[0]
    raise ValueError(f"no default for a {spec[0]} widget")


def _dynamic_choice_inputs(spec, value, strict: bool = True) -> dict:
    """The inputs (required + optional) of the chosen option of a dynamic combo (none for an
    unknown option unless `strict`)."""
    option = next((o for o in _options(spec).get("options", []) if o.get("key") == value), None)
    if option is None:
        if not strict:
            return {}
        raise ValueError(f"{value!r} is not an option of this dynamic combo")
    return option.get("inputs", {})


def ui_to_api(workflow: dict, node_inputs: dict[str, dict]) -> dict:
    """API-format prompt of a UI workflow; `node_inputs[class_type]` is its INPUT_TYPES."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", MODE_ACTIVE) != MODE_ACTIVE:
            continue
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs: dict[str, Any] = {}

        def assign(name: str, spec) -> None:
            if is_widget(spec):
                inputs[name] = values.pop(0) if values else default_value(spec)
                del values[:extra_widget_values(spec)]
                if input_kind(spec) == DYNAMIC_COMBO:
                    for sub_name, sub_spec in ordered_inputs(_dynamic_choice_inputs(spec, inputs[name])):
                        assign(f"{name}.{sub_name}", sub_spec)
            if name in linked:
                _, source, slot, *_ = links[linked[name]]
                inputs[name] = [str(source), slot]

        for name, spec in ordered_inputs(node_inputs[node["type"]]):
            assign(name, spec)
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values "
                             f"left over: {values}")
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def widget_errors(prompt: dict, node_inputs: dict[str, dict]) -> list[str]:
    """What ComfyUI's prompt validation would reject in the widget values of `prompt`."""
    errors = []
    for node_id, node in prompt.items():
        specs = dict(ordered_inputs(node_inputs[node["class_type"]]))
        for name, value in node["inputs"].items():  # a dynamic combo's chosen inputs
            if input_kind(specs.get(name, ("",))) == DYNAMIC_COMBO and not isinstance(value, list):
                specs.update((f"{name}.{n}", spec) for n, spec in ordered_inputs(_dynamic_choice_inputs(
                    specs[name], value, strict=False)))
        required = node_inputs[node["class_type"]].get("required", {})
        for name in required:
            if name not in node["inputs"]:
                errors.append(f"node {node_id}: required input {name!r} missing")
        for name, value in node["inputs"].items():
            spec = specs.get(name)
            if spec is None:
                errors.append(f"node {node_id}: unknown input {name!r}")
                continue
            if isinstance(value, list):  # a link
                continue
            kind = input_kind(spec)
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if kind == DYNAMIC_COMBO:
                choices = [o["key"] for o in options.get("options", [])]
                if value not in choices:
                    errors.append(f"node {node_id}: {name}={value!r} not in {choices[:8]}")
            elif kind == "COMBO":
                choices = spec[0] if isinstance(spec[0], (list, tuple)) else options.get("options", [])
                if value not in choices:
                    errors.append(f"node {node_id}: {name}={value!r} not in {list(choices)[:8]}")
            elif kind in ("INT", "FLOAT"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) \
                        or (kind == "INT" and not float(value).is_integer()):
                    errors.append(f"node {node_id}: {name}={value!r} is not {kind}")
                elif value < options.get("min", float("-inf")) or value > options.get("max", float("inf")):
                    errors.append(f"node {node_id}: {name}={value!r} outside "
                                  f"[{options.get('min')}, {options.get('max')}]")
            elif kind == "BOOLEAN" and not isinstance(value, bool):
                errors.append(f"node {node_id}: {name}={value!r} is not BOOLEAN")
            elif kind == "STRING" and not isinstance(value, str):
                errors.append(f"node {node_id}: {name}={value!r} is not STRING")
    return errors


# --- the tests (no ComfyUI needed) -----------------------------------------------------------

@pytest.fixture(scope="module")
def pack_nodes(tmp_path_factory):
    """The pack's node classes, with the host's model folders holding (empty) files under the
    release's names, so the loaders' model lists are what a user with those files sees."""
    pack = load_pack()
    host = sys.modules[f"{pack.__name__}.nodes.host"]
    root = tmp_path_factory.mktemp("release_names")
    saved = dict(host._plain_folders)
    for kind, names in REPACKAGED.items():
        for name in names:
            (root / kind).mkdir(parents=True, exist_ok=True)
            (root / kind / name).write_bytes(b"")
        host.set_model_folders(kind, [root / kind])
    yield pack.NODE_CLASS_MAPPINGS
    host._plain_folders.clear()
    host._plain_folders.update(saved)


@pytest.fixture(scope="module")
def node_inputs(pack_nodes) -> dict[str, dict]:
    return {**{name: cls.INPUT_TYPES() for name, cls in pack_nodes.items()}, **CORE_NODE_INPUTS}


def node_outputs(pack_nodes, kind: str) -> list[str]:
    return list(pack_nodes[kind].RETURN_TYPES) if kind in pack_nodes else CORE_OUTPUTS[kind]


@pytest.mark.parametrize("name", ALL_WORKFLOWS)
def test_workflow_uses_only_registered_nodes(name, pack_nodes):
    types = {node["type"] for node in load_workflow(name)["nodes"]}
    unknown = types - set(pack_nodes) - CORE_NODES - VIRTUAL_NODES
    assert unknown == set(), f"{name}: node types neither ours nor in CORE_NODES: {unknown}"
    assert REQUIRED_NODES[name] <= types


@pytest.mark.parametrize("name", ALL_WORKFLOWS)
def test_workflow_widget_values_are_valid(name, node_inputs):
    prompt = ui_to_api(load_workflow(name), node_inputs)
    assert widget_errors(prompt, node_inputs) == []


@pytest.mark.parametrize("name", ALL_WORKFLOWS)
def test_workflow_links_join_matching_types_and_end_in_a_saved_video(name, pack_nodes, node_inputs):
    workflow = load_workflow(name)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for link_id, source, slot, target, target_slot, kind in workflow["links"]:
        produced = node_outputs(pack_nodes, nodes[source]["type"])[slot]
        wanted = nodes[target]["inputs"][target_slot]
        declared = dict(ordered_inputs(node_inputs[nodes[target]["type"]]))[wanted["name"]][0]
        assert produced == kind == wanted["type"] == declared, f"{name}: link {link_id}"
        assert wanted["link"] == link_id and link_id in nodes[source]["outputs"][slot]["links"]
    prompt = ui_to_api(workflow, node_inputs)
    for node_id, node in prompt.items():  # every required link input is connected
        required = node_inputs[node["class_type"]].get("required", {})
        missing = [n for n, spec in required.items() if not is_widget(spec) and n not in node["inputs"]]
        assert missing == [], f"{name}: node {node_id} ({node['class_type']}) lacks {missing}"
    save = _node(prompt, "SaveVideo")
    create = prompt[save["inputs"]["video"][0]]
    assert create["class_type"] == "CreateVideo"
    assert prompt[create["inputs"]["images"][0]]["class_type"] == FRAMES_FROM[name]


@pytest.mark.parametrize("name, task", [("t2v_A14B.json", "t2v-A14B"), ("i2v_A14B.json", "i2v-A14B"),
                                        ("ti2v_5B.json", "ti2v-5B")])
def test_workflow_uses_its_task_models_and_reference_settings(name, task, node_inputs):
    from wan_core.configs import TASKS

    config = TASKS[task]
    prompt = ui_to_api(load_workflow(name), node_inputs)
    kind = task.split("-")[0]
    models = sorted(n["inputs"]["model_name"] for n in prompt.values() if n["class_type"] == "W22ModelLoader")
    assert all(m in REPACKAGED["diffusion_models"] and m.startswith(f"wan2.2_{kind}_") for m in models), models
    vae = _node(prompt, "W22VAELoader")["inputs"]["vae_name"]
    assert vae == ("wan2.2_vae.safetensors" if config.vae_version == "2.2" else "wan_2.1_vae.safetensors")
    sampler = _node(prompt, "W22MoESampler")["inputs"]
    assert (sampler["steps"], sampler["shift"], sampler["solver"]) == (config.sample_steps, config.sample_shift, "unipc")
    low, high = config.sample_guide_scale if config.is_moe else (None, config.sample_guide_scale)
    assert sampler["cfg_high_noise"] == high and (low is None or sampler["cfg_low_noise"] == low)
    assert sampler["boundary"] == 0.0  # the model's own
    assert ("low_noise_model" in sampler) == config.is_moe
    latent = _node(prompt, "W22VideoLatent")["inputs"]
    assert (latent["width"], latent["height"]) in config.supported_sizes and latent["length"] == config.frame_num
    assert ("start_image" in latent) == (kind == "i2v")
    assert _node(prompt, "CreateVideo")["inputs"]["fps"] == config.sample_fps


@pytest.mark.parametrize("name, task", [("t2v_A14B_lightning.json", "t2v-A14B"),
                                        ("i2v_A14B_lightning.json", "i2v-A14B")])
def test_lightning_workflow_puts_each_experts_lora_before_a_four_step_cfg1_sampler(name, task, node_inputs):
    from wan_core.configs import TASKS
    from wan_core.sampling import handoff_index, schedule

    prompt = ui_to_api(load_workflow(name), node_inputs)
    sampler = _node(prompt, "W22MoESampler")["inputs"]
    kind = task.split("-")[0]
    for expert in ("high", "low"):
        lora = prompt[sampler[f"{expert}_noise_model"][0]]
        assert lora["class_type"] == "W22LoRA" and lora["inputs"]["strength"] == 1.0
        assert lora["inputs"]["lora_name"] in REPACKAGED["loras"]
        assert lora["inputs"]["lora_name"].startswith(f"wan2.2_{kind}_lightx2v_4steps_lora_")
        assert lora["inputs"]["lora_name"].endswith(f"_{expert}_noise.safetensors")
        loader = prompt[lora["inputs"]["model"][0]]
        assert loader["class_type"] == "W22ModelLoader" and f"_{expert}_noise_" in loader["inputs"]["model_name"]
    assert (sampler["steps"], sampler["shift"], sampler["cfg_high_noise"], sampler["cfg_low_noise"]) == (4, 5.0, 1.0, 1.0)
    assert sampler["solver"] == "euler" and sampler["split"] == "boundary" and sampler["boundary"] == 0.0
    _, timesteps = schedule(sampler["solver"], sampler["steps"], sampler["shift"])
    assert handoff_index(timesteps, TASKS[task].boundary) == 2  # the model's boundary: 2 + 2 steps
    latent = _node(prompt, "W22VideoLatent")["inputs"]
    assert (latent["width"], latent["height"]) in TASKS[task].supported_sizes
    assert _node(prompt, "SaveVideo")["inputs"]["filename_prefix"].endswith("_lightning")


def _node(prompt: dict, class_type: str) -> dict:
    found = [n for n in prompt.values() if n["class_type"] == class_type]
    assert len(found) == 1, f"expected one {class_type}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("name", S2V_WORKFLOWS)
def test_s2v_workflow_uses_the_release_files_and_reference_settings(name, node_inputs):
    """The S2V graphs: release file names, the reference's sampling settings and negative prompt,
    the whole audio (num_clips 0) in 80-frame clips, and a video with the node's sound at 16 fps."""
    from wan_core.configs import S2V_NEGATIVE_PROMPT, TASKS

    task = TASKS["s2v-14B"]
    prompt = ui_to_api(load_workflow(name), node_inputs)
    model = _node(prompt, "W22ModelLoader")["inputs"]["model_name"]
    assert model in REPACKAGED["diffusion_models"] and model.startswith("wan2.2_s2v_14B"), model
    assert _node(prompt, "W22AudioEncoderLoader")["inputs"]["audio_encoder_name"] in REPACKAGED["audio_encoders"]
    assert _node(prompt, "W22VAELoader")["inputs"]["vae_name"] == "wan_2.1_vae.safetensors"
    assert _node(prompt, "W22TextEncode")["inputs"]["negative"] == S2V_NEGATIVE_PROMPT
    s2v_id = next(i for i, n in prompt.items() if n["class_type"] == "W22SpeechToVideo")
    s2v = prompt[s2v_id]["inputs"]
    assert (s2v["steps"], s2v["cfg"], s2v["shift"], s2v["solver"]) == (task.sample_steps, task.sample_guide_scale,
                                                                      task.sample_shift, "unipc")
    assert (s2v["num_clips"], s2v["frames_per_clip"], s2v["init_first_frame"]) == (0, 80, False)
    assert (s2v["width"], s2v["height"]) in task.supported_sizes
    assert prompt[s2v["audio"][0]]["class_type"] == "LoadAudio"
    assert prompt[s2v["ref_image"][0]]["class_type"] == "LoadImage"
    create = _node(prompt, "CreateVideo")["inputs"]
    assert create["fps"] == task.sample_fps and create["audio"] == [s2v_id, 1] and create["images"] == [s2v_id, 0]
    if name == "s2v_14B_pose.json":
        pose = prompt[s2v["pose_video"][0]]
        assert pose["class_type"] == "GetVideoComponents" and s2v["pose_video"][1] == 0
        assert prompt[pose["inputs"]["video"][0]]["class_type"] == "LoadVideo"
    else:
        assert "pose_video" not in s2v


@pytest.mark.parametrize("name", ALL_WORKFLOWS)
def test_workflow_has_a_thumbnail_for_the_template_browser(name):
    from PIL import Image

    thumbnail = WORKFLOW_DIR / (name.removesuffix(".json") + THUMBNAIL_SUFFIX)
    assert thumbnail.is_file(), f"{name}: no {thumbnail.name} beside it (tools/draw_thumbnails.py draws one)"
    with Image.open(thumbnail) as picture:
        assert picture.format == "JPEG" and min(picture.size) >= 256, (name, picture.format, picture.size)


@pytest.mark.parametrize("name", ALL_WORKFLOWS)
def test_our_nodes_ship_a_value_for_every_widget(name, pack_nodes, node_inputs):
    """The editor fills a missing widget value with today's default and saves it, so a shipped
    workflow that lacks one changes the moment it is opened (and with the next default)."""
    for node in load_workflow(name)["nodes"]:
        if node["type"] not in pack_nodes:
            continue
        widgets = [(n, spec) for n, spec in ordered_inputs(node_inputs[node["type"]]) if is_widget(spec)]
        expected = sum(1 + extra_widget_values(spec) for _, spec in widgets)
        assert len(node.get("widgets_values", [])) == expected, \
            f"{name}: node {node['id']} ({node['type']}) stores {node.get('widgets_values')} for {[n for n, _ in widgets]}"


@pytest.mark.parametrize("name", ALL_WORKFLOWS)
def test_workflow_seeds_randomize(name, node_inputs):
    """A shared workflow queued twice should give two videos: seed widgets ship as "randomize"."""
    for node in load_workflow(name)["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        values = list(node.get("widgets_values", []))
        for input_name, spec in ordered_inputs(node_inputs[node["type"]]):
            if not is_widget(spec) or not values:
                continue
            values.pop(0)
            if _options(spec).get("control_after_generate"):
                assert values[0] == "randomize", f"{name}: node {node['id']} {input_name} is {values[0]!r}"
            del values[:extra_widget_values(spec)]


@pytest.mark.parametrize("name", ALL_WORKFLOWS)
def test_every_model_file_has_its_download_in_properties_models(name):
    """The editor offers to download missing models from `properties.models`: every widget value
    that names a model file is listed there with its folder and the release's URL."""
    for node in load_workflow(name)["nodes"]:
        files = [v for v in node.get("widgets_values", []) if isinstance(v, str) and v.endswith(MODEL_FILE_SUFFIXES)]
        listed = {m["name"]: m for m in node.get("properties", {}).get("models", [])}
        for file in files:
            assert file in listed, f"{name}: node {node['id']} ({node['type']}) has no properties.models for {file}"
            model = listed[file]
            assert set(model) >= {"name", "url", "directory"}, model
            assert model["url"].startswith("https://huggingface.co/Comfy-Org/"), model
            assert model["url"].endswith(f"/{model['directory']}/{file}"), model
            known = [kind for kind, names in REPACKAGED.items() if file in names]
            assert known in ([], [model["directory"]]), (file, model["directory"], known)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_the_video_latent_takes_the_decoders_vae(name, node_inputs):
    """With the VAE linked, Video Latent refuses a VAE its model cannot use before sampling
    (not at decode); it must be the VAE the decoder uses."""
    prompt = ui_to_api(load_workflow(name), node_inputs)
    vae = _node(prompt, "W22VideoLatent")["inputs"].get("vae")
    assert vae is not None, f"{name}: the VAE is not connected to the Video Latent node"
    assert prompt[vae[0]]["class_type"] == "W22VAELoader" and vae == _node(prompt, "W22Decode")["inputs"]["vae"]


def test_the_converter_follows_dynamic_combos_and_fills_new_widgets_with_defaults():
    """Newer hosts: SaveVideo's format is a dynamic combo with a nested codec, CreateVideo has a
    new optional bit_depth widget; a workflow saved on an older host still converts."""
    codec = ["COMFY_DYNAMICCOMBO_V3", {"options": [{"key": "auto", "inputs": {"required": {}}},
                                                   {"key": "h264", "inputs": {"required": {}}}]}]
    inputs = {
        "SaveVideo": {"required": {"video": ["VIDEO", {}], "filename_prefix": ["STRING", {"default": "v"}],
                                   "format": ["COMFY_DYNAMICCOMBO_V3", {"options": [
                                       {"key": "auto", "inputs": {"required": {"codec": codec}}},
                                       {"key": "webm", "inputs": {"required": {"codec": codec}}}]}]},
                      "optional": {"codec": ["COMFY_DYNAMICCOMBO_V3", {"hidden": True}]}},
        "CreateVideo": {"required": {"images": ["IMAGE", {}], "fps": ["FLOAT", {"default": 30.0}]},
                        "optional": {"audio": ["AUDIO", {}], "bit_depth": ["INT", {"default": 8, "min": 8, "max": 10}]}},
    }
    workflow = {"links": [[1, 1, 0, 2, 0, "VIDEO"]], "nodes": [
        {"id": 1, "type": "CreateVideo", "inputs": [], "widgets_values": [16]},
        {"id": 2, "type": "SaveVideo", "inputs": [{"name": "video", "link": 1}],
         "widgets_values": ["video/x", "webm", "h264"]}]}
    prompt = ui_to_api(workflow, inputs)
    assert prompt["1"]["inputs"] == {"fps": 16, "bit_depth": 8}
    assert prompt["2"]["inputs"] == {"video": ["1", 0], "filename_prefix": "video/x", "format": "webm",
                                     "format.codec": "h264"}
    save = {"2": prompt["2"]}
    assert widget_errors(save, inputs) == []
    save["2"]["inputs"]["format.codec"] = "av2"
    assert widget_errors(save, inputs) == ["node 2: format.codec='av2' not in ['auto', 'h264']"]
