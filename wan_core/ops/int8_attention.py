"""8-bit attention: int8 q·k with per-block scales and a smoothed k, fp8 p·v with per-channel v scales.

The recipe is SageAttention 2's (Zhang et al., 2024), written here from its description:

- k is smoothed: its mean over the tokens is subtracted per head and channel. Every score of a
  query row then drops by the same q·mean(k), which the softmax cancels exactly, while the
  values left to quantise are centred (k's channels carry large shared offsets).
- q (with the softmax scale 1/sqrt(d) and log2(e) folded in, so scores come out in the base-2
  domain the kernel's exp2 wants) and the smoothed k are quantised to int8, one absmax scale
  per block of `block_m` query / `block_n` key tokens per head; q·k is an exact int32 product.
- v is quantised to float8_e4m3fn with one scale per head and channel; the probabilities
  (in [0, 1] after the online softmax) are multiplied by 448, the largest e4m3 value, and
  rounded to e4m3 too, so that p·v runs on the fp8 matrix units with float32 accumulation.

`attention_reference` is the plain-torch twin of the Triton kernel in
`wan_core.ops.kernels.int8_fp8_attention`: the same quantised inputs, the same block-by-block
online softmax, the same roundings, in float32. `quantize_reference` is the twin of the kernel's
quantisation pass. The kernel is what runs on GPUs (`int8_fp8_attention`); the twins are what
tests compare it with, on any device.

Tensors are [batch, tokens, heads, head_dim] like everywhere in `wan_core.ops.attention`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8 = torch.float8_e4m3fn
LOG2_E = 1.4426950408889634
# Kernel tiling (tokens per block), from the H200 sweep in bench/RESULTS.md. The quantisation
# scales follow the same blocks, so they are part of the numerics, not only of the speed.
BLOCK_M = 128
BLOCK_N = 64


@dataclass
class QuantizedQKV:
    """The kernel's inputs. Token counts are padded with zeros to whole blocks.

    q, k: int8 [B, H, L_pad, D]; q_scale [B, H, L_q_pad / block_m], k_scale [B, H, L_k_pad /
    block_n] float32; v: float8_e4m3fn [B, H, D, L_k_pad] (tokens contiguous: the layout the fp8
    matrix units read the second operand of p·v in); v_scale [B, H, D] float32."""

    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor
    q_len: int
    k_len: int
    block_m: int
    block_n: int


def padded(length: int, block: int) -> int:
    return -(-length // block) * block


def softmax_scale_log2(head_dim: int) -> float:
    """The factor q is multiplied by before quantisation: 1/sqrt(d) for the softmax, log2(e) so
    that exp(s) becomes exp2(s)."""
    return LOG2_E / math.sqrt(head_dim)


def smoothing_mean(k: torch.Tensor) -> torch.Tensor:
    """Mean of k over its tokens per batch, head and channel: [B, H, D] float32."""
    return k.mean(dim=1, dtype=torch.float32)


def v_scales(v: torch.Tensor) -> torch.Tensor:
    """Per head and channel absmax of v over the tokens / 448: [B, H, D] float32 (1 where the
    channel is all zeros, so that it quantises to zeros rather than NaN)."""
    absmax = torch.maximum(v.amax(dim=1).abs(), v.amin(dim=1).abs()).float()
    return torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, halves away from zero (what the kernel's +-0.5 and
    truncating int8 conversion do)."""
    return torch.where(x >= 0, x + 0.5, x - 0.5).trunc()


def _block_absmax_int8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [B, L, H, D] -> (int8 [B, H, L_pad, D], scale [B, H, L_pad / block])."""
    batch, length, heads, dim = x.shape
    x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, padded(length, block) - length))
    blocks = x.permute(0, 2, 1, 3).reshape(batch, heads, -1, block, dim)
    absmax = blocks.abs().amax(dim=(-2, -1))
    scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))
    quantized = round_half_away(blocks / scale[..., None, None]).to(torch.int8)
    return quantized.reshape(batch, heads, -1, dim).contiguous(), scale.contiguous()


def quantize_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int = BLOCK_M,
                       block_n: int = BLOCK_N) -> QuantizedQKV:
    """The quantisation pass in plain torch (the twin of the kernel's)."""
    head_dim = q.shape[-1]
    q_i8, q_scale = _block_absmax_int8(q.float() * softmax_scale_log2(head_dim), block_m)
    k_i8, k_scale = _block_absmax_int8(k.float() - smoothing_mean(k)[:, None], block_n)
    scale_v = v_scales(v)
    length = v.shape[1]
    v_fp8 = (v.float() / scale_v[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    v_fp8 = torch.nn.functional.pad(v_fp8.permute(0, 2, 3, 1).view(torch.uint8),
                                    (0, padded(length, block_n) - length)).view(FP8).contiguous()
    return QuantizedQKV(q_i8, q_scale, k_i8, k_scale, v_fp8, scale_v, q.shape[1], length, block_m, block_n)


def attention_reference(quantized: QuantizedQKV) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v from the quantised inputs, computed as the kernel does: key
    blocks in order, a running row maximum, p rounded to e4m3 (times 448) before p·v.
    Returns float32 [B, L_q, H, D]."""
    qz = quantized
    q = qz.q.float()
    q_scale = qz.q_scale.repeat_interleave(qz.block_m, dim=2)[..., None]  # one per query row
    batch, heads, q_pad, dim = q.shape
    row_max = torch.full((batch, heads, q_pad), -math.inf, device=q.device)
    row_sum = torch.zeros(batch, heads, q_pad, device=q.device)
    acc = torch.zeros(batch, heads, q_pad, dim, device=q.device)
    for start in range(0, qz.k_len, qz.block_n):
        k = qz.k[:, :, start:start + qz.block_n].float()
        # the int8 product is exact in float32 (|sum| <= 127^2 * d < 2^24 for d <= 1024)
        scores = torch.einsum("bhmd,bhnd->bhmn", q, k) * (q_scale * qz.k_scale[:, :, start // qz.block_n, None, None])
        keys = start + torch.arange(qz.block_n, device=q.device)
        scores = scores.masked_fill(keys >= qz.k_len, -math.inf)
        new_max = torch.maximum(row_max, scores.amax(-1))
        p = torch.exp2(scores - new_max[..., None])
        alpha = torch.exp2(row_max - new_max)
        row_sum = row_sum * alpha + p.sum(-1)
        p_fp8 = (p * FP8_MAX).to(FP8).float()
        v = qz.v[..., start:start + qz.block_n].float()  # [B, H, D, block_n]
        acc = acc * alpha[..., None] + torch.einsum("bhmn,bhdn->bhmd", p_fp8, v)
        row_max = new_max
    out = acc * (qz.v_scale[:, :, None, :] / FP8_MAX) / row_sum[..., None]
    return out[:, :, :qz.q_len].transpose(1, 2)


def int8_fp8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int = BLOCK_M,
                                 block_n: int = BLOCK_N) -> torch.Tensor:
    """The 8-bit attention in plain torch on any device, returned in q's dtype."""
    return attention_reference(quantize_reference(q, k, v, block_m=block_m, block_n=block_n)).to(q.dtype)


# Launch settings of the attention kernel, from the same sweep as BLOCK_M / BLOCK_N.
NUM_WARPS = 4
NUM_STAGES = 3
WARP_SPECIALIZE = False


@torch.library.custom_op("wan22::int8_fp8_attention", mutates_args=())
def int8_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The 8-bit attention on a CUDA GPU through the Triton kernels, in q's dtype. A custom op,
    so that torch.compile'd blocks call the kernels as they are instead of tracing into them."""
    from wan_core.ops.kernels import int8_fp8_attention as kernels

    quantized = kernels.quantize(q, k, v, block_m=BLOCK_M, block_n=BLOCK_N)
    return kernels.attention(quantized, q.dtype, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
                             warp_specialize=WARP_SPECIALIZE)


@int8_fp8_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty(*q.shape[:-1], v.shape[-1])
