"""Run by tests/test_comfy_model.py in ComfyUI's Python: ComfyUI's own WanModel built on our
tiny random weights (wan_core.testing.comfy_model) against ours, float32 on the CPU. Prints
one JSON line per case: max |ours - ComfyUI's| / max |ComfyUI's|. argv: the ComfyUI root."""
from __future__ import annotations

import json
import sys

import torch

from wan_core.dit import WanDiT
from wan_core.testing import dit_state_dict, tiny_dit_config
from wan_core.testing.comfy_model import comfyui_forward, comfyui_wan_model

GRID = (3, 4, 6)  # 18 tokens


def cases(config):
    yield "t=999,437", torch.tensor([999.0, 437.0])
    if config.model_type == "ti2v":  # per-token timesteps: the first latent frame's tokens at t = 0
        t = torch.full((2, 18), 812.0)
        t[:, :6] = 0
        yield "per-token t", t


if __name__ == "__main__":
    root = sys.argv[1]
    for variant in ("t2v", "i2v", "ti2v"):
        config = tiny_dit_config(variant)
        state_dict = dit_state_dict(config, seed=11)
        ours = WanDiT(config)
        ours.load_state_dict(state_dict)
        ours.eval()
        theirs = comfyui_wan_model(root, config, state_dict)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, config.in_dim, *GRID, generator=generator)
        text = torch.randn(2, 9, config.text_dim, generator=generator)
        context = torch.cat([text, text.new_zeros(2, config.text_len - 9, config.text_dim)], dim=1)
        for name, t in cases(config):
            with torch.no_grad():
                got, expected = ours(x, t, context), comfyui_forward(theirs, x, t, context)
            print(json.dumps({"variant": variant, "case": name, "shape_ok": got.shape == expected.shape,
                              "relative": ((got - expected).abs().max() / expected.abs().max()).item()}), flush=True)
