"""Fitting a 14B expert into a small GPU and two of them into ordinary host RAM.

- `enable_block_swap`: keep some transformer blocks in host memory and stream them to the GPU
  during each forward pass, with asynchronous prefetch (`BlockSwap`); `blocks_to_swap="auto"`
  picks the fewest that fit the free memory for the size being generated (`budget`).
- `WeightPlacement`: where each weight lives (host copy, device copy, patched copy); the one
  path by which weights reach the device, shared by block swap, `.to()` and weight patches.
- `release_host_weights`: an inactive expert gives its host RAM back; its weights are mapped
  from the checkpoint file again when it is next used.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from typing import Optional, Sequence, Union

import torch
from torch import nn

from wan_core.offload.block_swap import BlockSwap
from wan_core.offload.budget import (block_activation_bytes, block_bytes, choose_pinned, default_latent_shape,
                                     device_bytes_needed, device_free_bytes, latent_tokens, plan_blocks_to_swap)
from wan_core.offload.placement import WeightPlacement, resolve_device

log = logging.getLogger("wan_core")

AUTO = "auto"
HOST_MEMORY_MODES = ("auto", "pinned", "staged")

BlocksToSwap = Union[int, str]


def check_blocks_to_swap(value: BlocksToSwap, num_layers: int) -> BlocksToSwap:
    """`value` if it is "auto" or a whole number 0..num_layers; a clear error otherwise."""
    if isinstance(value, str):
        if value.strip().lower() == AUTO:
            return AUTO
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"blocks_to_swap must be 'auto' or a whole number 0..{num_layers}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= num_layers:
        raise ValueError(f"blocks_to_swap must be 'auto' or a whole number 0..{num_layers} (this model has "
                         f"{num_layers} blocks), got {value!r}")
    return value


def _check_prefetch(prefetch: int) -> int:
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be a whole number >= 0 (blocks copied ahead), got {prefetch!r}")
    return prefetch


def activation_bytes(model: nn.Module, latent_shape: Optional[Sequence[int]] = None) -> int:
    """Estimated activation memory of one forward pass over `latent_shape` (default: the task's
    default size and frame count)."""
    shape = tuple(latent_shape) if latent_shape is not None else default_latent_shape(model)
    batch, tokens = latent_tokens(model, shape)
    return block_activation_bytes(model, batch, tokens, per_token_time=model.config.model_type == "ti2v")


def auto_blocks_to_swap(model: nn.Module, device: torch.device, *, latent_shape: Optional[Sequence[int]] = None,
                        free_memory: Optional[int] = None, prefetch: int = 1) -> int:
    """The fewest blocks to swap for a forward over `latent_shape` to fit `free_memory` bytes
    (default: what `device` has free, plus what the model holds there)."""
    activations = activation_bytes(model, latent_shape)
    if free_memory is None:
        free_memory = device_free_bytes(device, own=model.placement.device_bytes())
    count = plan_blocks_to_swap(model, free_bytes=free_memory, activation_bytes=activations, prefetch=prefetch)
    log.info("block swap auto: %d of %d blocks (%.1f GiB free, ~%.1f GiB of activations)", count,
             model.config.num_layers, free_memory / 2 ** 30, activations / 2 ** 30)
    return count


def enable_block_swap(model: nn.Module, blocks_to_swap: BlocksToSwap, *, device, prefetch: int = 1,
                      host_memory: str = "auto", latent_shape: Optional[Sequence[int]] = None,
                      free_memory: Optional[int] = None, place: bool = True) -> int:
    """Swap the last `blocks_to_swap` transformer blocks of `model` between host memory and
    `device` during each forward pass; returns the number swapped. See `WanDiT.enable_block_swap`."""
    layers = model.config.num_layers
    blocks_to_swap = check_blocks_to_swap(blocks_to_swap, layers)
    prefetch = _check_prefetch(prefetch)
    if host_memory not in HOST_MEMORY_MODES:
        raise ValueError(f"host_memory must be one of {HOST_MEMORY_MODES}, got {host_memory!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for block swap but CUDA is not available here; "
                         f"on a CPU the model runs from host memory anyway (use device='cpu')")
    if device.type != "cuda":
        model.placement.disable_swap()
        return 0  # the blocks already live in host memory: nothing to swap
    device = resolve_device(device)
    current = model.placement.swap if model.placement.swap is not None and model.placement.swap.device == device \
        else None
    if blocks_to_swap == AUTO:
        blocks_to_swap = auto_blocks_to_swap(model, device, latent_shape=latent_shape, free_memory=free_memory,
                                             prefetch=prefetch)
        if current is not None and current.prefetch == prefetch and len(current.order) >= blocks_to_swap:
            blocks_to_swap = len(current.order)  # what is set up still fits: keep it (and its pinned copies)
    if blocks_to_swap == 0:
        model.placement.disable_swap()
        if place:
            model.placement.move(device)
        return 0
    blocks = list(range(layers - blocks_to_swap, layers))
    if host_memory != "auto":
        pinned = host_memory == "pinned"
    elif current is not None and current.order == blocks:
        pinned = current.pinned  # its own pinned copies are not counted as available RAM
    else:
        pinned = choose_pinned(blocks_to_swap * block_bytes(model))
    model.placement.enable_swap(blocks, device, prefetch=prefetch, pinned=pinned, place=place)
    return blocks_to_swap


def release_host_weights(model) -> bool:
    """Give back the host RAM of `model`'s weights that its checkpoint file can provide again
    (they are mapped from the file when next needed): `model.release_host_weights()` where the
    model has it. False if it cannot."""
    release = getattr(model, "release_host_weights", None)
    return bool(release()) if callable(release) else False


def return_freed_host_memory() -> bool:
    """Give the C heap's free pages back to the system (glibc's malloc_trim). A run's freed
    activations otherwise stay in the process's resident set in varying amounts, so the RSS of
    a long-lived process (ComfyUI) drifts from one prompt to the next. False where the C
    library has no malloc_trim (macOS, musl, Windows)."""
    trim = _malloc_trim()
    return bool(trim is not None and trim(0))


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


__all__ = ["AUTO", "HOST_MEMORY_MODES", "BlockSwap", "WeightPlacement", "activation_bytes", "auto_blocks_to_swap",
           "check_blocks_to_swap",
           "device_bytes_needed", "enable_block_swap", "plan_blocks_to_swap", "release_host_weights", "return_freed_host_memory"]
