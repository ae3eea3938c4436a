"""The LoRA node: a Wan2.2 model in, the same model with one more LoRA out.

The loaded weights are shared and never changed: the node returns a new model handle that
carries its LoRAs, and the sampler runs the weights with them (wan_core.lora). Chain one node
per LoRA and per expert, so the high- and low-noise experts can take different LoRAs.
"""
from __future__ import annotations

import math
from dataclasses import replace

from wan_core.lora import load_lora, with_loras

from . import host
from .loaders import WanModel

UNMATCHED = ("error", "skip")


class W22LoRA:
    DESCRIPTION = ("Applies a LoRA from models/loras to one Wan2.2 model (ComfyUI/kohya, diffusers/PEFT "
                   "and LightX2V files, with their .diff/.diff_b/.diff_m entries). Chain it per expert: "
                   "the high- and low-noise experts take their own LoRAs and strengths (e.g. the 4-step "
                   "Lightning pair). The loaded model is not changed; the LoRA is merged into the "
                   "weights as they reach the GPU (fp8-kept weights are dequantised, merged in float32 "
                   "and re-quantised with a fresh scale).")
    CATEGORY = "Wan2.2/loaders"
    RETURN_TYPES = ("WANMODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with this LoRA added to the ones it already had.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("WANMODEL", {"tooltip": "From Wan2.2 Model Loader, or another Wan2.2 LoRA node."}),
            "lora_name": (host.list_models("loras"), {
                "tooltip": "The LoRA file in models/loras, e.g. "
                           "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors for the high-noise "
                           "expert."}),
            "strength": ("FLOAT", {
                "default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                "tooltip": "How much of the LoRA is added: weight + strength x delta. Negative subtracts "
                           "it; 0 leaves the model unchanged."}),
        }, "optional": {
            "unmatched_keys": (list(UNMATCHED), {
                "default": "error",
                "tooltip": "LoRA keys that match no layer of this model. error: stop and list them. "
                           "skip: apply the rest and log the skipped ones (a LoRA made for a variant with "
                           "layers this one lacks, e.g. a Wan2.1 I2V LoRA's image cross-attention). A "
                           "LoRA for a model of another size is refused either way."}),
        }}

    def apply(self, model: WanModel, lora_name: str, strength: float, unmatched_keys: str = "error"):
        if not isinstance(model, WanModel):
            raise TypeError(f"model must come from Wan2.2 Model Loader or Wan2.2 LoRA, got {type(model).__name__}")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise ValueError(f"strength must be a finite number, got {strength!r}")
        if unmatched_keys not in UNMATCHED:
            raise ValueError(f"unmatched_keys={unmatched_keys!r} is not one of {list(UNMATCHED)}")
        path = host.model_path("loras", lora_name)
        stat = path.stat()
        lora = host.model_cache.get_or_load(("lora", str(path), stat.st_size, stat.st_mtime_ns),
                                            lambda: load_lora(path))
        view = with_loras(model.module, [(lora, strength)], strict=unmatched_keys == "error",
                          model_name=model.name)
        patched = replace(model, loras=model.loras + view.loras)
        return {"ui": {"text": [patched.describe()]}, "result": (patched,)}


NODE_CLASS_MAPPINGS = {"W22LoRA": W22LoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"W22LoRA": "Wan2.2 LoRA"}
