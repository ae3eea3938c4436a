"""The Wan2.2 LoRA node and the sampler's step split, without ComfyUI: the 4-step Lightning
recipe with a LoRA on each expert (tiny random checkpoints and LoRAs under the release's file
names), checked against wan_core run on the same weights; the cached base model is unchanged."""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from wan_core import pipeline
from wan_core.lora import with_loras
from wan_core.testing import write_dit_checkpoint
from siblings import sibling


test_nodes = sibling("test_nodes")
host = importlib.import_module("comfyui_wan22_pack.nodes.host")
samplers = importlib.import_module("comfyui_wan22_pack.nodes.samplers")
lora_nodes = importlib.import_module("comfyui_wan22_pack.nodes.lora")

HIGH, LOW = "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"
# The 4-step Lightning LoRAs of ComfyUI's repackaged Wan2.2 release (split_files/loras/); tiny
# LightX2V-style ones under these names come with test_nodes.write_tiny_models.
LIGHTNING = {"t2v": ("wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors",
                     "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors"),
             "i2v": ("wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors",
                     "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors")}
LIGHTNING_SETTINGS = dict(seed=3, steps=4, shift=5.0, cfg_high_noise=1.0, cfg_low_noise=1.0, boundary=0.0,
                          solver="euler", denoise=1.0)


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    root = test_nodes.write_tiny_models(tmp_path_factory.mktemp("models"))
    write_dit_checkpoint(root / "loras" / "not_a_lora.safetensors", "t2v", "comfy", seed=1)
    return root


@pytest.fixture
def models(models_root, monkeypatch):
    monkeypatch.setattr(host, "_plain_folders", {})
    for kind in test_nodes.MODEL_FOLDERS:
        host.set_model_folders(kind, [models_root / kind])
    return models_root


def apply(model, name: str, strength: float = 1.0, **options):
    return lora_nodes.W22LoRA().apply(model, name, strength, **options)["result"][0]


@contextmanager
def count_forwards(*modules):
    """One list per module that grows by one entry at each forward of that module (the cached
    modules are shared with other tests: the hooks go when the block ends)."""
    counts = [[] for _ in modules]
    hooks = [m.register_forward_pre_hook(lambda *_, count=count: count.append(1)) for m, count in zip(modules, counts)]
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()


def lightning_run(high, low, conditioning, latent, **overrides):
    return test_nodes._sample(high, conditioning, latent, low=low, **{**LIGHTNING_SETTINGS, **overrides})["samples"]


def test_lightning_loras_on_each_expert_run_four_forwards_and_match_the_library(models):
    high, _ = test_nodes._load(HIGH)
    low, _ = test_nodes._load(LOW)
    encoder, vae = test_nodes._encoder(), test_nodes._vae("wan_2.1_vae.safetensors")
    prompt = "a lighthouse in a storm"
    (conditioning,) = samplers.W22TextEncode().encode(encoder, prompt, "")
    (latent,) = samplers.W22VideoLatent().make(high, batch_size=1, **test_nodes.TINY)
    stored = {k: v.clone() for k, v in {**high.module.state_dict(), **low.module.state_dict()}.items()}
    plain_before = lightning_run(high, low, conditioning, latent)

    high_lora, low_lora = apply(high, LIGHTNING["t2v"][0]), apply(low, LIGHTNING["t2v"][1], 0.8)
    assert high.loras == () and len(high_lora.loras) == 1 and high_lora.hosted is high.hosted  # same weights
    with count_forwards(high.module, low.module) as forwards:
        result = lightning_run(high_lora, low_lora, conditioning, latent)
    assert [len(f) for f in forwards] == [2, 2]  # CFG 1: no negative-prompt pass; the boundary splits 2 + 2

    loras = models / "loras"
    experts = (with_loras(high.module, [(loras / LIGHTNING["t2v"][0], 1.0)]),
               with_loras(low.module, [(loras / LIGHTNING["t2v"][1], 0.8)]))
    expected = pipeline.generate("t2v-A14B", experts=experts, vae=vae.vae, text_encoder=encoder.hosted.model,
                                 prompt=prompt, size=(test_nodes.TINY["width"], test_nodes.TINY["height"]),
                                 frame_num=test_nodes.TINY["length"], steps=4, shift=5.0, guide_scale=(1.0, 1.0),
                                 solver="euler", seed=LIGHTNING_SETTINGS["seed"], allow_any_size=True,
                                 output="latent")
    torch.testing.assert_close(result, expected, rtol=0, atol=0)  # the same code path: bit-identical
    assert not torch.equal(result, plain_before)

    # the cached models are the files' weights again for a graph without the LoRAs
    assert torch.equal(lightning_run(high, low, conditioning, latent), plain_before)
    for name, value in {**high.module.state_dict(), **low.module.state_dict()}.items():
        assert torch.equal(value, stored[name]), name


def test_lora_on_fp8_kept_experts_changes_the_result_and_leaves_the_model(models):
    high, _ = test_nodes._load(HIGH, quantization="fp8_e4m3fn")
    low, _ = test_nodes._load(LOW, quantization="fp8_e4m3fn")
    (conditioning,) = samplers.W22TextEncode().encode(test_nodes._encoder(), "x", "")
    (latent,) = samplers.W22VideoLatent().make(high, batch_size=1, **test_nodes.TINY)
    fp8_before = high.module.blocks[0].self_attn.q.weight.clone()
    plain = lightning_run(high, low, conditioning, latent)
    patched = lightning_run(apply(high, LIGHTNING["t2v"][0]), apply(low, LIGHTNING["t2v"][1]), conditioning, latent)
    assert torch.isfinite(patched).all() and not torch.equal(patched, plain)
    assert torch.equal(lightning_run(high, low, conditioning, latent), plain)
    assert high.module.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(high.module.state_dict()["blocks.0.self_attn.q.weight"].view(torch.uint8), fp8_before.view(torch.uint8))


def test_chained_lora_nodes_stack_and_strength_zero_changes_nothing(models):
    high, _ = test_nodes._load(HIGH)
    first = apply(high, LIGHTNING["t2v"][0], 0.5)
    both = apply(first, LIGHTNING["t2v"][1], -0.25)  # any LoRA for the same model shape stacks
    assert [(Path(lora.name).name, s) for lora, s in both.loras] == [(LIGHTNING["t2v"][0], 0.5),
                                                                     (LIGHTNING["t2v"][1], -0.25)]
    assert apply(high, LIGHTNING["t2v"][0], 0.0).loras == ()
    shown = lora_nodes.W22LoRA().apply(first, LIGHTNING["t2v"][1], 1.0)["ui"]["text"][0]
    assert f"LoRA {LIGHTNING['t2v'][0]}: comfy LoRA" in shown and "strength 0.5" in shown


def test_split_by_steps_gives_the_high_noise_expert_the_first_n_steps(models):
    high, _ = test_nodes._load(HIGH)
    low, _ = test_nodes._load(LOW)
    (conditioning,) = samplers.W22TextEncode().encode(test_nodes._encoder(), "x", "")
    (latent,) = samplers.W22VideoLatent().make(high, batch_size=1, **test_nodes.TINY)
    with count_forwards(high.module, low.module) as forwards:
        by_boundary = lightning_run(high, low, conditioning, latent)
        assert [len(f) for f in forwards] == [2, 2]
        same = lightning_run(high, low, conditioning, latent, split="steps", high_noise_steps=2)
        assert torch.equal(same, by_boundary) and [len(f) for f in forwards] == [4, 4]
        lightning_run(high, low, conditioning, latent, split="steps", high_noise_steps=3)
        assert [len(f) for f in forwards] == [7, 5]

    ti2v, _ = test_nodes._load("wan2.2_ti2v_5B_fp16.safetensors")
    (ti2v_latent,) = samplers.W22VideoLatent().make(ti2v, batch_size=1, **test_nodes.TINY)
    with pytest.raises(ValueError, match="split='steps' shares the steps between two experts, but ti2v-5B"):
        test_nodes._sample(ti2v, conditioning, ti2v_latent, split="steps", high_noise_steps=2)
    with pytest.raises(ValueError, match=r"high_noise_steps must be a whole number in 0\.\.steps \(4\)"):
        lightning_run(high, low, conditioning, latent, split="steps", high_noise_steps=5)
    with pytest.raises(ValueError, match="split='halves' is not one of"):
        lightning_run(high, low, conditioning, latent, split="halves")


def test_lora_node_bad_inputs_are_clear_errors(models):
    t2v, _ = test_nodes._load(HIGH)
    with pytest.raises(ValueError, match=r"not_a_lora\.safetensors holds a Wan diffusion transformer \(DiT\), not a LoRA"):
        apply(t2v, "not_a_lora.safetensors")
    with pytest.raises(FileNotFoundError, match="no_such_lora.safetensors"):
        apply(t2v, "no_such_lora.safetensors")
    with pytest.raises(TypeError, match="model must come from Wan2.2 Model Loader or Wan2.2 LoRA"):
        apply("a model", LIGHTNING["t2v"][0])
    with pytest.raises(ValueError, match="strength must be a finite number"):
        apply(t2v, LIGHTNING["t2v"][0], float("inf"))
    with pytest.raises(ValueError, match="unmatched_keys='ignore' is not one of"):
        apply(t2v, LIGHTNING["t2v"][0], unmatched_keys="ignore")
    # an i2v LoRA on the t2v expert: its patch embedding takes 36 channels, not 16
    with pytest.raises(ValueError, match=r"1 keys of .*i2v_lightx2v.* match no layer of "
                                         r"wan2\.2_t2v_high_noise_14B_fp8_scaled\.safetensors.*patch_embedding\.diff"):
        apply(t2v, LIGHTNING["i2v"][0])
    assert len(apply(t2v, LIGHTNING["i2v"][0], unmatched_keys="skip").loras) == 1
