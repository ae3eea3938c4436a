"""Block swap: transformer blocks that live in host memory and visit the GPU one at a time.

The swapped blocks' weights stay on the host as a read-only copy; the GPU holds a small ring of
"slots", each one flat buffer that fits one block (`BlockLayout`). While block j computes, the
next `prefetch` blocks are copied into the other slots on a side CUDA stream; CUDA events order
the two streams, so compute never reads a slot still being filled and a copy never overwrites
a slot a queued kernel still reads. Nothing is ever copied back: a slot is simply refilled.

During its turn a block's parameters point at views into its slot (the same modules, shapes
and dtypes every time, so `torch.compile`d blocks keep their compiled code), and afterwards back
at the host copy. Each upload passes through `patch_unit(patches, "blocks.<i>.", tensors)` (LoRA
and any other `WeightPatches`), applied to the slot in place.

Host copies come in two kinds (`pinned`):
- pinned: each swapped block is copied once into page-locked memory, from which the copy engine
  reads directly (the fastest; costs the swapped blocks' size in locked RAM);
- staged: the host copies stay where they are (memory-mapped from the checkpoint file, or
  ordinary memory) and a worker thread copies each block into one of a ring of page-locked
  staging buffers, from which the copy engine reads. Only the ring is locked.

On a CPU device the same machinery runs with plain synchronous copies (what the CPU tests use).
"""
from __future__ import annotations

import contextlib
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch
from torch import nn

from wan_core.dit.weights import patch_key, patch_unit, set_unit_tensor
from wan_core.offload.buffers import BlockLayout, PinnedBuffer

if TYPE_CHECKING:
    from wan_core.offload.placement import WeightPlacement


def block_prefix(index: int) -> str:
    return f"blocks.{index}."


class BlockSwap:
    """Streams blocks `blocks` of a model to `device` during each forward pass.

    `placement` holds the base host copies (`placement.host`, by full name); in pinned mode
    this object replaces the swapped blocks' entries there with views into its pinned buffers.
    `base_tensors(i)` gives block i's base tensors (name relative to the block) wherever they are.
    """

    def __init__(self, placement: "WeightPlacement", blocks: Sequence[int], device: torch.device, *,
                 prefetch: int, pinned: bool, base_tensors, reuse: Optional["BlockSwap"] = None):
        if not blocks:
            raise ValueError("block swap needs at least one block to swap")
        self._placement = weakref.ref(placement)
        self.order = sorted(blocks)
        self.position = {block: j for j, block in enumerate(self.order)}
        self.device = device
        self.prefetch = prefetch
        self.pinned = pinned
        self.num_slots = min(prefetch + 1, len(self.order))
        bases = {i: base_tensors(i) for i in self.order}
        self.layout = BlockLayout.of(bases[self.order[0]])
        for i, tensors in bases.items():
            if BlockLayout.of(tensors).signature() != self.layout.signature():
                raise ValueError(f"block {i} does not have the tensors of block {self.order[0]} (names, shapes, "
                                 f"dtypes); block swap needs identically stored blocks")
        self._arenas: dict[int, PinnedBuffer] = {}
        handed_over = reuse._arenas if reuse is not None and reuse.pinned and pinned and \
            reuse.layout.signature() == self.layout.signature() else {}
        if pinned:
            for i, tensors in bases.items():
                if i in handed_over:  # already holds this block's base: taken, not copied
                    self._arenas[i] = handed_over.pop(i)
                    continue
                arena = self._arenas[i] = PinnedBuffer(self.layout.nbytes)
                self.layout.pack(tensors, arena.tensor)
                for name, view in self.layout.views(arena.tensor).items():
                    placement.host[block_prefix(i) + name] = view
        else:
            for i, tensors in bases.items():
                for name, value in tensors.items():
                    placement.host.setdefault(block_prefix(i) + name,
                                              value.detach() if value.device.type == "cpu" else value.to("cpu"))
        self._staging: list[PinnedBuffer] = []
        self._worker: Optional[ThreadPoolExecutor] = None
        self._slots: list[torch.Tensor] = []
        self._contents: list[Optional[tuple]] = [None] * self.num_slots
        self._pending: list[Optional[Future]] = [None] * self.num_slots
        self._ready: list = []
        self._free: list = []
        self._copy_stream = None
        self._turn: Optional[int] = None  # the block whose parameters point at a slot now

    # --- what the model and the budget ask -------------------------------------------------

    def settings(self) -> tuple:
        return self.order, self.device, self.prefetch, self.pinned

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def device_bytes(self) -> int:
        """Device memory the slots take."""
        return self.num_slots * self.layout.nbytes

    def pinned_bytes(self) -> int:
        return sum(a.nbytes for a in self._arenas.values()) + sum(s.nbytes for s in self._staging)

    def pinned_blocks(self) -> set[int]:
        """The blocks whose base lives in this object's pinned buffers."""
        return set(self._arenas)

    def pinned_names(self) -> set[str]:
        return {block_prefix(i) + s.name for i in self._arenas for s in self.layout.slots}

    # --- one forward pass ----------------------------------------------------------------------

    def blocks_in_turn(self, model: nn.Module, blocks: Sequence[nn.Module]) -> Iterator[nn.Module]:
        """Yield `blocks` in order; each swapped one has its weights on the device while it is
        out (its kernels are queued then), and the next ones are copied meanwhile."""
        self.begin(model)
        for index, block in enumerate(blocks):
            if index not in self.position:
                yield block
                continue
            j = self.position[index]
            self._acquire(model, j)
            yield block
            self._release(model, j)
        for j in range(min(self.prefetch, len(self.order))):
            self._ensure(model, j)  # the next forward's first blocks, during the head and in between

    def begin(self, model: nn.Module) -> None:
        """Start a forward pass: recover from one that stopped half-way, start the first copies."""
        if self._turn is not None:  # a forward raised while a block was out: its kernels are queued
            self._park(model, self._turn)
            if self.on_cuda:
                for event in self._free:
                    event.record(torch.cuda.current_stream(self.device))
        for j in range(min(self.prefetch + 1, len(self.order))):
            self._ensure(model, j)

    def _acquire(self, model: nn.Module, j: int) -> None:
        for ahead in range(j, min(j + self.prefetch + 1, len(self.order))):
            self._ensure(model, ahead)
        slot = j % self.num_slots
        if self._pending[slot] is not None:
            self._pending[slot].result()
            self._pending[slot] = None
        if self.on_cuda:
            torch.cuda.current_stream(self.device).wait_event(self._ready[slot])
        module = model.blocks[self.order[j]]
        for name, view in self.layout.views(self._slots[slot]).items():
            set_unit_tensor(module, name, view)
        self._turn = j

    def _release(self, model: nn.Module, j: int) -> None:
        if self.on_cuda:
            self._free[j % self.num_slots].record(torch.cuda.current_stream(self.device))
        self._park(model, j)

    def _park(self, model: nn.Module, j: int) -> None:
        """Point block j's parameters back at its host copy."""
        index = self.order[j]
        host = self._placement().host
        module = model.blocks[index]
        for s in self.layout.slots:
            set_unit_tensor(module, s.name, host[block_prefix(index) + s.name])
        self._turn = None

    # --- copies --------------------------------------------------------------------------------

    def _ensure(self, model: nn.Module, j: int) -> None:
        """Make sure slot j % num_slots holds (or is being filled with) the j-th swapped block
        with the current patches."""
        slot = j % self.num_slots
        placement = self._placement()
        wanted = (self.order[j], patch_key(placement.patches))
        if self._contents[slot] == wanted:
            return
        self._allocate()
        self._contents[slot] = wanted
        if self.pinned:
            self._copy(self._arenas[self.order[j]].tensor, slot, self.order[j], placement.patches)
        else:
            self._pending[slot] = self._worker.submit(self._stage, slot, self.order[j], placement.patches)

    def _stage(self, slot: int, index: int, patches) -> None:
        """Worker thread: host copy -> staging buffer (CPU memcpy) -> device slot (async)."""
        staging = self._staging[slot].tensor
        if self.on_cuda:
            self._ready[slot].synchronize()  # the last copy out of this staging buffer is done
        host = self._placement().host
        self.layout.pack({s.name: host[block_prefix(index) + s.name] for s in self.layout.slots}, staging)
        self._copy(staging, slot, index, patches)

    def _copy(self, source: torch.Tensor, slot: int, index: int, patches) -> None:
        with self._on_copy_stream():
            if self.on_cuda:
                self._copy_stream.wait_event(self._free[slot])  # queued kernels no longer read it
            target = self._slots[slot]
            target.copy_(source, non_blocking=self.on_cuda)
            views = self.layout.views(target)
            patched = patch_unit(patches, block_prefix(index), views)
            for name, value in patched.items():
                if value is not views[name]:
                    views[name].copy_(value)
            if self.on_cuda:
                self._ready[slot].record(self._copy_stream)

    def _on_copy_stream(self):
        return torch.cuda.stream(self._copy_stream) if self.on_cuda else contextlib.nullcontext()

    def _allocate(self) -> None:
        if self._slots:
            return
        self._slots = [torch.empty(self.layout.nbytes, dtype=torch.uint8, device=self.device)
                       for _ in range(self.num_slots)]
        if self.on_cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._ready = [torch.cuda.Event() for _ in range(self.num_slots)]
            self._free = [torch.cuda.Event() for _ in range(self.num_slots)]
        if not self.pinned:
            if not self._staging:  # allocated once per model, kept while the model lives
                self._staging = [PinnedBuffer(self.layout.nbytes) for _ in range(self.num_slots)]
            if self._worker is None:
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wan-block-swap")
                weakref.finalize(self, self._worker.shutdown, wait=False)

    # --- changes ------------------------------------------------------------------------------

    def drain(self) -> None:
        """Wait for every copy in flight."""
        for slot, pending in enumerate(self._pending):
            if pending is not None:
                pending.result()
                self._pending[slot] = None
        if self._copy_stream is not None:
            self._copy_stream.synchronize()

    def invalidate(self) -> None:
        """Forget what the slots hold (the patches or the host copies changed)."""
        self.drain()
        self._contents = [None] * self.num_slots

    def deactivate(self) -> None:
        """Free the device slots (the model leaves the device); host copies stay."""
        self.invalidate()
        if self.on_cuda and self._slots:
            torch.cuda.current_stream(self.device).synchronize()
        self._slots, self._ready, self._free, self._copy_stream = [], [], [], None

    def close(self) -> None:
        """Free everything, the page-locked host memory included."""
        self.deactivate()
        for buffer in [*self._arenas.values(), *self._staging]:
            buffer.close()
        self._arenas, self._staging = {}, []
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
