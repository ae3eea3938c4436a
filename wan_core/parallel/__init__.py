"""Several processes (GPUs) for one video: Ulysses sequence parallelism, CFG-parallel, FSDP2.

- `ulysses`: the tokens split over a group of ranks, self-attention through all-to-all;
- `cfg`: the conditional and unconditional passes on two halves of the ranks;
- `fsdp`: weights sharded over all ranks (FSDP2);
- `groups`: how ranks are arranged and the checks done before any model loads;
- `workers`: a persistent group of worker processes (one per GPU) fed over a local channel,
  which the ComfyUI sampler hands its work to.

Built on torch.distributed's own collectives (NCCL on GPUs, gloo on CPUs); see ulysses.py.
"""
from __future__ import annotations

from typing import Sequence

from wan_core.parallel.cfg import CFGParallelExpert
from wan_core.parallel.fsdp import shard_dit, shard_text_encoder, weight_bytes
from wan_core.parallel.groups import ParallelConfig, ParallelGroups, init_distributed, init_groups
from wan_core.parallel.ulysses import SequenceParallel, check_heads, enable_sequence_parallel


def parallelize(experts: Sequence, groups: ParallelGroups) -> list:
    """The experts set up for `groups` (every rank calls this with its own copies): tokens split
    over the Ulysses group, weights sharded with `dit_fsdp`, and with CFG-parallel each wrapped so
    that the sampler runs its two passes on the two halves of the ranks."""
    config = groups.config
    mesh = groups.fsdp_mesh() if config.dit_fsdp else None
    ready: dict[int, object] = {}  # one set-up per model, however often it is listed
    for expert in experts:
        if id(expert) in ready:
            continue
        check_heads(expert.config.num_heads, config.ulysses_size, f"this {expert.config.model_type} DiT")
        enable_sequence_parallel(expert, groups.ulysses_group)
        if mesh is not None:
            shard_dit(expert, mesh)
        ready[id(expert)] = CFGParallelExpert(expert, groups) if config.cfg_parallel else expert
    return [ready[id(expert)] for expert in experts]


__all__ = ["CFGParallelExpert", "ParallelConfig", "ParallelGroups", "SequenceParallel", "check_heads",
           "enable_sequence_parallel", "init_distributed", "init_groups", "parallelize", "shard_dit",
           "shard_text_encoder", "weight_bytes"]
