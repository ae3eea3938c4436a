"""One generation over the processes torchrun started (the CLI's --ulysses_size, --cfg_parallel,
--dit_fsdp, --t5_fsdp): the task's models set up for this rank, one seed for all, stops agreed.

Every rank loads the models, runs the same pipeline on the same inputs and ends with the same
latent; rank 0 alone decodes and writes files.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.distributed as dist

from wan_core.parallel.fsdp import shard_text_encoder
from wan_core.parallel.groups import ParallelConfig, ParallelGroups, init_groups


def distribute_task_models(models, config: ParallelConfig, device: torch.device, *, offload_model: bool,
                           t5_cpu: bool):
    """`models` (a `TaskModels` loaded with its DiTs and text encoder on the CPU) set up for this
    rank: experts split and sharded as `config` says and placed on `device` unless
    `offload_model`; the text encoder sharded (t5_fsdp), kept on the CPU (`t5_cpu`) or placed.
    Returns (TaskModels, ParallelGroups)."""
    from wan_core.parallel import parallelize
    from wan_core.pipeline.video import _expert_list

    groups = init_groups(config, device)
    experts = parallelize(_expert_list(models.experts), groups)
    if not offload_model:
        for expert in experts:
            expert.to(device)
    text_encoder = models.text_encoder
    if config.t5_fsdp:
        shard_text_encoder(text_encoder, groups.fsdp_mesh())
    elif not (t5_cpu or offload_model):
        text_encoder.to(device)
    distributed = dataclasses.replace(models, experts=tuple(experts) if len(experts) > 1 else experts[0],
                                      text_encoder=text_encoder, offload_model=offload_model,
                                      t5_cpu=t5_cpu and not config.t5_fsdp)
    return distributed, groups


def same_on_all_ranks(value, src: int = 0):
    """Rank `src`'s `value` (any picklable object) on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(check: Optional[Callable[[], bool]], device: torch.device) -> Callable[[], bool]:
    """A stop check that is true on every rank as soon as it is true on one, so that all ranks
    stop after the same step (a rank that stopped alone would leave the others waiting in a
    collective). Every rank must call it the same number of times."""
    def agreed() -> bool:
        flag = torch.tensor([float(bool(check and check()))], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    return agreed


__all__ = ["ParallelGroups", "any_rank", "distribute_task_models", "same_on_all_ranks"]
