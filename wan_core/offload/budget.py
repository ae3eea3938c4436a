"""How much device memory a forward pass needs, and how many blocks to swap to fit a budget.

Activation memory is measured, not guessed: one transformer block runs on the meta device (no
data, no arithmetic) with the real token count while a dispatch mode adds up the bytes of the
tensors alive at each step, freed exactly when eager PyTorch frees them. Attention kernels keep
only their output (flash/memory-efficient kernels; the math fallback's score matrix is never
used on GPUs), so SDPA is replaced by its output's shape for the count. The estimate follows
the model code as it changes, including chunked evaluation (`WanDiT.chunk_tokens`).
"""
from __future__ import annotations

import copy
import logging
import math
import weakref
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

log = logging.getLogger("wan_core")

GIB = 2 ** 30
# Left free beyond the estimate: the caching allocator's fragmentation, cuBLAS/attention
# workspaces, the sampler's latents. On an H200 (bench/RESULTS.md) the peak reserved memory
# exceeded weights + estimate by 0.9 GiB at 720p and 1.4 GiB at 480p, and a 16 GB plan with
# 1.3 GiB of margin ran out; the blocks this margin swaps in addition cost no measurable time.
MARGIN_BYTES = GIB
MARGIN_FRACTION = 0.08
# Pin the swapped blocks as a whole only if that leaves this much host RAM available.
PINNED_RAM_RESERVE_BYTES = 8 * GIB
PINNED_RAM_RESERVE_FRACTION = 0.25


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created inside the mode and alive at the same time (views of
    the `existing` tensors, e.g. the inputs and the weights, are not new memory)."""

    def __init__(self, existing: Sequence[torch.Tensor] = ()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: set[int] = {t.untyped_storage()._cdata for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = storage._cdata
        if key in self._storages:
            return
        nbytes = storage.nbytes()
        self._storages.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self._storages.discard(key)
        self.live -= nbytes


class _AttentionOutputOnly(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return torch.empty_like(args[0])
        return func(*args, **(kwargs or {}))


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` with meta tensors of the same shapes and dtypes (no data copied)."""
    memo = {id(t): (nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False)
                    if isinstance(t, nn.Parameter) else torch.empty_like(t, device="meta"))
            for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo)


def block_activation_bytes(model: nn.Module, batch: int, tokens: int, *, per_token_time: bool = False) -> int:
    """Peak bytes a forward pass holds on top of the weights, for `batch` videos of `tokens`
    tokens each: the inputs of a block (the float32 residual stream, the time modulation, the
    text embedding, RoPE) plus the most one block's evaluation adds."""
    config = model.config
    dtype = model.dtype
    block = _meta_copy(model.blocks[0])
    with torch.device("meta"):
        x = torch.empty(batch, tokens, config.dim)
        time_mod = torch.empty(batch, tokens if per_token_time else 1, 6, config.dim)
        context = torch.empty(batch, config.text_len, config.dim, dtype=dtype)
        rope = torch.empty(tokens, 1, config.head_dim // 2, dtype=torch.complex64)
    counter = _LiveBytes([x, time_mod, context, rope, *block.parameters(), *block.buffers()])
    with torch.no_grad(), _AttentionOutputOnly(), counter:
        block(x, time_mod, context, rope, "sdpa")
    inputs = sum(t.numel() * t.element_size() for t in (x, time_mod, context, rope))
    return inputs + counter.peak


def latent_tokens(model: nn.Module, latent_shape: Sequence[int]) -> tuple[int, int]:
    """(batch, tokens per video) of a latent [B, C, F, H, W] for this model."""
    if len(latent_shape) != 5:
        raise ValueError(f"latent_shape must be [batch, channels, frames, height, width], got {tuple(latent_shape)}")
    batch, _, *grid = latent_shape
    return batch, math.prod(s // p for s, p in zip(grid, model.config.patch_size))


def default_latent_shape(model: nn.Module) -> tuple[int, ...]:
    """The latent of the model's task at its default size and frame count (720p x 81 for A14B)."""
    from wan_core.configs import task_for_model_type
    from wan_core.pipeline.request import default_size, latent_shape

    task = task_for_model_type(model.config.model_type)
    return latent_shape(task, default_size(task), task.frame_num)


def block_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.blocks[0].parameters(), *model.blocks[0].buffers()])


def other_bytes(model: nn.Module) -> int:
    """Bytes of everything outside the transformer blocks (embeddings, head: always resident)."""
    return sum(t.numel() * t.element_size() for name, t in [*model.named_parameters(), *model.named_buffers()]
               if not name.startswith("blocks."))


def margin_bytes(free_bytes: int) -> int:
    return MARGIN_BYTES + int(MARGIN_FRACTION * free_bytes)


def device_bytes_needed(model: nn.Module, blocks_to_swap: int, *, prefetch: int, activation_bytes: int) -> int:
    """Device memory for weights (resident part + swap slots) and activations."""
    layers = model.config.num_layers
    slots = min(prefetch + 1, blocks_to_swap) if blocks_to_swap else 0
    return other_bytes(model) + (layers - blocks_to_swap + slots) * block_bytes(model) + activation_bytes


def plan_blocks_to_swap(model: nn.Module, *, free_bytes: int, activation_bytes: int, prefetch: int = 1) -> int:
    """The fewest blocks to swap so that weights + activations + margin fit `free_bytes`; all
    of them (with a warning) when even that does not fit."""
    budget = free_bytes - margin_bytes(free_bytes)
    layers = model.config.num_layers
    for count in range(layers + 1):
        if device_bytes_needed(model, count, prefetch=prefetch, activation_bytes=activation_bytes) <= budget:
            return count
    need = device_bytes_needed(model, layers, prefetch=prefetch, activation_bytes=activation_bytes)
    log.warning("block swap: even with all %d blocks swapped this forward needs about %.1f GiB (%.1f GiB of "
                "activations) and %.1f GiB is free beyond the margin; it may run out of memory: use a smaller "
                "size or fewer frames", layers, need / GIB, activation_bytes / GIB, budget / GIB)
    return layers


def device_free_bytes(device: torch.device, own: int = 0) -> int:
    """What this process could allocate on a CUDA device if `own` allocated bytes were given
    back: the driver's free memory plus what PyTorch's allocator holds unused, capped by
    `torch.cuda.set_per_process_memory_fraction`."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)  # torch >= 2.8
    cap = int(fraction * total)
    return max(0, min(free + reserved - allocated, cap - allocated) + own)


def host_available_bytes() -> tuple[int, int]:
    """(available, total) host RAM."""
    import psutil

    memory = psutil.virtual_memory()
    return memory.available, memory.total


def choose_pinned(swapped_bytes: int) -> bool:
    """Pin the swapped blocks as a whole when that leaves enough host RAM available."""
    available, total = host_available_bytes()
    reserve = max(PINNED_RAM_RESERVE_BYTES, int(PINNED_RAM_RESERVE_FRACTION * total))
    return available - swapped_bytes >= reserve
