"""LoRAs against diffusers (`load_lora_weights` + `fuse_lora` on WanTransformer3DModel, the oracle)
and against ComfyUI's rule for the entries diffusers drops; the base model never changes.

Each format's tiny LoRA is written with that format's real key names (wan_core.testing.lora);
diffusers reads the same file with its own converters, so a wrong name on our side shows up as a
difference. Tolerance: fp32, max |ours - diffusers| / max |diffusers| <= 1e-5, for every merged
parameter and for the DiT's output.
"""
from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import pytest
import torch

from wan_core.configs import TASKS, DiTConfig
from wan_core.dit import WanDiT
from wan_core.loading import convert_layout, load_dit
from wan_core.lora import LoraPatches, load_lora, with_loras
from wan_core.ops.linear import fp8_to_dtype, quantize_fp8
from wan_core.testing import dit_state_dict, tiny_dit_config, write_dit_checkpoint
from wan_core.testing.lora import (BLOCK_LINEARS, lightx2v_extras, lightx2v_lora, lora_in_format, random_lora,
                                   write_lora)

RTOL = 1e-5


def _test_dit():
    spec = importlib.util.spec_from_file_location("_wan22_test_dit", Path(__file__).with_name("test_dit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


test_dit = _test_dit()
relative_error = test_dit.relative_error


@pytest.fixture(scope="module")
def config():
    return tiny_dit_config("t2v")


@pytest.fixture(scope="module")
def base_state(config):
    return dit_state_dict(config, seed=21)


@pytest.fixture(scope="module")
def inputs(config):
    x, y, context = test_dit.sample_inputs(config, batch=1, seed=3)
    return x, torch.tensor([812.0]), context


def diffusers_fused(config, base_state, loras: list[tuple[Path, float]]):
    """diffusers' WanTransformer3DModel with the LoRA files loaded and fused at their strengths."""
    from diffusers import WanPipeline

    model = test_dit.diffusers_twin(config, base_state)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=None, scheduler=None)
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[strength for _, strength in loras])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
    return model


def diffusers_output(model, config, inputs):
    x, t, context = inputs
    with torch.no_grad():
        return model(x, t, test_dit.padded(context, config.text_len), return_dict=False)[0]


def merged_parameters(view) -> dict[str, torch.Tensor]:
    """The weights a LoRA view computes with (set on its base by the view, as before a forward)."""
    view.base.set_weight_patches(view.weight_patches)
    return dict(view.base.state_dict())


def assert_matches(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == expected.keys()
    errors = {k: relative_error(ours[k], expected[k]) for k in expected}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= RTOL, f"{worst}: {errors[worst]:.2e}"


@pytest.mark.parametrize("fmt, alpha", [("comfy", 2.0), ("comfy_lora_ab", None), ("kohya", 8.0), ("diffusers", 2.0)])
def test_each_format_merges_and_runs_like_diffusers(fmt, alpha, config, base_state, inputs, tmp_path):
    lora = random_lora(config, rank=4, alpha=alpha, seed=5)
    if alpha is not None:
        lora["blocks.1.ffn.2.alpha"] = torch.tensor(1.0)  # one pair with its own alpha
    path = write_lora(tmp_path / f"{fmt}.safetensors", lora, fmt)
    loaded = load_lora(path)
    assert loaded.format == {"comfy_lora_ab": "comfy"}.get(fmt, fmt)
    assert len(loaded.deltas) == config.num_layers * len(BLOCK_LINEARS)

    view = with_loras(test_dit.our_model(config, base_state), [(path, 0.8)])
    theirs = diffusers_fused(config, base_state, [(path, 0.8)])
    assert_matches(merged_parameters(view), convert_layout(theirs.state_dict(), "dit")[0])
    with torch.no_grad():
        got = view(*inputs)
    expected = diffusers_output(theirs, config, inputs)
    base_output = test_dit.our_model(config, base_state)(*inputs)
    assert relative_error(base_output, expected) > 0.05  # the LoRA changes the output clearly
    assert relative_error(got, expected) <= RTOL


def test_wan_fun_double_underscore_names_read_like_kohya(config, tmp_path):
    """Wan Fun's lora_unet__ names (ComfyUI's lora_convert strips the extra "_"; diffusers
    does not read them) give the same deltas as kohya's."""
    lora = random_lora(config, alpha=4.0, seed=6)
    kohya = load_lora(write_lora(tmp_path / "kohya.safetensors", lora, "kohya"))
    fun = load_lora(write_lora(tmp_path / "fun.safetensors", lora, "kohya_fun"))
    assert next(iter(lora_in_format(lora, "kohya_fun")[0])).startswith("lora_unet__blocks_0_")
    assert fun.deltas.keys() == kohya.deltas.keys()
    for target, delta in kohya.deltas.items():
        other = fun.deltas[target]
        assert other.scale == delta.scale and torch.equal(other.up, delta.up) and torch.equal(other.down, delta.down)


# ComfyUI's rule for a full difference (comfy/lora.py: x.diff -> x.weight, x.diff_b -> x.bias;
# LightX2V's blocks.N.diff_m -> blocks.N.modulation): weight += strength * diff.
def comfyui_target(entry: str) -> str:
    if entry.endswith(".diff_m"):
        return entry[: -len(".diff_m")] + ".modulation"
    return re.sub(r"\.diff_b$", ".bias", re.sub(r"\.diff$", ".weight", entry))


def test_lightx2v_entries_follow_diffusers_where_it_applies_them_and_comfyui_where_it_drops_them(
        config, base_state, inputs, tmp_path):
    paired = [f"blocks.{i}.{m}" for i in range(config.num_layers) for m in BLOCK_LINEARS
              if (i, m) != (0, "cross_attn.o")]
    applied = {**random_lora(config, alpha=4.0, seed=7, modules=paired), **lightx2v_extras(config, seed=8,
                                                                                           dropped_by_diffusers=False)}
    dropped = lightx2v_extras(config, seed=9, applied_by_diffusers=False)
    full_path = write_lora(tmp_path / "lightx2v.safetensors", {**applied, **dropped}, "comfy")
    applied_path = write_lora(tmp_path / "applied.safetensors", applied, "comfy")
    strength = 0.6

    theirs = diffusers_fused(config, base_state, [(full_path, strength)])
    reference = convert_layout(theirs.state_dict(), "dit")[0]
    # diffusers applies exactly the first group and drops the second
    assert_matches(reference, convert_layout(diffusers_fused(config, base_state, [(applied_path, strength)])
                                             .state_dict(), "dit")[0])
    expected = {k: v.clone() for k, v in reference.items()}
    for entry, diff in dropped.items():
        expected[comfyui_target(entry)] += strength * diff

    view = with_loras(test_dit.our_model(config, base_state), [(full_path, strength)])
    pairs = {k[: -len(".lora_up.weight")] + ".weight" for k in applied if k.endswith(".lora_up.weight")}
    diffs = {comfyui_target(k) for k in {**applied, **dropped} if ".diff" in k}
    assert set(load_lora(full_path).deltas) == pairs | diffs and not pairs & diffs
    assert_matches(merged_parameters(view), expected)
    with torch.no_grad():
        got = view(*inputs)
    assert relative_error(got, test_dit.our_model(config, expected)(*inputs)) <= RTOL
    assert relative_error(got, diffusers_output(theirs, config, inputs)) > 1e-3  # the dropped entries matter


def test_stacked_loras_with_strengths_match_diffusers_adapters(config, base_state, inputs, tmp_path):
    first = write_lora(tmp_path / "a.safetensors", random_lora(config, alpha=2.0, seed=10), "comfy")
    second = write_lora(tmp_path / "b.safetensors", random_lora(config, rank=2, alpha=1.0, seed=11,
                                                                modules=["blocks.0.self_attn.q", "blocks.1.ffn.0"]),
                        "diffusers")
    loras = [(first, 0.7), (second, -1.5)]
    theirs = diffusers_fused(config, base_state, loras)
    view = with_loras(test_dit.our_model(config, base_state), loras)
    assert_matches(merged_parameters(view), convert_layout(theirs.state_dict(), "dit")[0])
    with torch.no_grad():
        got = view(*inputs)
    assert relative_error(got, diffusers_output(theirs, config, inputs)) <= RTOL
    # a view of a view stacks the same way
    chained = with_loras(with_loras(view.base, [loras[0]]), [loras[1]])
    assert [(lora.name, s) for lora, s in chained.loras] == [(str(first), 0.7), (str(second), -1.5)]
    with torch.no_grad():
        assert torch.equal(chained(*inputs), got)  # the same merged weights: bit-identical


def test_base_weights_never_change_and_no_lora_gives_the_exact_base_outputs(config, base_state, inputs, tmp_path):
    model = test_dit.our_model(config, base_state)
    stored = {k: v for k, v in model.state_dict().items()}  # the tensors themselves
    copies = {k: v.clone() for k, v in stored.items()}
    with torch.no_grad():
        base_output = model(*inputs)
    path_a = write_lora(tmp_path / "a.safetensors", random_lora(config, alpha=2.0, seed=12), "comfy")
    path_b = write_lora(tmp_path / "b.safetensors", lightx2v_lora(config, seed=13), "comfy")
    view_a, view_b = with_loras(model, [(path_a, 1.0)]), with_loras(model, [(path_b, 0.5)])
    plain = with_loras(model, [])
    # a view reads as its base everywhere but in what it computes
    assert (view_a.config, view_a.dtype, view_a.device, view_a.attention_backend) == \
        (model.config, model.dtype, model.device, model.attention_backend)
    with torch.no_grad():
        out_a = view_a(*inputs)
        out_b = view_b(*inputs)  # two views of one base: each computes with its own LoRA
        assert torch.equal(view_a(*inputs), out_a)
        assert torch.equal(plain(*inputs), base_output)  # no LoRA: the exact base weights again
        assert not torch.equal(out_a, base_output) and not torch.equal(out_b, out_a)
    current = model.state_dict()  # after the plain view: the base weights in place again
    for name, tensor in stored.items():
        assert torch.equal(tensor, copies[name]), f"{name} was modified"
        assert torch.equal(current[name], copies[name]), f"{name} is not the base weight"


def test_bf16_merge_is_float32_rounded_once(config, base_state, tmp_path):
    bf16 = {k: v.to(torch.bfloat16) for k, v in base_state.items()}
    model = WanDiT(config)
    model.load_state_dict(bf16, assign=True)
    lora = random_lora(config, alpha=2.0, seed=15)
    view = with_loras(model, [(write_lora(tmp_path / "l.safetensors", lora, "comfy"), 0.5)])
    merged = merged_parameters(view)
    target = "blocks.1.ffn.0"
    delta = 0.5 * (2.0 / 4) * (lora[f"{target}.lora_up.weight"] @ lora[f"{target}.lora_down.weight"])
    expected = (bf16[f"{target}.weight"].float() + delta).to(torch.bfloat16)
    assert merged[f"{target}.weight"].dtype == torch.bfloat16
    assert relative_error(merged[f"{target}.weight"].float(), expected.float()) <= 2 ** -8  # one bf16 rounding
    assert torch.equal(merged["blocks.1.ffn.0.bias"], bf16["blocks.1.ffn.0.bias"])  # untouched entries stay


def test_fp8_weights_are_dequantised_merged_and_requantised(config, tmp_path):
    path = write_dit_checkpoint(tmp_path / "dit.safetensors", "t2v", "comfy_fp8_scaled", dtype=torch.bfloat16, seed=2)
    model = load_dit(path, dtype=torch.bfloat16, quant="fp8_e4m3fn")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = random_lora(config, alpha=4.0, seed=16)
    view = with_loras(model, [(write_lora(tmp_path / "l.safetensors", lora, "comfy"), 1.0)])
    merged = merged_parameters(view)
    target = "blocks.0.self_attn.v"
    real = fp8_to_dtype(base[f"{target}.weight"], base[f"{target}.weight_scale"], torch.float32)
    real += lora[f"{target}.lora_up.weight"] @ lora[f"{target}.lora_down.weight"]
    stored, scale = quantize_fp8(real, torch.float8_e4m3fn)
    assert merged[f"{target}.weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(merged[f"{target}.weight"].view(torch.uint8), stored.view(torch.uint8))
    assert torch.equal(merged[f"{target}.weight_scale"], scale)
    assert not torch.equal(merged[f"{target}.weight_scale"], base[f"{target}.weight_scale"])  # a fresh scale
    # a per-row scale keeps its shape (one fresh scale repeated)
    one_layer = LoraPatches([(load_lora(random_lora(config, seed=16, modules=[target])), 1.0)])
    unit = {"self_attn.v.weight": base[f"{target}.weight"], "self_attn.v.weight_scale": torch.rand(config.dim) + 0.5}
    patched = one_layer.patch("blocks.0.", unit)
    assert patched["self_attn.v.weight_scale"].shape == (config.dim,)
    assert patched["self_attn.v.weight_scale"].unique().numel() == 1


def test_patches_key_says_whether_they_changed(config, tmp_path):
    path = write_lora(tmp_path / "l.safetensors", random_lora(config, seed=17), "comfy")
    lora = load_lora(path)
    assert LoraPatches([(lora, 1.0)]).key == LoraPatches([(load_lora(path), 1.0)]).key  # same file
    assert LoraPatches([(lora, 1.0)]).key != LoraPatches([(lora, 0.9)]).key
    write_lora(path, random_lora(config, seed=18), "comfy")  # the file changed on disk
    assert LoraPatches([(load_lora(path), 1.0)]).key != LoraPatches([(lora, 1.0)]).key


# --- what the LoRA is for -------------------------------------------------------------------

def meta_model(config):
    with torch.device("meta"):
        return WanDiT(config)


WAN21_1_3B = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)


@pytest.mark.parametrize("lora_config, model_config, made_for, model", [
    (WAN21_1_3B, TASKS["t2v-A14B"].dit, "Wan2.1 T2V-1.3B", "width 5120, 40 blocks"),
    (TASKS["ti2v-5B"].dit, TASKS["i2v-A14B"].dit, "Wan2.2 TI2V-5B", "i2v DiT of width 5120"),
    (TASKS["t2v-A14B"].dit, TASKS["ti2v-5B"].dit, "a 14B Wan model", "width 3072"),
], ids=["1.3B-on-14B", "5B-on-A14B", "14B-on-5B"])
def test_a_lora_for_another_model_is_refused_naming_both(lora_config, model_config, made_for, model, tmp_path):
    lora = random_lora(lora_config, rank=2, seed=19, modules=["blocks.0.self_attn.q", "blocks.3.ffn.2"])
    path = write_lora(tmp_path / "other.safetensors", lora, "comfy")
    for strict in (True, False):
        with pytest.raises(ValueError, match=rf"other\.safetensors is a LoRA for {made_for}.*{model}"):
            with_loras(meta_model(model_config), [(path, 1.0)], strict=strict, model_name="the expert")


def test_keys_for_layers_the_model_lacks_are_an_error_or_skipped_with_a_warning(config, base_state, inputs,
                                                                                 tmp_path, caplog):
    lora = random_lora(config, alpha=2.0, seed=20)
    # a Wan2.1 I2V LoRA's image cross-attention, and a block this 2-block model lacks
    g = torch.Generator().manual_seed(0)
    image_branch = {
        "blocks.0.cross_attn.k_img.lora_down.weight": torch.randn(4, config.dim, generator=g),
        "blocks.0.cross_attn.k_img.lora_up.weight": torch.randn(config.dim, 4, generator=g),
        "blocks.1.cross_attn.norm_k_img.diff": torch.randn(config.dim, generator=g),
        "blocks.9.self_attn.q.lora_down.weight": torch.randn(4, config.dim, generator=g),
        "blocks.9.self_attn.q.lora_up.weight": torch.randn(config.dim, 4, generator=g)}
    wan21 = write_lora(tmp_path / "wan21_i2v.safetensors", {**lora, **image_branch}, "kohya")
    plain = write_lora(tmp_path / "plain.safetensors", lora, "kohya")
    model = test_dit.our_model(config, base_state)
    with pytest.raises(ValueError, match=r"3 keys of .*wan21_i2v\.safetensors match no layer of .*t2v DiT of width "
                                         r"256.*lora_unet_blocks_0_cross_attn_k_img\.lora_up\.weight.*leniently"):
        with_loras(model, [(wan21, 1.0)])
    with caplog.at_level(logging.WARNING, logger="wan_core.lora"):
        lenient = with_loras(model, [(wan21, 1.0)], strict=False)
    assert "3 keys of" in caplog.text and "skipping them" in caplog.text
    with torch.no_grad():
        assert torch.equal(lenient(*inputs), with_loras(model, [(plain, 1.0)])(*inputs))


# --- bad input ------------------------------------------------------------------------------

def test_bad_files_are_clear_errors_naming_the_file(config, tmp_path):
    from safetensors.torch import save_file

    dit = write_dit_checkpoint(tmp_path / "model.safetensors", "t2v", "comfy", seed=1)
    with pytest.raises(ValueError, match=r"model\.safetensors holds a Wan diffusion transformer \(DiT\), not a LoRA"):
        load_lora(dit)
    save_file({"encoder.layer.weight": torch.zeros(2, 2)}, str(tmp_path / "random.safetensors"))
    with pytest.raises(ValueError, match=r"random\.safetensors is not a LoRA: none of its 1 tensor names"):
        load_lora(tmp_path / "random.safetensors")

    lora = random_lora(config, alpha=2.0, seed=22)
    good = write_lora(tmp_path / "good.safetensors", lora, "comfy")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated\.safetensors is not a readable safetensors file \(truncated"):
        load_lora(truncated)

    nan = dict(lora)
    nan["blocks.1.ffn.2.lora_up.weight"] = nan["blocks.1.ffn.2.lora_up.weight"].clone()
    nan["blocks.1.ffn.2.lora_up.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"nan\.safetensors: tensor 'diffusion_model\.blocks\.1\.ffn\.2\.lora_up"
                                         r"\.weight' holds NaN or infinite values"):
        load_lora(write_lora(tmp_path / "nan.safetensors", nan, "comfy"))

    half = {k: v for k, v in lora.items() if k != "blocks.0.self_attn.k.lora_up.weight"}
    with pytest.raises(ValueError, match=r"half\.safetensors: 'diffusion_model\.blocks\.0\.self_attn\.k\.lora_down"
                                         r"\.weight' has no matching up"):
        load_lora(write_lora(tmp_path / "half.safetensors", half, "comfy"))

    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 8),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(8, 2),
               "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.ones(8, 1)}, str(tmp_path / "dora.safetensors"))
    with pytest.raises(ValueError, match=r"dora\.safetensors is a DoRA adapter"):
        load_lora(tmp_path / "dora.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_lora(tmp_path / "missing.safetensors")


def test_bad_strengths_and_pairs_are_clear_errors(config, base_state, tmp_path):
    model = test_dit.our_model(config, base_state)
    path = write_lora(tmp_path / "l.safetensors", random_lora(config, seed=23), "comfy")
    with pytest.raises(ValueError, match="strength must be a finite number"):
        with_loras(model, [(path, float("nan"))])
    with pytest.raises(TypeError, match=r"each LoRA must be a \(lora or path, strength\) pair"):
        with_loras(model, [path])
    with pytest.raises(TypeError, match="loras must be a list of"):
        with_loras(model, path)
    assert with_loras(model, [(path, 0.0)]).weight_patches is None  # strength 0: left out
