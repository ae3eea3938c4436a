"""Where a WanDiT's weights live, and the one path by which they reach the compute device.

A model's *base* weights (what the checkpoint holds) are kept as a host copy once the model has
been moved or patched: memory-mapped from the file when the loader could leave them so, else in
ordinary (or, for swapped blocks, page-locked) RAM. The *live* weights, the ones forward reads,
are derived from the base on the compute device through `patch_unit`:

- moving to a device uploads the base of each unit and patches it there; moving back to the
  CPU points the live weights at the host copies again (nothing is copied back);
- `set_patches` re-derives only what the patches change, so a resident GPU model with a LoRA
  holds one GPU copy of each weight, and `None` restores the exact base;
- swapped blocks (`BlockSwap`) are derived the same way, one block per upload.

A model loaded from a file can also drop its host copies (`release_host`): they are mapped
from the file again when next needed, so an inactive MoE expert costs no host RAM.
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from wan_core.dit.weights import WeightPatches, patch_key, patch_unit, set_unit_tensor, unit_tensors

if TYPE_CHECKING:  # block_swap imports wan_core.dit, whose model imports this module
    from wan_core.offload.block_swap import BlockSwap

Reload = Callable[[], Mapping[str, torch.Tensor]]


def resolve_device(device) -> torch.device:
    """`device` with its index ("cuda" -> "cuda:<current>"), comparable with a tensor's device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=tensor.device.type == "cpu" and tensor.is_pinned())


class WeightPlacement:
    """The base host copies of one model's weights and where its live weights are."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)
        self.host: dict[str, torch.Tensor] = {}  # base copies in host memory, by full name
        self.patched: set[str] = set()  # live entries that hold patched values
        self.patches: Optional[WeightPatches] = None
        self.device: Optional[torch.device] = None  # None: wherever the loader put the weights
        self.swap: Optional["BlockSwap"] = None
        self.reload: Optional[Reload] = None  # re-reads the base from the checkpoint file
        self.released = False

    @property
    def model(self) -> nn.Module:
        return self._model()

    def current_device(self) -> torch.device:
        return self.device if self.device is not None else self.model.patch_embedding.weight.device

    def swap_active(self) -> bool:
        return self.swap is not None and self.swap.device == self.current_device()

    def _swapped(self, prefix: str) -> bool:
        return self.swap_active() and prefix.startswith("blocks.") and \
            int(prefix.split(".")[1]) in self.swap.position

    # --- the forward pass ----------------------------------------------------------------------

    def prepare(self) -> None:
        """Before a forward pass: map released weights again, start the first block copies."""
        if self.released:
            self.remap()
        if self.swap_active():
            self.swap.begin(self.model)

    def blocks_in_turn(self, blocks: Sequence[nn.Module]) -> Iterator[nn.Module]:
        if self.swap_active():
            return self.swap.blocks_in_turn(self.model, blocks)
        return iter(blocks)

    # --- moves and patches ----------------------------------------------------------------------

    def move(self, device) -> None:
        """Put the live weights on `device` (the swapped blocks stay on the host when swapping)."""
        device = resolve_device(device)
        if self.released:
            self.remap()
        if self.swap is not None and self.swap.device != device:
            self.swap.deactivate()
        self.device = device
        for prefix, module, skip in self.model.weight_units():
            if self._swapped(prefix):
                self._park(prefix, module, skip)
            else:
                self._place(prefix, module, skip, device)

    def set_patches(self, patches: Optional[WeightPatches]) -> None:
        if patch_key(patches) == patch_key(self.patches):
            self.patches = patches
            return
        if self.released:
            self.remap()
        if self.swap is not None:
            self.swap.invalidate()
        self.patches = patches
        device = self.current_device()
        for prefix, module, skip in self.model.weight_units():
            if not self._swapped(prefix):
                self._place(prefix, module, skip, device)

    def _keep_base(self, full: str, *candidates: torch.Tensor) -> None:
        """Record the base of `full` in host memory before its live tensor is replaced."""
        if full in self.host:
            return
        on_host = next((c for c in candidates if c.device.type == "cpu"), None)
        # detached: a Parameter object is re-pointed later, its current tensor must stay put
        self.host[full] = on_host.detach() if on_host is not None else candidates[0].to("cpu")

    def _place(self, prefix: str, module: nn.Module, skip: str, device: torch.device) -> None:
        """Live tensors of one unit := patch_unit(patches, base on `device`)."""
        live = unit_tensors(module, skip)
        base = {}
        for name, tensor in live.items():
            full = prefix + name
            from_host = full in self.patched or (full in self.host and tensor.device != device)
            base[name] = _to(self.host[full] if from_host else tensor, device)
        out = patch_unit(self.patches, prefix, base)
        for name, value in out.items():
            full, tensor = prefix + name, live[name]
            if value is not tensor:
                if full not in self.patched:
                    self._keep_base(full, base[name], tensor)
                set_unit_tensor(module, name, value)
            if value is base[name]:
                self.patched.discard(full)
            else:
                self.patched.add(full)

    def _park(self, prefix: str, module: nn.Module, skip: str) -> None:
        """Point a swapped block's live tensors at its host copy (patched at each upload)."""
        for name, tensor in unit_tensors(module, skip).items():
            full = prefix + name
            if full not in self.patched:
                self._keep_base(full, tensor)
            set_unit_tensor(module, name, self.host[full])
            self.patched.discard(full)

    # --- block swap -----------------------------------------------------------------------------

    def enable_swap(self, blocks: Sequence[int], device, *, prefetch: int = 1, pinned: bool = False,
                    place: bool = True) -> None:
        """Swap `blocks` between host memory and `device` (any device, the CPU included: that is
        what the CPU tests exercise). With `place` the model is put on `device` now; otherwise
        swapping starts when the model is next moved there. A previous set-up hands over the
        pinned copies of the blocks both swap; blocks no longer swapped are uploaded."""
        from wan_core.offload.block_swap import BlockSwap, block_prefix

        device = resolve_device(device)
        blocks = sorted(blocks)
        old = self.swap
        if old is not None and old.settings() == (blocks, device, prefetch, pinned):
            if place:
                self.move(device)
            return
        if self.released:
            self.remap()
        model = self.model

        def base_tensors(index: int) -> dict[str, torch.Tensor]:
            prefix = block_prefix(index)
            live = unit_tensors(model.blocks[index])
            return {name: self.host[prefix + name] if prefix + name in self.host and
                    (prefix + name in self.patched or live[name].device.type != "cpu") else live[name]
                    for name in live}

        self.swap = None
        if old is not None:
            old.deactivate()
        swap = BlockSwap(self, blocks, device, prefetch=prefetch, pinned=pinned, base_tensors=base_tensors,
                         reuse=old)
        if old is not None:
            self._unpin(old)
            old.close()
        self.swap = swap
        if place or self.current_device() == device:
            self.move(device)

    def disable_swap(self) -> None:
        """Stop swapping: every block goes where the rest of the model is."""
        if self.swap is None:
            return
        swap, self.swap = self.swap, None
        swap.deactivate()
        self._unpin(swap)
        self.move(self.current_device())
        swap.close()

    def _unpin(self, swap: "BlockSwap") -> None:
        """The blocks whose base is still in `swap`'s pinned buffers get a host copy of their own
        (from the file when it can be read again), since the buffers are about to be freed."""
        from wan_core.offload.block_swap import block_prefix

        leaving = [index for index in swap.order if index in swap.pinned_blocks()]
        fresh = self.reload() if self.reload is not None and leaving else {}
        for index in leaving:
            module, prefix = self.model.blocks[index], block_prefix(index)
            for name in unit_tensors(module):
                full = prefix + name
                self.host[full] = fresh[full] if full in fresh else self.host[full].clone()
                set_unit_tensor(module, name, self.host[full])

    # --- host RAM ----------------------------------------------------------------------------

    def release_host(self) -> bool:
        """Drop every host-memory copy that can be read from the checkpoint file again (pinned
        swap buffers excepted); weights on a GPU stay. False when there is no file to re-read."""
        if self.reload is None:
            return False
        if self.swap is not None:
            self.swap.drain()
        self.device = self.current_device()  # before the placeholders would say "meta"
        keep = self.swap.pinned_names() if self.swap is not None else set()
        for prefix, module, skip in self.model.weight_units():
            for name, tensor in unit_tensors(module, skip).items():
                full = prefix + name
                if full in keep:
                    continue
                if tensor.device.type == "cpu":
                    set_unit_tensor(module, name, torch.empty_like(tensor, device="meta"))
                    self.patched.discard(full)
                self.host.pop(full, None)
        self.released = True
        return True

    def remap(self) -> None:
        """Read the released host copies from the checkpoint file again and re-place the units
        whose live tensors were released."""
        fresh = self.reload()
        model = self.model
        keep = self.swap.pinned_names() if self.swap is not None else set()
        for prefix, module, skip in model.weight_units():
            live = unit_tensors(module, skip)
            for name, tensor in live.items():
                full = prefix + name
                if full in keep:
                    continue
                found = fresh.get(full)
                if found is None or found.shape != tensor.shape or found.dtype != tensor.dtype:
                    raise ValueError(f"the checkpoint file of this model changed since it was loaded ({full}: "
                                     f"expected {tuple(tensor.shape)} {tensor.dtype}); load the model again")
                self.host[full] = found
        self.released = False
        device = self.current_device()
        for prefix, module, skip in model.weight_units():
            if any(t.device.type == "meta" for t in unit_tensors(module, skip).values()):
                if self._swapped(prefix):
                    self._park(prefix, module, skip)
                else:
                    self._place(prefix, module, skip, device)

    def forget(self) -> None:
        """Before a dtype conversion of the live tensors: they become the new base."""
        if self.patches is not None or self.swap is not None:
            raise ValueError("convert the model's dtype before setting weight patches or enabling block swap "
                             "(or load it in the dtype you need with load_dit(dtype=...))")
        if self.released:
            self.remap()
        self.host.clear()
        self.patched.clear()
        self.device = None
        self.reload = None

    # --- accounting -----------------------------------------------------------------------------

    def device_bytes(self) -> int:
        """Bytes of live weights on the compute device (the swap's slots included)."""
        device = self.current_device()
        if device.type in ("cpu", "meta"):
            return 0
        total = sum(t.numel() * t.element_size() for prefix, module, skip in self.model.weight_units()
                    if not self._swapped(prefix) for t in unit_tensors(module, skip).values())
        return total + (self.swap.device_bytes() if self.swap_active() else 0)
