"""Our LoRA merge against ComfyUI's own code (comfy.lora: its key map, load_lora, calculate_weight)
on the same tiny model and LoRA files: the rule for the entries diffusers drops, checked against
the program that defines it. Needs a ComfyUI checkout (COMFYUI_PATH, and its Python: see
test_comfy_host.py); skips without one. Tolerance: fp32, relative 1e-5 of each weight's max.

ComfyUI itself does not map LightX2V's `blocks.N.diff_m`; ComfyUI-WanVideoWrapper renames it to
`blocks.N.modulation.diff` before handing the LoRA to ComfyUI's loader, and so does the script.
"""
from __future__ import annotations

import subprocess

import torch
from safetensors.torch import load_file, save_file

from wan_core.lora import with_loras
from wan_core.testing import dit_state_dict, tiny_dit_config
from wan_core.testing.lora import lightx2v_lora, random_lora, write_lora
from siblings import sibling


comfy_host = sibling("test_comfy_host")
test_dit = sibling("test_dit")
STRENGTH = 0.75

# Runs in ComfyUI's Python: argv = ComfyUI root, model file, strength, then (LoRA file, output) pairs.
COMFY_MERGE = """
import sys
from types import SimpleNamespace
root, model_file, strength, *pairs = sys.argv[1:]
sys.path.insert(0, root)
import comfy.options
comfy.options.enable_args_parsing()
sys.argv = [sys.argv[0], "--cpu"]  # as the server runs here: no GPU
from safetensors.torch import load_file, save_file
import comfy.lora, comfy.lora_convert
state = load_file(model_file)
model = SimpleNamespace(state_dict=lambda: state, model_config=SimpleNamespace(unet_config={}))
key_map = comfy.lora.model_lora_keys_unet(model, {})
for lora_file, out_file in zip(pairs[::2], pairs[1::2]):
    lora = {k.replace(".diff_m", ".modulation.diff"): v for k, v in load_file(lora_file).items()}
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map, log_missing=False)
    merged = {k: comfy.lora.calculate_weight([(float(strength), p, 1.0, None, None)], state[k].float().clone(), k)
              for k, p in patches.items()}
    save_file({k[len("diffusion_model."):]: v.contiguous() for k, v in merged.items()}, out_file)
"""


def test_merged_weights_match_comfyui_for_each_format_it_reads(tmp_path):
    root, python = comfy_host._comfy_paths()
    config = tiny_dit_config("t2v")
    base = dit_state_dict(config, seed=31)
    model_file = tmp_path / "model.safetensors"
    save_file({f"diffusion_model.{k}": v for k, v in base.items()}, str(model_file))
    loras = {"lightx2v": write_lora(tmp_path / "lightx2v.safetensors", lightx2v_lora(config, seed=32), "comfy"),
             "kohya": write_lora(tmp_path / "kohya.safetensors", random_lora(config, alpha=2.0, seed=33), "kohya"),
             "kohya_fun": write_lora(tmp_path / "fun.safetensors", random_lora(config, alpha=2.0, seed=34),
                                     "kohya_fun")}
    outputs = {name: tmp_path / f"{name}_comfy.safetensors" for name in loras}
    run = subprocess.run([str(python), "-c", COMFY_MERGE, str(root), str(model_file), str(STRENGTH),
                          *[str(p) for name in loras for p in (loras[name], outputs[name])]],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]

    for name, path in loras.items():
        theirs = load_file(str(outputs[name]))
        view = with_loras(test_dit.our_model(config, base), [(path, STRENGTH)])
        view.base.set_weight_patches(view.weight_patches)
        ours = view.base.state_dict()
        changed = {k for k in ours if not torch.equal(ours[k], base[k])}
        assert changed == set(theirs), f"{name}: parameters changed by only one side: {changed ^ set(theirs)}"
        worst = max(theirs, key=lambda k: test_dit.relative_error(ours[k], theirs[k]))
        assert test_dit.relative_error(ours[worst], theirs[worst]) <= 1e-5, f"{name}: {worst}"
