"""Ulysses sequence parallelism (DeepSpeed-Ulysses, arXiv 2309.14509) for the one `WanDiT`.

Each of the P ranks of a group holds 1/P of the video tokens through the whole network. Every
token-wise part (norms, modulation, q/k/v/o projections, cross-attention to the text, the MLP,
the head) runs on the local tokens as it is. Self-attention needs every token, so around it
an all-to-all swaps the split: q, k, v [B, L/P, N, d] become [B, L, N/P, d] (all tokens, 1/P of
the heads), attention runs per head as usual, and a second all-to-all brings the output back
to [B, L/P, N, d]. So N heads must divide by P (40 heads: P in 2, 4, 5, 8, 10; TI2V-5B's 24:
2, 3, 4, 6, 8); other sizes are refused with a clear error (`check_heads`), as the reference
does: an uneven head split would leave the ranks with more heads waiting for the slowest.

A token count that does not divide by P is padded at the end to the next multiple. The padded
tokens never reach a real one: attention reads keys and values of the first L tokens only,
RoPE rotates them by nothing, their timesteps are 0, and the gather after the head drops them.
The time embedding (per-token timesteps are split like the tokens) and the text embedding are
computed by every rank for itself; only the attention's all-to-alls and the final gather talk.

The all-to-alls are torch.distributed's functional `all_to_all_single` (NCCL and gloo alike, and
traceable by torch.compile inside a block); the gather after the head is a plain all_gather.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from wan_core.ops.attention import attention


def check_heads(num_heads: int, ulysses_size: int, what: str = "the model") -> None:
    """A ValueError unless `num_heads` splits evenly over `ulysses_size` ranks."""
    if num_heads % ulysses_size:
        sizes = [n for n in range(2, num_heads + 1) if num_heads % n == 0][:6]
        raise ValueError(f"ulysses_size {ulysses_size} does not divide the {num_heads} attention heads of {what}; "
                         f"Ulysses gives each rank whole heads: use ulysses_size 1 or one of {sizes}")


class SequenceParallel:
    """One forward's split of the tokens over the ranks of `group` (set on a model by
    `enable_sequence_parallel`). `split_*` cut this rank's share out of full-length tensors,
    `attention` is self-attention over the shards, `gather` rebuilds the full sequence."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_tokens = 0  # the true token count of the forward in progress

    @property
    def shard_tokens(self) -> int:
        return -(-self.num_tokens // self.size)

    def begin(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens

    def _shard(self, x: torch.Tensor, dim: int, pad_value: complex = 0) -> torch.Tensor:
        """This rank's contiguous share of dimension `dim` (length num_tokens), padded at the end."""
        padding = self.shard_tokens * self.size - x.shape[dim]
        if padding:
            pad_shape = list(x.shape)
            pad_shape[dim] = padding
            x = torch.cat([x, x.new_full(pad_shape, pad_value)], dim=dim)
        return x.narrow(dim, self.rank * self.shard_tokens, self.shard_tokens)

    def split_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [B, L/P, D]."""
        return self._shard(tokens, 1)

    def split_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Per-token timesteps [B, L] are split like the tokens; one per sample stays as it is."""
        t = torch.as_tensor(t)
        if t.ndim == 2 and t.shape[1] > 1:
            if t.shape[1] != self.num_tokens:
                raise ValueError(f"t has {t.shape[1]} per-token timesteps; the latent has {self.num_tokens} tokens")
            return self._shard(t, 1)
        return t

    def split_rope(self, rope: torch.Tensor) -> torch.Tensor:
        """[L, 1, d/2] unit complex rotations -> this shard's; padding rotates by 1 (nothing)."""
        return self._shard(rope, 0, pad_value=1)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Optional[str]) -> torch.Tensor:
        """Self-attention of [B, L/P, N, d] shards: all tokens and N/P heads per rank."""
        q, k, v = (self._tokens_to_heads(x) for x in (q, k, v))
        if self.shard_tokens * self.size != self.num_tokens:  # padded keys must get no weight
            k, v = k[:, :self.num_tokens], v[:, :self.num_tokens]
        return self._heads_to_tokens(attention(q, k, v, backend))

    def _tokens_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L/P, N, d] -> [B, L, N/P, d]: head group j goes to rank j, tokens come from all."""
        b, s, n, d = x.shape
        send = x.reshape(b, s, self.size, n // self.size, d).permute(2, 0, 1, 3, 4).contiguous()
        received = funcol.all_to_all_single(send, None, None, self.group)
        return received.permute(1, 0, 2, 3, 4).reshape(b, self.size * s, n // self.size, d)

    def _heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, N/P, d] -> [B, L/P, N, d]: the inverse swap."""
        b, length, h, d = x.shape
        send = x.reshape(b, self.size, length // self.size, h, d).transpose(0, 1).contiguous()
        received = funcol.all_to_all_single(send, None, None, self.group)
        return received.permute(1, 2, 0, 3, 4).reshape(b, length // self.size, self.size * h, d)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L/P, C] shards -> [B, L, C] on every rank, the padding removed."""
        return all_gather(x, 1, self.group)[:, :self.num_tokens]


def all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's `x` of `group`, concatenated along `dim` in rank order, on every rank."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def enable_sequence_parallel(model, group: Optional[dist.ProcessGroup]) -> None:
    """Split `model`'s video tokens over the ranks of `group` from now on (None or a group of one:
    back to one process). Every rank of the group must call the model with the same inputs."""
    check_heads(model.config.num_heads, 1 if group is None else dist.get_world_size(group))
    split = SequenceParallel(group) if group is not None and dist.get_world_size(group) > 1 else None
    model.sequence_parallel = split
    for block in model.blocks:
        block.self_attn.sequence_parallel = split


__all__ = ["SequenceParallel", "check_heads", "enable_sequence_parallel"]
