"""DiT names and shapes against the real checkpoint layouts in the shared manifests.

Full-size models are built on the meta device: only names and shapes exist, nothing is
allocated. diffusers' own converter is the independent oracle for our diffusers rows.
"""
from __future__ import annotations

import json

import pytest
import torch

from wan_core.configs import TASKS
from wan_core.loading import convert_layout, detect_dit_config, split_fp8, to_layout
from wan_core.testing import DIT_LAYOUTS, dit_state_dict, layout_state_dict, tiny_dit_config

VARIANTS = [  # (task, official manifest, diffusers manifest)
    ("t2v-A14B", "official_t2v_A14B_expert", "diffusers_t2v_A14B_expert"),
    ("i2v-A14B", "official_i2v_A14B_expert", "diffusers_i2v_A14B_expert"),
    ("ti2v-5B", "official_ti2v_5B", "diffusers_ti2v_5B"),
]


def manifest_shapes(manifest_dir, name: str) -> dict[str, tuple[int, ...]]:
    tensors = json.loads((manifest_dir / f"{name}.json").read_text())["tensors"]
    return {k: tuple(shape) for k, (shape, _dtype) in tensors.items()}


def shapes_of(state_dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@pytest.mark.parametrize("task, official, diffusers", VARIANTS)
def test_diffusers_manifest_converts_to_official_manifest(manifest_dir, task, official, diffusers):
    converted, layouts = convert_layout(manifest_shapes(manifest_dir, diffusers), "dit")
    assert layouts == ("diffusers",)
    assert converted == manifest_shapes(manifest_dir, official)


@pytest.mark.parametrize("task, official, diffusers", VARIANTS)
def test_prefixed_diffusers_names_convert_too(manifest_dir, task, official, diffusers):
    prefixed = {"model.diffusion_model." + k: v for k, v in manifest_shapes(manifest_dir, diffusers).items()}
    converted, layouts = convert_layout(prefixed, "dit")
    assert layouts == ("comfy_prefixed", "diffusers")
    assert converted == manifest_shapes(manifest_dir, official)


@pytest.mark.parametrize("task, official, diffusers", VARIANTS)
def test_full_size_factory_writes_each_manifest(manifest_dir, task, official, diffusers):
    """The test factory at full size (meta) names and shapes every layout like the real files."""
    canonical = dit_state_dict(TASKS[task].dit, device="meta")
    expected = manifest_shapes(manifest_dir, official)
    assert shapes_of(canonical) == expected
    for layout in DIT_LAYOUTS:
        tensors, metadata = layout_state_dict(canonical, layout)
        if layout in ("official", "comfy", "pth"):
            assert shapes_of(tensors) == expected, layout
        elif layout == "comfy_prefixed":
            assert shapes_of(tensors) == {"model.diffusion_model." + k: v for k, v in expected.items()}
        elif layout in ("diffusers", "diffusers_file"):
            assert shapes_of(tensors) == manifest_shapes(manifest_dir, diffusers), layout
        else:  # ComfyUI fp8: the official tensors plus the fp8 bookkeeping of each quantized Linear
            plain, quantized = split_fp8(convert_layout(tensors, "dit")[0])
            assert {**shapes_of(plain), **{k: tuple(s.shape) for k, (s, _) in quantized.items()}} == expected
            # 4 attention matrices x 2 + 2 MLP matrices per block, and 5 embedding MLP layers
            assert len(quantized) == TASKS[task].dit.num_layers * 10 + 5
            assert all(s.dtype == torch.float8_e4m3fn for s, _ in quantized.values())
            if layout == "comfy_fp8_scaled":
                assert tensors["scaled_fp8"].dtype == torch.float8_e4m3fn
                assert sum(k.endswith(".scale_weight") for k in tensors) == len(quantized)
            else:
                assert sum(k.endswith(".comfy_quant") for k in tensors) == len(quantized)
                assert len(json.loads(metadata["_quantization_metadata"])["layers"]) == len(quantized)


@pytest.mark.parametrize("task, official, diffusers", VARIANTS)
def test_detect_config_from_real_shapes(manifest_dir, task, official, diffusers):
    assert detect_dit_config(manifest_shapes(manifest_dir, official)) == TASKS[task].dit


def test_detect_s2v_from_real_shapes(manifest_dir):
    config = detect_dit_config(manifest_shapes(manifest_dir, "official_s2v_14B"))
    assert (config.model_type, config.dim, config.num_layers, config.num_heads, config.in_dim) == ("s2v", 5120, 40, 40, 16)


def test_diffusers_rows_agree_with_diffusers_converter():
    """diffusers' own single-file converter (official -> diffusers) is the oracle for our rows."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    canonical = dit_state_dict(tiny_dit_config("i2v"), seed=3)
    ours = to_layout(canonical, "dit", ["diffusers"])
    theirs = convert_wan_transformer_to_diffusers(dict(canonical))
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert convert_layout(ours, "dit")[0].keys() == canonical.keys()


def test_diffusers_loads_our_diffusers_folder(tmp_path):
    """A diffusers-layout folder from the factory is a real diffusers checkpoint: diffusers
    builds the model from its config.json, and its strict load of the indexed shards (read by
    safetensors itself) takes exactly our values."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    from wan_core.testing import write_dit_checkpoint

    folder = write_dit_checkpoint(tmp_path / "transformer", "ti2v", "diffusers", seed=5)
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(folder))
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    state_dict = {}
    for shard in sorted(set(index["weight_map"].values())):
        state_dict.update(load_file(folder / shard))
    model.load_state_dict(state_dict, strict=True)
    expected = to_layout(dit_state_dict(tiny_dit_config("ti2v"), seed=5), "dit", ["diffusers"])
    got = model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
