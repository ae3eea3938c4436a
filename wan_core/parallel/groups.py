"""How the ranks of one generation are arranged: Ulysses groups, CFG-parallel pairs, the FSDP mesh.

With `ulysses_size` U and CFG-parallel the world is 2U ranks: ranks 0..U-1 run the conditional
pass, U..2U-1 the unconditional one, each half splitting the tokens over its U ranks; rank i
and rank i + U form a pair that swaps the two predictions after every step. Without
CFG-parallel the world is U ranks running both passes one after the other. FSDP shards weights
over the whole world (every rank runs the same modules in the same order).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from wan_core.parallel.ulysses import check_heads


@dataclass(frozen=True)
class ParallelConfig:
    """What the user asked for (the CLI's --ulysses_size, --cfg_parallel, --dit_fsdp, --t5_fsdp)."""

    ulysses_size: int = 1
    cfg_parallel: bool = False
    dit_fsdp: bool = False
    t5_fsdp: bool = False

    @property
    def world_size(self) -> int:
        return self.ulysses_size * (2 if self.cfg_parallel else 1)

    def check(self, world_size: int, num_heads: int, what: str = "the model") -> None:
        """Clear ValueErrors for settings that cannot run on `world_size` processes (checked before
        any model loads)."""
        if isinstance(self.ulysses_size, bool) or not isinstance(self.ulysses_size, int) or self.ulysses_size < 1:
            raise ValueError(f"ulysses_size must be a whole number >= 1, got {self.ulysses_size!r}")
        if world_size != self.world_size:
            how = f"ulysses_size {self.ulysses_size}" + (" x 2 (cfg_parallel)" if self.cfg_parallel else "")
            raise ValueError(f"{world_size} process(es) were started but {how} needs {self.world_size}: start "
                             f"`torchrun --nproc_per_node {self.world_size} ...`, or change --ulysses_size/--cfg_parallel")
        if world_size == 1 and (self.dit_fsdp or self.t5_fsdp):
            raise ValueError("--dit_fsdp/--t5_fsdp shard weights over several processes; with one process "
                             "leave them off (or start several with torchrun)")
        check_heads(num_heads, self.ulysses_size, what)


@dataclass
class ParallelGroups:
    """This rank's place in the arrangement above, with the process groups it talks through."""

    config: ParallelConfig
    rank: int
    world_size: int
    device: torch.device
    ulysses_group: Optional[dist.ProcessGroup]  # None: one rank per pass, tokens not split
    cfg_group: Optional[dist.ProcessGroup]  # the (conditional, unconditional) pair, with cfg_parallel
    cfg_index: int  # 0: this rank runs the conditional pass, 1: the unconditional one

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def fsdp_mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.world_size,))


def init_groups(config: ParallelConfig, device: torch.device) -> ParallelGroups:
    """Create the groups of `config` (every rank calls this, in the same order). The default
    process group must be initialized; its size must be `config.world_size`."""
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if world_size != config.world_size:
        raise ValueError(f"the process group has {world_size} ranks; {config} needs {config.world_size}")
    size = config.ulysses_size
    ulysses_group = cfg_group = None
    # new_group is collective: every rank creates every group, then keeps its own
    for start in range(0, world_size, size):
        group = dist.new_group(list(range(start, start + size))) if size > 1 else None
        if start <= rank < start + size:
            ulysses_group = group
    if config.cfg_parallel:
        for i in range(size):
            group = dist.new_group([i, i + size])
            if rank % size == i:
                cfg_group = group
    return ParallelGroups(config=config, rank=rank, world_size=world_size, device=device,
                          ulysses_group=ulysses_group, cfg_group=cfg_group, cfg_index=rank // size)


def init_distributed(device: Optional[torch.device] = None) -> tuple[torch.device, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*):
    NCCL on CUDA, gloo on the CPU. Returns (this rank's device, world size); a single process
    (no WORLD_SIZE or 1) initializes nothing."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # one GPU per rank
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return device, world_size
