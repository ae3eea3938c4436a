"""Our WanDiT against ComfyUI's own Wan model (comfy/ldm/wan/model.py) on the same tiny random
weights, built by wan_core.testing.comfy_model (the mapping bench/dit_speed.py --comfyui uses):
t2v, i2v (Wan2.2's, no CLIP branch) and ti2v with per-token timesteps. Needs a ComfyUI checkout
(COMFYUI_PATH, and its Python: see test_comfy_host.py); skips without one. Tolerance: fp32,
relative 1e-5 (max |ours - theirs| / max |theirs|)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

RTOL = 1e-5
ROOT = Path(__file__).resolve().parent.parent


def _comfy_paths():
    spec = importlib.util.spec_from_file_location("_wan22_comfy_host", Path(__file__).with_name("test_comfy_host.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._comfy_paths()


def test_matches_comfyuis_own_model():
    root, python = _comfy_paths()
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([str(python), str(ROOT / "tests" / "comfy_model_check.py"), str(root)], env=environment,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(r["variant"], r["case"]) for r in results] == [("t2v", "t=999,437"), ("i2v", "t=999,437"),
                                                            ("ti2v", "t=999,437"), ("ti2v", "per-token t")]
    for result in results:
        assert result["shape_ok"], result
        assert result["relative"] <= RTOL, result
