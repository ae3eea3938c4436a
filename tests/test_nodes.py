"""The node set without ComfyUI: declarations ComfyUI accepts, and every task run end to end.

The pack is imported the way ComfyUI imports it (by path, as a package); nodes/host.py runs in
plain mode, its model folders pointed at tiny random checkpoints written under the file names
of ComfyUI's repackaged Wan2.2 release (in the layouts those files have: fp8-scaled A14B
experts and text encoder, fp16 5B, ComfyUI-layout VAEs). The sampler's output is checked
against wan_core.pipeline.generate on the same models and seed: the nodes must produce what
the library produces. test_comfy_host.py reuses `write_tiny_models` for the real server.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from wan_core import pipeline
from wan_core.configs import DEFAULT_NEGATIVE_PROMPT, TASKS
from wan_core.vae import Tiling
from wan_core.testing import tiny_dit_config, write_dit_checkpoint, write_text_encoder_checkpoint, write_vae_checkpoint
from wan_core.testing.lora import lightx2v_lora, write_lora
from siblings import sibling


pack = sibling("test_workflows").load_pack()
host = importlib.import_module("comfyui_wan22_pack.nodes.host")
loaders = importlib.import_module("comfyui_wan22_pack.nodes.loaders")
samplers = importlib.import_module("comfyui_wan22_pack.nodes.samplers")

MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae", "loras")
# file name -> (model folder, how to write it): the names of ComfyUI's repackaged release.
TINY_MODELS = {
    "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": ("diffusion_models", "dit", "t2v", "comfy_fp8_scaled", 1),
    "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": ("diffusion_models", "dit", "t2v", "comfy_fp8_scaled", 2),
    "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors": ("diffusion_models", "dit", "i2v", "comfy_fp8_scaled", 3),
    "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors": ("diffusion_models", "dit", "i2v", "comfy_fp8_scaled", 4),
    "wan2.2_ti2v_5B_fp16.safetensors": ("diffusion_models", "dit", "ti2v", "comfy", 5),
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": ("text_encoders", "text", None, "comfy_fp8_scaled", 6),
    "wan_2.1_vae.safetensors": ("vae", "vae", "2.1", "comfy", 7),
    "wan2.2_vae.safetensors": ("vae", "vae", "2.2", "comfy", 8),
    # the 4-step Lightning LoRAs (LightX2V's entries: pairs, bias/norm/modulation differences)
    "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors": ("loras", "lora", "t2v", "comfy", 9),
    "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors": ("loras", "lora", "t2v", "comfy", 10),
    "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors": ("loras", "lora", "i2v", "comfy", 11),
    "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors": ("loras", "lora", "i2v", "comfy", 12),
}
START_IMAGE = "wan22_start.png"
TINY = {"width": 64, "height": 64, "length": 5}


def write_tiny_models(root: Path) -> Path:
    """Tiny random checkpoints under the release's file names in root/<model folder>/."""
    for name, (folder, kind, variant, layout, seed) in TINY_MODELS.items():
        path = root / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "dit":
            dtype = torch.float16 if layout == "comfy" else torch.bfloat16
            write_dit_checkpoint(path, variant, layout, dtype=dtype, seed=seed)
        elif kind == "text":
            write_text_encoder_checkpoint(path, layout, dtype=torch.bfloat16, seed=seed)
        elif kind == "lora":
            write_lora(path, lightx2v_lora(tiny_dit_config(variant), seed=seed), layout)
        else:
            write_vae_checkpoint(path, variant, layout, seed=seed)
    return root


def write_start_image(path: Path, size: tuple[int, int] = (TINY["width"], TINY["height"])) -> Path:
    """A smooth colour pattern (width x height) with detail the VAE latent can tell apart."""
    from PIL import Image

    width, height = size
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([np.sin(6 * x) * 0.5 + 0.5, np.cos(5 * y) * 0.5 + 0.5, (x + y) / 2], axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path)
    return path


def comfy_image(path: Path) -> torch.Tensor:
    """The file as ComfyUI's LoadImage gives it: IMAGE [1, H, W, 3] float in 0..1."""
    return pipeline.load_image(path).permute(1, 2, 0)[None]


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    return write_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def models(models_root, monkeypatch):
    monkeypatch.setattr(host, "_plain_folders", {})
    for kind in MODEL_FOLDERS:
        host.set_model_folders(kind, [models_root / kind])
    return models_root


@pytest.fixture(scope="module")
def start_image(tmp_path_factory) -> torch.Tensor:
    return comfy_image(write_start_image(tmp_path_factory.mktemp("input") / START_IMAGE))


# --- declarations -----------------------------------------------------------------------------

def _sections(cls) -> dict:
    return {s: v for s, v in cls.INPUT_TYPES().items() if s in ("required", "optional")}


@pytest.mark.parametrize("node_id", sorted(pack.NODE_CLASS_MAPPINGS))
def test_node_declarations_are_what_comfyui_accepts(node_id, models):
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("W22"), "every node id carries the pack's prefix"
    assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("Wan2.2 ")
    assert cls.CATEGORY.startswith("Wan2.2/")
    assert isinstance(cls.DESCRIPTION, str) and cls.DESCRIPTION
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
    for optional in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
        if hasattr(cls, optional):
            assert len(getattr(cls, optional)) == len(cls.RETURN_TYPES), optional
    sections = _sections(cls)
    assert "required" in sections
    inputs = {name: spec for section in sections.values() for name, spec in section.items()}
    for name, spec in inputs.items():
        assert isinstance(spec, tuple) and len(spec) == 2, f"{node_id}.{name}: (type, options)"
        kind, options = spec
        assert isinstance(kind, (str, list)), f"{node_id}.{name}"
        assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        if isinstance(kind, list) and "default" in options:
            assert options["default"] in kind, f"{node_id}.{name}"
        if kind in ("INT", "FLOAT"):
            assert options["min"] <= options["default"] <= options["max"], f"{node_id}.{name}"
    # ComfyUI calls FUNCTION with the inputs as keyword arguments; optional ones may be absent.
    parameters = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    assert set(inputs) <= set(parameters), f"{node_id}.{cls.FUNCTION} lacks {set(inputs) - set(parameters)}"
    for name in sections.get("optional", {}):
        assert parameters[name].default is not inspect.Parameter.empty, f"{node_id}.{name} needs a default"


def test_model_lists_come_from_the_host_folders(models):
    lists = {cls: _sections(pack.NODE_CLASS_MAPPINGS[cls])["required"][name][0] for cls, name in (
        ("W22ModelLoader", "model_name"), ("W22TextEncoderLoader", "text_encoder_name"), ("W22VAELoader", "vae_name"))}
    assert set(lists["W22ModelLoader"]) == {n for n, v in TINY_MODELS.items() if v[0] == "diffusion_models"}
    assert lists["W22TextEncoderLoader"] == ["umt5_xxl_fp8_e4m3fn_scaled.safetensors"]
    assert lists["W22VAELoader"] == ["wan2.2_vae.safetensors", "wan_2.1_vae.safetensors"]


def test_attention_choices_are_the_installed_backends_plus_auto():
    from wan_core.ops.attention import available_backends

    choices = _sections(loaders.W22ModelLoader)["required"]["attention"][0]
    assert choices == ["auto", *available_backends()]


# --- running the nodes --------------------------------------------------------------------------

def _load(name: str, **options):
    defaults = {"weight_dtype": "fp32", "quantization": "none", "attention": "auto"}
    out = loaders.W22ModelLoader().load(name, **{**defaults, **options})
    return out["result"][0], out["ui"]["text"][0]


def _encoder():
    return loaders.W22TextEncoderLoader().load("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "fp32", "default")[0]


def _vae(name: str):
    return loaders.W22VAELoader().load(name, "fp32")["result"][0]


SAMPLER_DEFAULTS = dict(seed=7, steps=3, solver="unipc", denoise=1.0)


def _sample(high, conditioning, latent, *, low=None, memory=None, **overrides):
    settings = {**SAMPLER_DEFAULTS, "shift": high.task.sample_shift, "boundary": 0.0,
                "cfg_high_noise": 4.0, "cfg_low_noise": 3.0, **overrides}
    return samplers.W22MoESampler().run(high, conditioning, latent, low_noise_model=low, memory=memory,
                                        **settings)[0]


def _decode(vae, latent, **tiling):
    settings = {"tiled": False, "tile_size": 256, "tile_overlap": 64, **tiling}
    return samplers.W22Decode().decode(vae, latent, **settings)[0]


def _library_latent(task, experts, vae, encoder, prompt, *, image=None, cfg=(3.0, 4.0)):
    """What wan_core.pipeline.generate makes of the same request (its final latent)."""
    return pipeline.generate(task, experts=experts, vae=vae.vae, text_encoder=encoder.hosted.model, prompt=prompt,
                             negative_prompt=DEFAULT_NEGATIVE_PROMPT, size=(TINY["width"], TINY["height"]),
                             frame_num=TINY["length"], image=image, steps=SAMPLER_DEFAULTS["steps"],
                             shift=task.sample_shift, guide_scale=cfg if task.is_moe else cfg[1],
                             seed=SAMPLER_DEFAULTS["seed"], allow_any_size=True, output="latent")


def test_t2v_with_two_experts_matches_the_library_and_decodes_to_image_frames(models):
    high, shown = _load("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", quantization="fp8_e4m3fn")
    low, _ = _load("wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", quantization="fp8_e4m3fn")
    assert high.task.name == "t2v-A14B" and shown.startswith("t2v-A14B: t2v DiT")
    assert shown.endswith("attention sdpa (auto: sdpa is the only back-end on cpu)")  # which back-end runs
    encoder, vae = _encoder(), _vae("wan_2.1_vae.safetensors")
    prompt = "a red fox in the snow"
    (conditioning,) = samplers.W22TextEncode().encode(encoder, prompt, "")  # empty: the default negative
    (latent,) = samplers.W22VideoLatent().make(high, batch_size=1, **TINY)
    assert latent["samples"].shape == (1, 16, 2, 8, 8)

    result = _sample(high, conditioning, latent, low=low)
    expected = _library_latent(TASKS["t2v-A14B"], (high.module, low.module), vae, encoder, prompt)
    torch.testing.assert_close(result["samples"], expected, rtol=0, atol=0)  # the same code path: bit-identical
    only_high = _sample(high, conditioning, latent)  # no low-noise expert: the high one runs every step
    assert not torch.equal(only_high["samples"], result["samples"])

    images = _decode(vae, result)
    assert images.shape == (5, 64, 64, 3) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    direct = vae.vae.decode(result["samples"])  # [1, 3, F, H, W] in [-1, 1]
    torch.testing.assert_close(images, (direct[0].permute(1, 2, 3, 0) + 1) / 2, rtol=0, atol=0)
    tiled = _decode(vae, result, tiled=True, tile_size=48, tile_overlap=16)
    direct_tiled = vae.vae.decode(result["samples"], tile=Tiling(tile_size=(48, 48), overlap=(16, 16)))
    torch.testing.assert_close(tiled, (direct_tiled[0].permute(1, 2, 3, 0) + 1) / 2, rtol=0, atol=0)
    assert not torch.equal(tiled, images)


def test_i2v_start_image_sets_the_condition_and_matches_the_library(models, start_image):
    high, _ = _load("wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors")
    low, _ = _load("wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors")
    encoder, vae = _encoder(), _vae("wan_2.1_vae.safetensors")
    prompt = "the picture comes to life"
    (conditioning,) = samplers.W22TextEncode().encode(encoder, prompt, DEFAULT_NEGATIVE_PROMPT)
    (latent,) = samplers.W22VideoLatent().make(high, batch_size=2, vae=vae, start_image=start_image, **TINY)
    assert latent["samples"].shape == (2, 16, 2, 8, 8)
    assert latent["wan22"]["y"].shape == (1, 20, 2, 8, 8)  # 4 mask + 16 image-latent channels

    result = _sample(high, conditioning, latent, low=low, cfg_high_noise=3.5, cfg_low_noise=3.5,
                     memory=samplers.W22MemorySettings().settings(True)[0])
    expected = _library_latent(TASKS["i2v-A14B"], (high.module, low.module), vae, encoder, prompt,
                               image=start_image, cfg=(3.5, 3.5))
    # the library generates one video; a batch of two runs other fp32 kernels: rounding-level differences
    torch.testing.assert_close(result["samples"][:1], expected, rtol=0, atol=1e-4)
    assert not torch.equal(result["samples"][0], result["samples"][1])  # the batch's videos differ
    assert _decode(vae, result).shape == (10, 64, 64, 3)  # two videos of 5 frames, one after the other


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_ti2v_one_model_with_and_without_a_start_image(models, start_image, with_image):
    model, shown = _load("wan2.2_ti2v_5B_fp16.safetensors", weight_dtype="fp32")
    assert model.task.name == "ti2v-5B" and model.task.boundary is None and "ti2v" in shown
    encoder, vae = _encoder(), _vae("wan2.2_vae.safetensors")
    prompt = "a sailboat on a bright bay"
    (conditioning,) = samplers.W22TextEncode().encode(encoder, prompt, DEFAULT_NEGATIVE_PROMPT)
    image = start_image if with_image else None
    extra = {"vae": vae, "start_image": image} if with_image else {}
    (latent,) = samplers.W22VideoLatent().make(model, batch_size=1, **extra, **TINY)
    assert latent["samples"].shape == (1, 48, 2, 4, 4)
    assert (latent["wan22"]["first_frame_latent"] is not None) == with_image

    result = _sample(model, conditioning, latent, cfg_high_noise=5.0)
    expected = _library_latent(TASKS["ti2v-5B"], model.module, vae, encoder, prompt, image=image, cfg=(5.0, 5.0))
    torch.testing.assert_close(result["samples"], expected, rtol=0, atol=0)
    if with_image:  # the first latent frame is held at the image's latent
        assert torch.equal(result["samples"][:, :, :1], latent["wan22"]["first_frame_latent"])
    assert _decode(vae, result).shape == (5, 64, 64, 3)


def test_text_encode_reuses_the_embeddings_of_unchanged_prompts(models):
    encoder = _encoder()
    assert loaders.W22TextEncoderLoader().load("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "fp32", "default")[0] \
        is encoder  # one handle (and one cache) per file and options while it is in use
    (first,) = samplers.W22TextEncode().encode(encoder, "a cat", "blurry")
    (second,) = samplers.W22TextEncode().encode(encoder, "a dog", "blurry")
    assert second["context_null"] is first["context_null"]  # the unchanged negative: not encoded again
    direct = encoder.hosted.model.encode(["a dog"])[0]
    torch.testing.assert_close(second["context"], direct, rtol=0, atol=0)
    assert list(encoder.embeddings) == ["a cat", "a dog", "blurry"]  # least recently used first


def test_denoise_below_one_refines_the_input_latent(models):
    model, _ = _load("wan2.2_ti2v_5B_fp16.safetensors")
    (conditioning,) = samplers.W22TextEncode().encode(_encoder(), "waves", "")
    (latent,) = samplers.W22VideoLatent().make(model, batch_size=1, **TINY)
    first = _sample(model, conditioning, latent, cfg_high_noise=1.0)
    refined = _sample(model, conditioning, first, cfg_high_noise=1.0, denoise=0.5, steps=2)
    again = _sample(model, conditioning, first, cfg_high_noise=1.0, denoise=0.5, steps=2)
    assert torch.equal(refined["samples"], again["samples"])
    # closer to the latent it refines than a fresh generation is
    fresh = _sample(model, conditioning, latent, cfg_high_noise=1.0, seed=99)
    assert (refined["samples"] - first["samples"]).norm() < (fresh["samples"] - first["samples"]).norm()


@pytest.mark.parametrize("offload", [False, True])
def test_memory_settings_place_one_expert_at_a_time(models, monkeypatch, offload):
    """The sampler asks the host to place each expert when its steps begin; with
    offload_inactive_expert the high-noise expert is sent away before the low-noise one comes.
    (On this CPU-only machine both devices are the CPU, so the host calls are what is observed;
    they run for real.)"""
    high, _ = _load("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors")
    low, _ = _load("wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors")
    (conditioning,) = samplers.W22TextEncode().encode(_encoder(), "x", "")
    (latent,) = samplers.W22VideoLatent().make(high, batch_size=1, **TINY)
    names = {id(high.hosted): "high", id(low.hosted): "low"}
    events = []
    for verb in ("load_to_compute", "offload"):
        real = getattr(host, verb)

        def record(models, *args, real=real, verb=verb, **kwargs):
            models = list(models)
            events.extend((verb, names[id(m)]) for m in models)
            return real(models, *args, **kwargs)
        monkeypatch.setattr(host, verb, record)
    memory = samplers.W22MemorySettings().settings(offload)[0]
    _sample(high, conditioning, latent, low=low, memory=memory, steps=4)  # shift 12: 3 high-noise steps
    expected = [("load_to_compute", "high")] + [("offload", "high")] * offload + [("load_to_compute", "low")]
    assert events == expected


def test_memory_settings_check_and_pass_the_block_swap_settings():
    settings = samplers.W22MemorySettings().settings
    assert settings(False, "12", 2, "staged")[0] == {"offload_inactive_expert": False, "blocks_to_swap": 12,
                                                      "prefetch_blocks": 2, "swap_host_memory": "staged"}
    assert settings(True)[0]["blocks_to_swap"] == "auto"
    for args, message in [((True, "41"), "blocks_to_swap must be 'auto' or a whole number 0..40"),
                          ((True, "some"), "blocks_to_swap must be"), ((True, "2", 9), "prefetch_blocks must be"),
                          ((True, "2", 1, "disk"), "swap_host_memory must be one of")]:
        with pytest.raises(ValueError, match=message):
            settings(*args)


# --- bad input --------------------------------------------------------------------------------------

def test_bad_inputs_are_clear_errors_naming_the_input(models, start_image):
    t2v, _ = _load("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors")
    i2v, _ = _load("wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors")
    ti2v, _ = _load("wan2.2_ti2v_5B_fp16.safetensors")
    vae21, vae22 = _vae("wan_2.1_vae.safetensors"), _vae("wan2.2_vae.safetensors")
    (conditioning,) = samplers.W22TextEncode().encode(_encoder(), "x", "")
    make = samplers.W22VideoLatent().make

    with pytest.raises(ValueError, match="start_image"):
        make(i2v, batch_size=1, **TINY)
    with pytest.raises(TypeError, match="vae must come from Wan2.2 VAE Loader"):
        make(i2v, batch_size=1, start_image=start_image, **TINY)
    with pytest.raises(ValueError, match="Wan2.1 VAE"):
        make(i2v, batch_size=1, vae=vae22, start_image=start_image, **TINY)
    with pytest.raises(ValueError, match="takes no image"):
        make(t2v, batch_size=1, vae=vae21, start_image=start_image, **TINY)
    with pytest.raises(ValueError, match="4n\\+1"):
        make(t2v, batch_size=1, **{**TINY, "length": 6})
    with pytest.raises(ValueError, match="multiple of 32"):
        make(ti2v, batch_size=1, **{**TINY, "width": 48})

    (t2v_latent,) = make(t2v, batch_size=1, **TINY)
    with pytest.raises(ValueError, match="set up for t2v-A14B but the model is ti2v-5B"):
        _sample(ti2v, conditioning, t2v_latent)
    with pytest.raises(ValueError, match="high_noise_model is t2v-A14B but low_noise_model is i2v-A14B"):
        _sample(t2v, conditioning, t2v_latent, low=i2v)
    (ti2v_latent,) = make(ti2v, batch_size=1, **TINY)
    with pytest.raises(ValueError, match="disconnect low_noise_model"):
        _sample(ti2v, conditioning, ti2v_latent, low=ti2v)
    with pytest.raises(TypeError, match="conditioning must come from Wan2.2 Text Encode"):
        _sample(t2v, "a prompt", t2v_latent)
    with pytest.raises(ValueError, match="latent must be a video LATENT"):
        _sample(t2v, conditioning, {"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(ValueError, match="wan_2.1_vae with the A14B models"):
        _decode(vae22, t2v_latent)
    if "flash_attn" not in loaders.available_backends():
        with pytest.raises(ValueError, match="attention='flash_attn' is not installed here"):
            _load("wan2.2_ti2v_5B_fp16.safetensors", attention="flash_attn")
    with pytest.raises(FileNotFoundError, match="no_such.safetensors"):
        _load("no_such.safetensors")


def test_compiled_model_samples_what_the_eager_model_samples(models):
    """compile_blocks=True runs the blocks through torch.compile (new graphs appear) and the
    sampler's latent stays the eager one within fp32 rounding."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # graphs compiled by earlier tests would be reused without a capture
    name = "wan2.2_ti2v_5B_fp16.safetensors"
    eager, _ = _load(name)
    compiled, _ = _load(name, compile_blocks=True)
    assert compiled is not eager  # a separate cache entry
    encoder = _encoder()
    conditioning = samplers.W22TextEncode().encode(encoder, "a fox", "")[0]
    (latent,) = samplers.W22VideoLatent().make(compiled, batch_size=1, **TINY)
    graphs_before = counters["stats"]["unique_graphs"]
    a = _sample(compiled, conditioning, latent, steps=2)["samples"]
    assert counters["stats"]["unique_graphs"] > graphs_before
    b = _sample(eager, conditioning, latent, steps=2)["samples"]
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5
