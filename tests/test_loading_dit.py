"""load_dit: every layout of one tiny model loads to the same parameters and outputs; fp8 kept
in fp8 computes what the dequantized model computes; bad input gets a clear error."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wan_core.configs import TASKS
from wan_core.loading import convert_layout, dequantize_fp8, load_dit, read_state_dict, split_fp8
from wan_core.ops.linear import FP8Linear, convert_linears_to_fp8, fp8_to_dtype, quantize_fp8
from wan_core.testing import DIT_LAYOUTS, dit_state_dict, tiny_dit_config, write_dit_checkpoint

VARIANTS = ("t2v", "i2v", "ti2v")
FP8_LAYOUTS = ("comfy_fp8_scaled", "comfy_fp8_quant")
SEED = 7


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("dit_layouts")
    return {(v, layout): write_dit_checkpoint(root / f"{v}_{layout}", v, layout, seed=SEED)
            for v in VARIANTS for layout in DIT_LAYOUTS}


def inputs(variant: str, seed: int = 0):
    config = tiny_dit_config(variant)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16 if variant == "i2v" else config.in_dim, 3, 4, 6, generator=g)
    y = torch.randn(1, config.in_dim - 16, 3, 4, 6, generator=g) if variant == "i2v" else None
    context = [torch.randn(5, config.text_dim, generator=g)]
    return x, torch.tensor([637.0]), context, y


def run(model, variant):
    dtype = model.patch_embedding.weight.dtype
    x, t, context, y = inputs(variant)
    with torch.no_grad():
        return model(x.to(dtype), t, [c.to(dtype) for c in context], y=None if y is None else y.to(dtype))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_layout_loads_the_same_model(checkpoints, variant):
    reference = dit_state_dict(tiny_dit_config(variant), seed=SEED)
    outputs = {}
    for layout in DIT_LAYOUTS:
        model = load_dit(checkpoints[(variant, layout)], dtype=torch.float32)
        assert model.config == tiny_dit_config(variant), layout
        params = model.state_dict()
        assert params.keys() == reference.keys(), layout
        if layout in FP8_LAYOUTS:
            stored = convert_layout(read_state_dict(checkpoints[(variant, layout)]), "dit")[0]
            quantized = set(split_fp8(stored)[1])
            assert len(quantized) == 2 * 10 + 5  # the factory's fp8 Linears; all else is exact
            for k, v in reference.items():
                want = fp8_to_dtype(*quantize_fp8(v), torch.float32) if k in quantized else v
                assert torch.equal(params[k], want), (layout, k)
        else:
            assert all(torch.equal(params[k], reference[k]) for k in reference), layout
        outputs[layout] = run(model, variant)
    # The parameters are equal bit for bit (above); the outputs only to rounding, because MKL's
    # AVX-512 float32 kernels give results that depend on how the memory-mapped tensors are
    # aligned, which differs between layouts.
    for layout in DIT_LAYOUTS:
        base = "comfy_fp8_scaled" if layout in FP8_LAYOUTS else "official"
        error = (outputs[layout] - outputs[base]).abs().max() / outputs[base].abs().max()
        assert error <= 1e-5, (layout, error.item())
    # fp8 changes the numbers a little, not the model
    fp8_err = (outputs["comfy_fp8_scaled"] - outputs["official"]).abs().max() / outputs["official"].abs().max()
    assert 0 < fp8_err < 0.1


def test_load_to_bf16_and_from_a_dict(checkpoints):
    reference = dit_state_dict(tiny_dit_config("t2v"), seed=SEED)
    model = load_dit(checkpoints[("t2v", "comfy_prefixed")], dtype=torch.bfloat16)
    params = model.state_dict()
    assert all(params[k].dtype == torch.bfloat16 and torch.equal(params[k], v.bfloat16()) for k, v in reference.items())
    from_dict = load_dit(read_state_dict(checkpoints[("t2v", "diffusers_file")]), dtype=torch.float32)
    assert all(torch.equal(from_dict.state_dict()[k], v) for k, v in reference.items())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_quant_metadata_in_header_alone_is_enough(checkpoints, tmp_path):
    """Files that describe their fp8 layers only in the header's _quantization_metadata."""
    source = checkpoints[("ti2v", "comfy_fp8_quant")]
    tensors = {k: v for k, v in read_state_dict(source).items() if not k.endswith(".comfy_quant")}
    from safetensors import safe_open
    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(tmp_path / "meta_only.safetensors"), metadata=metadata)
    a = load_dit(tmp_path / "meta_only.safetensors", dtype=torch.float32).state_dict()
    b = load_dit(source, dtype=torch.float32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


# ---------------------------------------------------------------------------------------------
# fp8 kept in fp8


@pytest.mark.parametrize("layout", ["comfy_fp8_scaled", "comfy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_model_computes_what_the_dequantized_model_computes(checkpoints, layout, dtype):
    """quant="fp8_e4m3fn": block Linears stay fp8 (from an fp8 file as stored, from a bf16/fp32
    file quantized per tensor). Its output must equal that of an ordinary model built from
    the dequantized weights. Tolerance: max |diff| <= 1e-6 x max |output| (both dequantize
    with the same rounding, so any larger difference is a loading error)."""
    source = checkpoints[("i2v", layout)]
    fp8_model = load_dit(source, dtype=dtype, quant="fp8_e4m3fn")
    block_linears = [m for m in fp8_model.blocks.modules() if isinstance(m, FP8Linear)]
    assert len(block_linears) == 2 * 10 and all(m.weight.dtype == torch.float8_e4m3fn for m in block_linears)
    assert not any(type(m) is torch.nn.Linear for m in fp8_model.blocks.modules())

    state_dict = read_state_dict(source)
    if layout == "comfy":  # quantize the same tensors the loader quantized, then dequantize
        for name, module in fp8_model.blocks.named_modules():
            if isinstance(module, FP8Linear):
                stored, scale = quantize_fp8(state_dict[f"blocks.{name}.weight"])
                state_dict[f"blocks.{name}.weight"] = stored
                state_dict[f"blocks.{name}.weight_scale"] = scale
    plain_model = load_dit(dequantize_fp8(state_dict, dtype), dtype=dtype)
    a, b = run(fp8_model, "i2v"), run(plain_model, "i2v")
    assert a.dtype == b.dtype == torch.float32  # the head runs in float32, as in the reference
    assert (a.float() - b.float()).abs().max() <= 1e-6 * b.float().abs().max()


def test_fp8_parameter_memory_is_about_half():
    """Each fp8 block weight takes 1 byte instead of 2 plus a 4-byte scale: exact accounting on
    a tiny model, and the ratio at full t2v-A14B size (meta device, nothing allocated)."""
    def nbytes(module):
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])

    from wan_core.dit import WanDiT

    for config in (tiny_dit_config("t2v"), TASKS["t2v-A14B"].dit):
        with torch.device("meta"):
            bf16 = WanDiT(config).to(torch.bfloat16)
            fp8 = WanDiT(config).to(torch.bfloat16)
        names = convert_linears_to_fp8(fp8.blocks, bias_dtype=torch.bfloat16)
        weights = sum(bf16.blocks.get_submodule(n).weight.numel() for n in names)
        assert nbytes(fp8) == nbytes(bf16) - weights + 4 * len(names)
    assert nbytes(fp8) / nbytes(bf16) < 0.51  # 14.5 GB instead of 28.6 GB at full size


def test_fp8_linear_rejects_non_fp8_storage():
    with pytest.raises(ValueError, match="fp8_dtype"):
        FP8Linear(4, 4, fp8_dtype=torch.float16)


# ---------------------------------------------------------------------------------------------
# Bad input: each error names the file and says what was expected


def test_truncated_safetensors(checkpoints, tmp_path):
    data = checkpoints[("t2v", "comfy")].read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors is not a readable safetensors file \(truncated"):
        load_dit(bad)


def _few_tensors(manifest_dir: Path, manifest: str, count: int = 6) -> dict[str, torch.Tensor]:
    names = sorted(json.loads((manifest_dir / f"{manifest}.json").read_text())["tensors"])[:count]
    return {name: torch.zeros(2, 2) for name in names}


@pytest.mark.parametrize("manifest, what", [("official_vae_2_1", "a Wan VAE"),
                                            ("diffusers_vae_2_1", "a Wan VAE"),
                                            ("hf_umt5_xxl_encoder", "a umt5 text encoder"),
                                            ("official_umt5_xxl_encoder", "a umt5 text encoder")])
def test_other_model_kinds_are_named(manifest_dir, tmp_path, manifest, what):
    tensors = _few_tensors(manifest_dir, manifest)
    marker = {"official_vae_2_1": "decoder.conv1.weight", "diffusers_vae_2_1": "decoder.conv_in.weight",
              "hf_umt5_xxl_encoder": "encoder.block.0.layer.0.SelfAttention.q.weight",
              "official_umt5_xxl_encoder": "token_embedding.weight"}[manifest]
    assert marker in json.loads((manifest_dir / f"{manifest}.json").read_text())["tensors"]
    tensors[marker] = torch.zeros(2, 2)
    path = tmp_path / f"{manifest}.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=rf"{manifest}\.safetensors holds {what}, not a Wan diffusion transformer"):
        load_dit(path)


class NotATensor:
    pass


def test_pth_with_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "payload.pth"
    torch.save({"patch_embedding.weight": torch.zeros(2), "extra": NotATensor()}, path)
    with pytest.raises(ValueError, match=r"payload\.pth was refused: .*weights_only=True"):
        load_dit(path)


def test_missing_shard(checkpoints, tmp_path):
    import shutil
    folder = tmp_path / "official"
    shutil.copytree(checkpoints[("t2v", "official")], folder)
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"index\.json lists 2 shards but "
                                                r"\['diffusion_pytorch_model-00002-of-00002\.safetensors'\] is missing"):
        load_dit(folder)


def test_unknown_layout(tmp_path):
    path = tmp_path / "mystery.safetensors"
    save_file({"encoder.layers.0.weight": torch.zeros(2), "lm.bias": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match=r"mystery\.safetensors is not a Wan diffusion transformer \(DiT\) in any "
                                         r"known layout"):
        load_dit(path)


def test_incomplete_dit(checkpoints, tmp_path):
    tensors = read_state_dict(checkpoints[("t2v", "comfy")])
    del tensors["blocks.1.cross_attn.k.weight"]
    path = tmp_path / "partial.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"partial\.safetensors .* 1 missing \(e\.g\. \['blocks\.1\.cross_attn\.k\.weight'\]\)"):
        load_dit(path)


def test_a_t2v_file_with_stray_s2v_tensors_is_an_incomplete_s2v(checkpoints, tmp_path):
    tensors = read_state_dict(checkpoints[("t2v", "comfy")])
    tensors.update({"casual_audio_encoder.weights": torch.zeros(1, 25, 1), "frame_packer.proj.weight": torch.zeros(2, 2)})
    path = tmp_path / "s2v.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"s2v\.safetensors: it has S2V tensors but not .*incomplete S2V-14B"):
        load_dit(path)


def test_unsupported_comfy_quant_format(checkpoints, tmp_path):
    tensors = read_state_dict(checkpoints[("t2v", "comfy_fp8_quant")])
    key = "model.diffusion_model.blocks.0.ffn.0.comfy_quant"
    tensors[key] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    path = tmp_path / "nvfp4.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"nvfp4\.safetensors: layer 'blocks\.0\.ffn\.0' is quantized as 'nvfp4'"):
        load_dit(path)


def test_paths_and_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nowhere"):
        read_state_dict(tmp_path / "nowhere.safetensors")
    (tmp_path / "empty" / "transformer").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in folder .*empty.*\['transformer'\]"):
        read_state_dict(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"notes\.txt: unknown checkpoint file type"):
        read_state_dict(tmp_path / "notes.txt")
    with pytest.raises(TypeError, match="path or a dict of tensors"):
        read_state_dict(42)
    with pytest.raises(ValueError, match="quant='int4' is not supported"):
        load_dit({}, quant="int4")
    with pytest.raises(ValueError, match="dtype must be a torch float dtype"):
        load_dit({}, dtype=torch.float8_e4m3fn)


def test_config_detection_is_not_fooled_by_a_gap_in_the_blocks(checkpoints):
    from wan_core.loading import detect_dit_config
    shapes = {k: v.shape for k, v in read_state_dict(checkpoints[("t2v", "comfy")]).items()
              if not k.startswith("blocks.0.")}
    with pytest.raises(ValueError, match=r"not numbered 0\.\.0: missing \[0\]"):
        detect_dit_config(shapes)
    config = replace(tiny_dit_config("t2v"), num_layers=2)
    assert detect_dit_config(read_state_dict(checkpoints[("t2v", "comfy")])) == config
