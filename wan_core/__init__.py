"""wan_core: a plain PyTorch library for the Wan2.2 video models (no ComfyUI here).

Public API (see DESIGN.md): load_dit, load_vae, load_text_encoder, and
wan_core.sampling.sample. Heavy submodules import lazily so `import wan_core` is cheap.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "load_dit": "wan_core.loading",
    "load_vae": "wan_core.vae",
    "load_text_encoder": "wan_core.text",
    "WanDiT": "wan_core.dit",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wan_core' has no attribute {name!r}")
