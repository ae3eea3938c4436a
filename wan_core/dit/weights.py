"""The one point where a DiT's weights become the weights it computes with.

A model's stored weights (the loader's cache, shared by every graph that uses the file) are its
*base*. Changes to them — LoRA deltas today — are `WeightPatches`, applied to a copy as the
weights reach the compute device, and never written into the base:

- a resident model merges them once when `WanDiT.set_weight_patches` is called and undoes the
  merge when the patches change (`key` tells whether they did);
- a model with block swap merges a block's patches each time that block is uploaded.

Both go through `patch_unit`, so fp8-kept weights, block swap and LoRA meet in one place. A unit
is one transformer block (prefix "blocks.<i>.") or everything outside the blocks (prefix "").
"""
from __future__ import annotations

from typing import Hashable, Optional, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class WeightPatches(Protocol):
    """Changes to a model's weights, applied where the weights reach the compute device."""

    @property
    def key(self) -> Hashable:
        """Equal keys mean equal patches (a resident model then keeps its merged weights)."""

    def patch(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unit's tensors with the patches applied.

        `tensors`: the unit's parameters and buffers by name relative to `prefix` (e.g.
        "self_attn.q.weight" for prefix "blocks.3."), on the compute device in their stored
        dtypes (an FP8Linear's fp8 "weight" comes with its float32 "weight_scale"). Returns a
        dict of the same names: patched entries as new tensors of the same shape and dtype,
        untouched ones as they were. The inputs are never modified in place.
        """


def patch_key(patches: Optional[WeightPatches]) -> Hashable:
    return None if patches is None else patches.key


def unit_tensors(module: nn.Module, skip: str = "") -> dict[str, torch.Tensor]:
    """A module's parameters and buffers by name; names starting with `skip` are left out."""
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return {k: v for k, v in tensors.items() if not (skip and k.startswith(skip))}


def set_unit_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Point parameter or buffer `name` of `module` at `value` (no copy). A parameter keeps its
    identity where the tensor types allow (compiled code and hooks keep referring to it)."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        param = owner._parameters[attr]
        if param is not None and torch._has_compatible_shallow_copy_type(param, value):
            param.data = value
        else:
            owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise KeyError(f"{name} is neither a parameter nor a buffer of {type(module).__name__}")


def patch_unit(patches: Optional[WeightPatches], prefix: str,
               tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with `patches` applied (the same dict object when there are none)."""
    if patches is None:
        return tensors
    patched = patches.patch(prefix, tensors)
    if patched.keys() != tensors.keys():
        raise ValueError(f"weight patches for {prefix or 'the model'} returned the tensors "
                         f"{sorted(set(patched) ^ set(tensors))[:4]} that do not match the unit's")
    return patched
