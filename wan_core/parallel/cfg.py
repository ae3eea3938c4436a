"""Classifier-free guidance in parallel: the conditional and unconditional passes of a step run
at the same time on two halves of the ranks (see `groups`), and each rank of a pair then has both.

The sampler asks an expert that has `cond_and_uncond` for both predictions at once; everything
else (the guidance formula, the solver) stays the sampler's, so the result is serial CFG's.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from wan_core.parallel.groups import ParallelGroups
from wan_core.parallel.ulysses import all_gather


class CFGParallelExpert:
    """A model as the sampler calls it (`expert(x, t, context, y=...)`, `.config`, `.to`), whose
    guided steps split the two passes over the CFG pair of `groups`."""

    def __init__(self, model: torch.nn.Module, groups: ParallelGroups):
        if groups.cfg_group is None:
            raise ValueError("CFGParallelExpert needs groups made with cfg_parallel=True")
        self.model = model
        self.groups = groups

    @property
    def config(self):
        return self.model.config

    def to(self, device) -> "CFGParallelExpert":
        self.model.to(device)
        return self

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: Any, **kwargs) -> torch.Tensor:
        return self.model(x, t, context, **kwargs)

    def cond_and_uncond(self, x: torch.Tensor, t: torch.Tensor, context: Any, context_null: Any, *,
                        y: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        mine = self.model(x, t, context_null if self.groups.cfg_index else context, y=y)
        both = all_gather(mine, 0, self.groups.cfg_group)
        return both[:x.shape[0]], both[x.shape[0]:]
