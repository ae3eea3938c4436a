"""The nodes' side of issue 15: official folders as one Model Loader entry, previews of the
denoised estimate, the node's own input names in errors, a wrong VAE caught before sampling,
short route errors without server folders, and model names that say what is loaded."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wan_core.preview import RGB_PROJECTIONS, latent_to_rgb
from wan_core.testing import write_dit_checkpoint
from siblings import sibling


nodes_tests = sibling("test_nodes")
host = importlib.import_module("comfyui_wan22_pack.nodes.host")
loaders = importlib.import_module("comfyui_wan22_pack.nodes.loaders")
samplers = importlib.import_module("comfyui_wan22_pack.nodes.samplers")
models = nodes_tests.models
models_root = nodes_tests.models_root
TINY = nodes_tests.TINY


@pytest.fixture
def official_folder(tmp_path, monkeypatch):
    """models/diffusion_models holding an official release folder (two shards + index) and a
    stray shard with no index beside a single-file model."""
    root = tmp_path / "diffusion_models"
    write_dit_checkpoint(root / "Wan2.2-TI2V-5B", "ti2v", "official", seed=11)
    write_dit_checkpoint(root / "single.safetensors", "t2v", "comfy", seed=12)
    (root / "loose").mkdir()
    (root / "loose" / "model-00002-of-00003.safetensors").write_bytes(b"x")
    monkeypatch.setattr(host, "_plain_folders", {})
    host.set_model_folders("diffusion_models", [root])
    return root


def test_an_official_folder_is_one_loader_entry_and_loads(official_folder):
    listed = loaders.W22ModelLoader.INPUT_TYPES()["required"]["model_name"][0]
    index = "Wan2.2-TI2V-5B/diffusion_pytorch_model.safetensors.index.json"
    assert listed == [index, "single.safetensors"]  # no shard offered alone
    model, shown = nodes_tests._load(index)
    assert model.task.name == "ti2v-5B" and shown.startswith("ti2v-5B: ti2v DiT")
    assert loaders._model_info({"name": index})["task"] == "ti2v-5B"


def test_route_errors_are_short_and_name_no_server_folder(official_folder):
    with pytest.raises(FileNotFoundError) as missing:
        loaders._model_info({"name": "gone.safetensors"})
    assert str(missing.value) == ("gone.safetensors is not in models/diffusion_models: add it, then press "
                                  "Refresh")
    (official_folder / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError) as broken:
        loaders._model_info({"name": "broken.safetensors"})
    assert str(broken.value).startswith("broken.safetensors is not a Wan2.2 diffusion model: ")
    assert str(official_folder) not in str(broken.value) and "/" not in str(broken.value).split(": ", 1)[1]


def test_loaded_models_are_named_for_the_host(models):
    model, _ = nodes_tests._load("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors")
    assert model.hosted.label == "Wan2.2 t2v-A14B DiT (wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors)"
    assert nodes_tests._vae("wan2.2_vae.safetensors").hosted.label == "Wan2.2 VAE (wan2.2_vae.safetensors)"
    assert host._named(host._Managed, "Wan2.2 VAE (x)")(torch.nn.Linear(1, 1)).__class__.__name__ == "Wan2.2 VAE (x)"


# --- previews ------------------------------------------------------------------------------------------------

def test_latent_preview_projects_each_channel_with_the_published_factors():
    for channels, (factors, bias) in RGB_PROJECTIONS.items():
        assert len(factors) == channels and all(len(row) == 3 for row in factors) and len(bias) == 3
        latent = torch.zeros(channels, 3, 2, 2)
        assert (latent_to_rgb(latent) == np.uint8(((np.array(bias) + 1) / 2 * 255))).all()
        latent[5, 1] = 1.0  # channel 5 on in the middle frame only
        expected = ((np.array(bias) + np.array(factors[5]) + 1) / 2).clip(0, 1) * 255
        assert np.abs(latent_to_rgb(latent).astype(float) - expected).max() <= 1
        assert (latent_to_rgb(latent, frame=0) == latent_to_rgb(torch.zeros(channels, 1, 2, 2))).all()
    with pytest.raises(ValueError, match="C in \\[16, 48\\]"):
        latent_to_rgb(torch.zeros(4, 1, 2, 2))


def test_the_sampler_sends_a_preview_per_step_when_the_host_shows_previews(models, monkeypatch):
    model, _ = nodes_tests._load("wan2.2_ti2v_5B_fp16.safetensors")
    (conditioning,) = samplers.W22TextEncode().encode(nodes_tests._encoder(), "waves", "")
    (latent,) = samplers.W22VideoLatent().make(model, batch_size=1, **TINY)
    sent = []
    monkeypatch.setattr(host.Progress, "set", lambda self, current, total=None, preview=None:
                        sent.append((current, total, None if preview is None else preview.shape)))
    monkeypatch.setattr(host, "previews_enabled", lambda: False)
    nodes_tests._sample(model, conditioning, latent, steps=2, cfg_high_noise=1.0)
    assert sent == [(1, 2, None), (2, 2, None)]  # the host says no previews: none made
    sent.clear()
    monkeypatch.setattr(host, "previews_enabled", lambda: True)
    nodes_tests._sample(model, conditioning, latent, steps=2, cfg_high_noise=1.0)
    assert sent == [(1, 2, (4, 4, 3)), (2, 2, (4, 4, 3))]  # one [H/16, W/16] RGB picture per step


def test_plain_mode_shows_no_previews():
    assert host.previews_enabled() is False


# --- names and early checks -----------------------------------------------------------------------------------

def test_node_errors_use_the_nodes_input_names(models, start_image):
    t2v, _ = nodes_tests._load("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors")
    make = samplers.W22VideoLatent().make
    with pytest.raises(ValueError, match="length must be 4n\\+1") as error:
        make(t2v, batch_size=1, **{**TINY, "length": 6})
    assert "frame_num" not in str(error.value)
    with pytest.raises(ValueError, match="width x height 40\\*64: t2v-A14B needs width a multiple of 16"):
        make(t2v, batch_size=1, **{**TINY, "width": 40})
    (conditioning,) = samplers.W22TextEncode().encode(nodes_tests._encoder(), "x", "")
    (latent,) = make(t2v, batch_size=1, **TINY)
    for overrides, message in ((dict(cfg_high_noise=float("nan")), "cfg_high_noise / cfg_low_noise must be a finite"),
                               (dict(shift=float("inf")), "shift must be a finite number > 0"),
                               (dict(boundary=float("nan")), "boundary must be 0 \\(the model's own\\)"),
                               (dict(seed=-3), "seed must be a whole number in 0..")):
        with pytest.raises(ValueError, match=message):
            nodes_tests._sample(t2v, conditioning, latent, **overrides)
    grey = torch.full((1, 64, 64, 3), float("nan"))
    i2v, _ = nodes_tests._load("wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors")
    with pytest.raises(ValueError, match="start_image has NaN or infinite values"):
        make(i2v, batch_size=1, vae=nodes_tests._vae("wan_2.1_vae.safetensors"), start_image=grey, **TINY)


def test_a_wrong_vae_on_the_video_latent_fails_before_sampling(models):
    ti2v, _ = nodes_tests._load("wan2.2_ti2v_5B_fp16.safetensors")
    with pytest.raises(ValueError, match="ti2v-5B works with the Wan2.2 VAE but the vae input is Wan2.1"):
        samplers.W22VideoLatent().make(ti2v, batch_size=1, vae=nodes_tests._vae("wan_2.1_vae.safetensors"), **TINY)
    (latent,) = samplers.W22VideoLatent().make(ti2v, batch_size=1, vae=nodes_tests._vae("wan2.2_vae.safetensors"),
                                               **TINY)
    assert latent["samples"].shape == (1, 48, 2, 4, 4)


@pytest.fixture(scope="module")
def start_image(tmp_path_factory):
    return nodes_tests.comfy_image(nodes_tests.write_start_image(tmp_path_factory.mktemp("input") / "s.png"))


def test_every_example_workflow_connects_the_vae_to_the_video_latent():
    """So that a VAE of the wrong family fails at the latent, before sampling, not at decode."""
    for path in sorted((Path(__file__).resolve().parent.parent / "example_workflows").glob("*.json")):
        workflow = json.loads(path.read_text())
        nodes = {n["id"]: n for n in workflow["nodes"]}
        for node in nodes.values():
            if node["type"] == "W22VideoLatent":
                vae = next(i for i in node["inputs"] if i["name"] == "vae")
                assert vae["link"] is not None, path.name
                source = next(link for link in workflow["links"] if link[0] == vae["link"])[1]
                assert nodes[source]["type"] == "W22VAELoader", path.name
