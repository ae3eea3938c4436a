"""Sharded weights with FSDP2 (`torch.distributed.fsdp.fully_shard`), the reference's
--dit_fsdp / --t5_fsdp: each rank keeps 1/world of every weight, and a block's full weights
exist on a rank only while that block runs (all-gathered just before, freed right after).

The unit is one transformer block (the DiT's 40, umt5's 24), then the rest of the model; an
expert of 14B parameters in bf16 (28.6 GB) takes 28.6 / world GB per GPU plus one block.
Inference only: no gradients, nothing reduced. Sharding moves the weights to the mesh's
device one block at a time, so a model loaded to the CPU (memory-mapped) never needs a whole
copy on the GPU. An expert made inactive by the hand-off moves its shards with `.to("cpu")`.
"""
from __future__ import annotations

from typing import Iterable

from torch import nn


def _shard(units: Iterable[nn.Module], root: nn.Module, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(root, mesh=mesh, reshard_after_forward=True)


def shard_dit(model: nn.Module, mesh) -> nn.Module:
    """Shard a `WanDiT`'s weights over `mesh` (a 1-D DeviceMesh) in place; returns the model."""
    if getattr(model, "weight_patches", None) is not None:
        raise ValueError("this DiT has weight patches (a LoRA) merged in; FSDP shards the stored weights, so "
                         "apply LoRAs without --dit_fsdp")
    _shard(model.blocks, model, mesh)
    return model


def shard_text_encoder(encoder, mesh):
    """Shard a `wan_core.text` encoder's umt5 weights over `mesh` in place; returns the encoder."""
    model = encoder.model
    _shard(model.encoder.block, model, mesh)
    return encoder


def weight_bytes(module: nn.Module) -> int:
    """Bytes of weights this rank holds for `module` (its shards, under FSDP)."""
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


__all__ = ["shard_dit", "shard_text_encoder", "weight_bytes"]


