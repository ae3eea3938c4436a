"""Flat buffers that hold one transformer block's tensors, and page-locked host memory.

A block's parameters and buffers are packed into one flat byte buffer (`BlockLayout`), so that
moving a block between host and device is one large copy instead of sixteen small ones, and a
device "slot" can be refilled in place with another block of the same layout.

Page-locked ("pinned") host memory is what lets the copy engine read host memory while the GPU
computes. PyTorch's own pinned allocator rounds every allocation up to a power of two (a 0.7 GB
block would take 1 GB), so `PinnedBuffer` page-locks an ordinary allocation of the exact size
with `cudaHostRegister` instead, and falls back to PyTorch's allocator where that fails.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

ALIGNMENT = 256  # bytes; every tensor of a packed block starts at a multiple (what GPU kernels like)


@dataclass(frozen=True)
class TensorSlot:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


@dataclass(frozen=True)
class BlockLayout:
    """Where each named tensor of a block lies in a flat uint8 buffer of `nbytes`."""

    slots: tuple[TensorSlot, ...]
    nbytes: int

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> "BlockLayout":
        slots, offset = [], 0
        for name in sorted(tensors):
            t = tensors[name]
            nbytes = t.numel() * t.element_size()
            slots.append(TensorSlot(name, tuple(t.shape), t.dtype, offset, nbytes))
            offset += math.ceil(nbytes / ALIGNMENT) * ALIGNMENT
        return cls(tuple(slots), offset)

    def signature(self) -> tuple:
        return tuple((s.name, s.shape, s.dtype) for s in self.slots)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named tensors inside `flat` (a uint8 tensor of at least `nbytes`), no copy."""
        return {s.name: flat[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in self.slots}

    def pack(self, tensors: dict[str, torch.Tensor], flat: torch.Tensor) -> None:
        """Copy `tensors` into `flat` (same device: a host-to-host or device-to-device copy)."""
        for name, view in self.views(flat).items():
            view.copy_(tensors[name])


class PinnedBuffer:
    """`nbytes` of page-locked host memory as a flat uint8 tensor (`.tensor`); released by
    `close()` or when the object is garbage-collected. Without CUDA it is ordinary memory."""

    def __init__(self, nbytes: int):
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)
        self._unregister = None
        if not torch.cuda.is_available() or nbytes == 0:
            return
        try:
            cudart = torch.cuda.cudart()
            result = cudart.cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)
            registered = int(getattr(result, "value", result)) == 0
        except (AttributeError, RuntimeError, TypeError):  # a torch without these bindings
            registered = False
        if registered:
            self._unregister = weakref.finalize(self, cudart.cudaHostUnregister, self.tensor.data_ptr())
        else:  # e.g. a locked-memory limit: PyTorch's allocator may still find the room
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    def close(self) -> None:
        if self._unregister is not None:
            self._unregister()
        self.tensor = torch.empty(0, dtype=torch.uint8)
