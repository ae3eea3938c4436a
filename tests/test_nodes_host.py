"""nodes/host.py in plain mode (no ComfyUI): model folders, progress, interrupt, cache, devices."""
from __future__ import annotations

import gc
import importlib

import pytest
import torch
from siblings import sibling


sibling("test_workflows").load_pack()
host = importlib.import_module("comfyui_wan22_pack.nodes.host")


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    for rel in ("diffusion_models/a.safetensors", "diffusion_models/sub/b.pth", "diffusion_models/notes.txt",
                "vae/v.safetensors"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    monkeypatch.setenv(host.MODELS_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(host, "_plain_folders", {})
    return tmp_path


def test_plain_mode_is_detected():
    assert host.IN_COMFYUI is False


def test_models_listed_from_the_env_folder(models_dir):
    assert host.list_models("diffusion_models") == ["a.safetensors", "sub/b.pth"]
    assert host.list_models("text_encoders") == []
    assert host.model_path("diffusion_models", "sub/b.pth") == models_dir / "diffusion_models" / "sub" / "b.pth"


def test_explicit_folders_override_the_env(models_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    (other / "c.safetensors").write_bytes(b"x")
    host.set_model_folders("vae", [other])
    assert host.list_models("vae") == ["c.safetensors"]
    assert host.list_models("diffusion_models") == ["a.safetensors", "sub/b.pth"]


def test_missing_model_names_the_file_and_folders(models_dir):
    with pytest.raises(FileNotFoundError, match=r"'nope.safetensors'.*diffusion_models"):
        host.model_path("diffusion_models", "nope.safetensors")


def test_unknown_folder_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model folder kind 'upscale_models'"):
        host.list_models("upscale_models")


def test_step_callback_counts_steps_and_never_interrupts():
    callback = host.step_callback(3)
    for step in range(5):
        callback(step, None)
    assert callback.progress.current == 3  # clamped to the total like ComfyUI's bar
    host.check_interrupt()


def test_progress_callback_follows_the_loop_it_is_given():
    callback = host.progress_callback()
    callback(1, 4, torch.zeros(1))  # the sampler's callback(step, total, latent)
    assert (callback.progress.current, callback.progress.total) == (1, 4)
    callback(3, 4)  # the VAE's callback(done, total)
    assert (callback.progress.current, callback.progress.total) == (3, 4)


def test_model_cache_shares_live_models_and_forgets_dropped_ones():
    cache = host.ModelCache()
    loads = []

    def load():
        loads.append(1)
        return torch.nn.Linear(2, 2)

    first = cache.get_or_load(("k", 1), load)
    assert cache.get_or_load(("k", 1), load) is first and len(loads) == 1
    del first
    gc.collect()
    assert cache.keys() == []  # the owner let go: nothing of ours keeps the weights alive
    kept = cache.get_or_load(("k", 1), load)
    assert len(loads) == 2
    cache.clear()
    assert cache.keys() == [] and kept is not None


def test_hosted_model_moves_to_its_compute_device():
    module = torch.nn.Linear(2, 2)
    hosted = host.HostedModel(module, "diffusion", device=torch.device("cpu"))
    host.load_to_compute([hosted])
    assert hosted.model is module and hosted.module is module
    assert module.weight.device == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown model role"):
        host.HostedModel(module, "unet")
