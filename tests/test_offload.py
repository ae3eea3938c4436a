"""Block swap, weight placement and the VRAM budget (wan_core.offload), on the CPU.

The swap machinery (flat slots refilled in place, pinned or staged host copies, prefetch order,
patches applied per upload) runs here with the CPU as its "device": `placement.enable_swap`
takes any device, while the public `enable_block_swap` is a no-op without CUDA. Outputs of an
in-memory model are compared bit for bit; models memory-mapped from files are compared within
1e-6 of the max, since MKL's float32 kernels may read the mapped tensors at other alignments.
"""
from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import replace

import pytest
import torch

from wan_core.dit import WanDiT
from wan_core.loading import load_dit
from wan_core.offload import activation_bytes, device_bytes_needed, enable_block_swap, plan_blocks_to_swap
from wan_core.offload.budget import margin_bytes
from wan_core.ops.linear import FP8Linear, fp8_to_dtype, quantize_fp8
from wan_core.testing import DIT_LAYOUTS, dit_state_dict, tiny_dit_config, write_dit_checkpoint

LAYERS = 4
FILE_TOLERANCE = 1e-6  # relative to the max, for memory-mapped weights (see the module docstring)


@functools.lru_cache(maxsize=None)
def _weights(variant: str) -> dict[str, torch.Tensor]:
    return dit_state_dict(replace(tiny_dit_config(variant), num_layers=LAYERS), seed=3)


def tiny_model(variant: str = "t2v", dtype: torch.dtype = torch.float32) -> WanDiT:
    with torch.device("meta"):
        model = WanDiT(replace(tiny_dit_config(variant), num_layers=LAYERS))
    model.load_state_dict({k: v.clone() for k, v in _weights(variant).items()}, assign=True)
    return model.to(dtype).eval().requires_grad_(False)


def inputs(model: WanDiT, seed: int = 0) -> dict:
    config = model.config
    g = torch.Generator().manual_seed(seed)
    y_channels = config.in_dim - 16 if config.model_type == "i2v" else 0
    x = torch.randn(1, config.in_dim - y_channels, 3, 4, 6, generator=g, dtype=model.dtype)
    y = torch.randn(1, y_channels, 3, 4, 6, generator=g, dtype=model.dtype) if y_channels else None
    t = torch.tensor([700.0]) if config.model_type != "ti2v" else torch.full((1, 18), 700.0)
    context = [torch.randn(7, config.text_dim, generator=g, dtype=model.dtype)]
    return dict(x=x, t=t, context=context, y=y)


def run(model: WanDiT, args: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(args["x"], args["t"], args["context"], y=args["y"])


def assert_close(a: torch.Tensor, b: torch.Tensor, tolerance: float = FILE_TOLERANCE) -> None:
    assert ((a - b).abs().max() / b.abs().max()).item() <= tolerance


class DeltaPatches:
    """A test `WeightPatches`: adds fixed deltas to some entries, in float32 rounded once (an fp8
    weight is dequantized, changed and quantized again with a fresh scale). Counts its calls."""

    def __init__(self, model: WanDiT, names: list[str], key: str = "delta", seed: int = 5):
        g = torch.Generator().manual_seed(seed)
        shapes = dict(model.named_parameters())
        self.deltas = {name: 0.05 * torch.randn(shapes[name].shape, generator=g) for name in names}
        self._key = key
        self.calls = 0

    @property
    def key(self):
        return self._key

    def patch(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        out = dict(tensors)
        for name, value in tensors.items():
            delta = self.deltas.get(prefix + name)
            if delta is None:
                continue
            if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                real = fp8_to_dtype(value, tensors[name + "_scale"], torch.float32) + delta.to(value.device)
                out[name], out[name + "_scale"] = quantize_fp8(real, value.dtype)
            else:
                out[name] = (value.float() + delta.to(value.device)).to(value.dtype)
        return out


PATCHED = ["blocks.1.self_attn.q.weight", "blocks.2.ffn.2.weight", "blocks.3.norm3.weight",
           "blocks.3.cross_attn.o.bias", "time_projection.1.weight"]


@pytest.mark.parametrize("variant,pinned,prefetch", [("t2v", True, 0), ("t2v", False, 1), ("i2v", True, 1),
                                                     ("i2v", False, 2), ("ti2v", True, 2), ("ti2v", False, 0)])
def test_swapped_blocks_give_the_resident_output_bit_for_bit(variant, pinned, prefetch):
    model = tiny_model(variant)
    args = inputs(model)
    resident = run(model, args)
    for count in (1, 3, LAYERS):
        model.placement.enable_swap(range(LAYERS - count, LAYERS), "cpu", prefetch=prefetch, pinned=pinned)
        assert torch.equal(run(model, args), resident)
        assert torch.equal(run(model, args), resident)  # the ring wraps around into the next forward
        model.disable_block_swap()
    assert model.placement.swap is None
    assert torch.equal(run(model, args), resident)


def test_swapped_block_weights_live_on_the_host_between_turns():
    model = tiny_model()
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    model.placement.enable_swap([2, 3], "cpu", prefetch=1, pinned=True)
    swap = model.placement.swap
    run(model, inputs(model))
    after = {name: p.data_ptr() for name, p in model.named_parameters()}
    pinned = {p.tensor.data_ptr() for p in swap._arenas.values()}
    arena_size = swap.layout.nbytes
    for name, pointer in after.items():
        if name.startswith(("blocks.2.", "blocks.3.")):  # in the pinned copy, not in a slot
            assert any(0 <= pointer - start < arena_size for start in pinned), name
        else:
            assert pointer == before[name], name  # resident weights were not copied
    assert len(swap._slots) == 2 and swap.device_bytes() == 2 * arena_size


def test_a_new_swap_set_up_takes_over_the_pinned_copies_it_shares():
    model = tiny_model()
    args = inputs(model)
    resident = run(model, args)
    placement = model.placement
    placement.enable_swap([2, 3], "cpu", prefetch=1, pinned=True)
    kept = placement.swap._arenas[3]
    for blocks, pinned in (([1, 2, 3], True), ([3], True), ([2, 3], False), ([0, 1, 2, 3], True), ([1], True)):
        placement.enable_swap(blocks, "cpu", prefetch=1, pinned=pinned)
        assert torch.equal(run(model, args), resident), (blocks, pinned)
        assert placement.swap.pinned_blocks() == (set(blocks) if pinned else set())
        if blocks == [3]:
            assert placement.swap._arenas[3] is kept  # handed over, not copied again
    model.disable_block_swap()
    assert torch.equal(run(model, args), resident)


def test_pinned_buffers_are_made_once_and_freed_with_the_model():
    model = tiny_model()
    args = inputs(model)
    model.placement.enable_swap([1, 2, 3], "cpu", prefetch=1, pinned=False)
    swap = model.placement.swap
    run(model, args)
    staging = [id(buffer) for buffer in swap._staging]
    for _ in range(2):
        run(model, args)
    assert [id(buffer) for buffer in swap._staging] == staging and len(staging) == 2
    swap.drain()  # the next forward's first block is being staged: that job holds the swap till it ends
    freed = weakref.ref(swap)
    del model, swap
    assert freed() is None  # no reference cycle: freed as soon as the model is (ComfyUI dropping it)


@pytest.mark.parametrize("layout", DIT_LAYOUTS)
def test_swap_on_and_off_agree_for_every_layout(tmp_path, layout):
    path = write_dit_checkpoint(tmp_path / layout, "t2v", layout, config=replace(tiny_dit_config("t2v"), num_layers=3))
    model = load_dit(path, dtype=torch.float32)
    args = inputs(model)
    resident = run(model, args)
    model.placement.enable_swap([1, 2], "cpu", prefetch=1, pinned=False)
    assert_close(run(model, args), resident)
    model.disable_block_swap()
    assert_close(run(model, args), resident)


@pytest.mark.parametrize("dtype,quant", [(torch.bfloat16, None), (torch.bfloat16, "fp8_e4m3fn"),
                                         (torch.float16, "fp8_e5m2")])
def test_swap_streams_low_precision_and_fp8_kept_weights_as_stored(tmp_path, dtype, quant):
    path = write_dit_checkpoint(tmp_path / "m", "i2v", "comfy", config=replace(tiny_dit_config("i2v"), num_layers=3))
    model = load_dit(path, dtype=dtype, quant=quant)
    if quant:
        assert isinstance(model.blocks[2].ffn[0], FP8Linear)
    args = inputs(model)
    resident = run(model, args)
    model.placement.enable_swap([0, 1, 2], "cpu", prefetch=2, pinned=True)
    stored = {s.name: s.dtype for s in model.placement.swap.layout.slots}
    assert stored["ffn.0.weight"] == (model.blocks[0].ffn[0].weight.dtype)
    assert_close(run(model, args), resident)


def test_patches_apply_to_swapped_blocks_and_none_restores_the_base():
    model = tiny_model()
    args = inputs(model)
    base = run(model, args)
    base_tensors = {name: (p.data_ptr(), p.clone()) for name, p in model.named_parameters()}
    patches = DeltaPatches(model, PATCHED)

    model.set_weight_patches(patches)
    patched = run(model, args)
    assert not torch.equal(patched, base)
    for count in (2, LAYERS):
        model.placement.enable_swap(range(LAYERS - count, LAYERS), "cpu", prefetch=1, pinned=count == 2)
        assert torch.equal(run(model, args), patched)
        assert torch.equal(run(model, args), patched)
        model.set_weight_patches(None)
        assert torch.equal(run(model, args), base)
        model.set_weight_patches(patches)
        model.disable_block_swap()
    assert torch.equal(run(model, args), patched)

    model.set_weight_patches(None)
    assert torch.equal(run(model, args), base)
    for name, p in model.named_parameters():  # the base, unchanged (the very same tensors outside
        pointer, value = base_tensors[name]   # the blocks that were once pinned)
        assert torch.equal(p, value) and (p.data_ptr() == pointer or name.startswith(("blocks.2.", "blocks.3."))), name


def test_resident_patches_replace_only_the_patched_tensors():
    """A resident patched model holds the patched tensor in place of the base one (one copy on
    the device); the base is kept in host memory and the other tensors are not copied."""
    model = tiny_model()
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    patches = DeltaPatches(model, PATCHED)
    model.set_weight_patches(patches)
    calls = patches.calls
    for name, p in model.named_parameters():
        assert (p.data_ptr() != pointers[name]) == (name in PATCHED), name
    assert set(model.placement.host) == set(PATCHED)
    assert all(model.placement.host[n].data_ptr() == pointers[n] for n in PATCHED)
    model.set_weight_patches(DeltaPatches(model, PATCHED))  # an equal key: nothing is merged again
    assert patches.calls == calls and model.weight_patches.key == "delta"


@pytest.mark.parametrize("quant", [None, "fp8_e4m3fn"])
def test_patches_on_fp8_kept_swapped_blocks(tmp_path, quant):
    path = write_dit_checkpoint(tmp_path / "m", "t2v", "official", config=replace(tiny_dit_config("t2v"), num_layers=4))
    model = load_dit(path, dtype=torch.bfloat16, quant=quant)
    args = inputs(model)
    base = run(model, args)
    model.set_weight_patches(DeltaPatches(model, PATCHED[:3]))
    patched = run(model, args)
    model.placement.enable_swap([1, 2, 3], "cpu", prefetch=1, pinned=False)
    assert_close(run(model, args), patched)
    model.set_weight_patches(None)
    assert_close(run(model, args), base)


def test_compiled_blocks_keep_their_graph_when_swapped():
    torch._dynamo.reset()  # graphs compiled by earlier tests would be reused without a capture
    model = tiny_model()
    args = inputs(model)
    eager = run(model, args)
    model.compile_blocks(backend="aot_eager")
    compiled = run(model, args)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model.placement.enable_swap([1, 2, 3], "cpu", prefetch=1, pinned=True)
    assert_close(run(model, args), compiled, 1e-6)
    assert_close(run(model, args), eager, 1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # no recompilation per slot
    torch._dynamo.reset()


def test_moving_to_the_cpu_keeps_the_memory_mapped_weights(tmp_path):
    path = write_dit_checkpoint(tmp_path / "m", "t2v", "comfy")
    model = load_dit(path, dtype=torch.float32)
    pointers = [p.data_ptr() for p in model.parameters()]
    model.to("cpu")
    model.cpu()
    assert [p.data_ptr() for p in model.parameters()] == pointers


def test_released_host_weights_are_mapped_again_when_used(tmp_path):
    path = write_dit_checkpoint(tmp_path / "m", "ti2v", "comfy_fp8_quant", config=replace(tiny_dit_config("ti2v"),
                                                                                             num_layers=3))
    model = load_dit(path, dtype=torch.bfloat16, quant="fp8_e4m3fn")
    args = inputs(model)
    before = run(model, args)
    assert model.release_host_weights()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.device.type == "cpu" and not model.placement.host
    assert model.release_host_weights() and all(t.device.type == "cpu" for t in model.state_dict().values())
    for _ in range(2):  # used again, released again, used again
        assert_close(run(model, args), before)
        assert all(p.device.type == "cpu" for p in model.parameters())
        assert model.release_host_weights()
    model.placement.enable_swap([1, 2], "cpu", prefetch=1, pinned=True)  # the pinned copies are kept
    assert_close(run(model, args), before)
    model.release_host_weights()
    assert model.blocks[2].ffn[0].weight.device.type == "cpu" and model.blocks[0].ffn[0].weight.device.type == "meta"
    assert_close(run(model, args), before)


def test_a_model_from_a_state_dict_keeps_its_host_weights():
    model = load_dit(dit_state_dict(tiny_dit_config("t2v")), dtype=torch.float32)
    assert not model.release_host_weights()
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_dtype_conversion_after_patches_is_a_clear_error():
    model = tiny_model()
    model.set_weight_patches(DeltaPatches(model, PATCHED))
    with pytest.raises(ValueError, match="convert the model's dtype before"):
        model.to(torch.bfloat16)


@pytest.mark.parametrize("value,message", [
    (LAYERS + 1, "0..4"), (-1, "0..4"), (True, "0..4"), (2.5, "0..4"), ("lots", "'auto' or a whole number"),
    ([1], "0..4")])
def test_bad_blocks_to_swap_get_clear_errors(value, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().enable_block_swap(value, device="cpu")


def test_bad_prefetch_and_host_memory_get_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="prefetch must be a whole number >= 0"):
        model.enable_block_swap(2, device="cpu", prefetch=-1)
    with pytest.raises(ValueError, match="host_memory must be one of"):
        model.enable_block_swap(2, device="cpu", host_memory="disk")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_swap_to_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available here"):
        tiny_model().enable_block_swap("auto", device="cuda")


@pytest.mark.parametrize("value", [2, "auto", "AUTO"])
def test_enable_block_swap_on_the_cpu_is_a_no_op(value):
    model = tiny_model()
    args = inputs(model)
    before = run(model, args)
    assert model.enable_block_swap(value, device="cpu") == 0
    assert model.placement.swap is None
    assert torch.equal(run(model, args), before)


def test_auto_picks_the_fewest_blocks_that_fit_the_free_memory(caplog):
    model = tiny_model(dtype=torch.bfloat16)
    per_block = sum(t.numel() * t.element_size() for t in model.blocks[0].state_dict().values())
    outside = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if not n.startswith("blocks."))
    activations = 10_000_000

    def free_for(need: int) -> int:  # the least free memory at which `need` bytes fit beside the margin
        low, high = need, 10 * (need + margin_bytes(need))
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if middle - margin_bytes(middle) >= need else (middle + 1, high)
        return low

    for prefetch in (1, 2):
        for count in (0, prefetch + 2, LAYERS):
            slots = min(prefetch + 1, count) if count else 0
            need = outside + (LAYERS - count + slots) * per_block + activations
            assert device_bytes_needed(model, count, prefetch=prefetch, activation_bytes=activations) == need
            free = free_for(need)
            assert plan_blocks_to_swap(model, free_bytes=free, activation_bytes=activations, prefetch=prefetch) == count
            if count < LAYERS:
                assert plan_blocks_to_swap(model, free_bytes=free - 1, activation_bytes=activations,
                                           prefetch=prefetch) > count
    with caplog.at_level(logging.WARNING, logger="wan_core"):
        assert plan_blocks_to_swap(model, free_bytes=activations, activation_bytes=activations) == LAYERS
    assert "may run out of memory" in caplog.text


def test_activation_estimate_follows_the_token_count():
    """Measured on the meta device: at least the float32 residual stream in and out of a block,
    and linear in the tokens (no attention score matrix is counted)."""
    model = tiny_model(dtype=torch.bfloat16)
    dim = model.config.dim
    small, large = activation_bytes(model, (1, 16, 4, 32, 32)), activation_bytes(model, (1, 16, 8, 32, 32))
    tokens = 4 * 16 * 16
    assert small >= 2 * tokens * dim * 4
    context = model.config.text_len * dim * 2
    assert 1.85 < (large - context) / (small - context) <= 2  # twice the tokens; the text part stays
    assert abs(activation_bytes(model, (2, 16, 4, 32, 32)) / large - 1) < 0.05  # two videos: twice the tokens
