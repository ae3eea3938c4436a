"""Triton kernels of the 8-bit attention (`wan_core.ops.int8_attention` describes the recipe and
holds their plain-torch twins): a quantisation pass for q and k (int8, per-block scales, k
smoothed), one for v (e4m3, per-channel scales, written token-contiguous), and the attention
itself (FlashAttention-style online softmax over key blocks, int8 q·k and fp8 p·v on the
matrix units, both accumulated in 32 bits).

Blocks of q, k and v are read through tensor descriptors (the Hopper copy engine), the output
is written with masked stores straight into the [B, L, H, D] layout the model continues in.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from wan_core.ops.int8_attention import FP8, QuantizedQKV, padded, smoothing_mean, softmax_scale_log2, v_scales

# Triton 3.6's interpreter drops the carry when a float->fp8 cast rounds up into the next
# binade (0.49 becomes 0.25). Under the interpreter the kernels therefore round to e4m3
# precision themselves first, which makes the cast exact; on a GPU the cast is one
# round-to-nearest-even instruction and needs no help.
EXACT_FP8_CAST = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _to_e4m3(x, EXACT_FP8_CAST: tl.constexpr):
    """x (float32, |x| <= 448) rounded to float8_e4m3fn, to nearest, ties to even."""
    if EXACT_FP8_CAST:
        bits = x.to(tl.uint32, bitcast=True)
        # keep 3 of float32's 23 mantissa bits: add just under half of the dropped part, plus
        # the lowest kept bit (ties to even), then clear the dropped bits
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
        normal = bits.to(tl.float32, bitcast=True)
        # below e4m3's smallest normal (2^-6) the spacing is a fixed 2^-9 (exact ties, which
        # go away from zero here, are too rare to matter in a test)
        subnormal = tl.where(x >= 0, tl.floor(x * 512.0 + 0.5), -tl.floor(0.5 - x * 512.0)) / 512.0
        x = tl.where(tl.abs(x) < 0.015625, subnormal, normal)
    return x.to(tl.float8e4nv)


@triton.jit
def _load_token_block(x_ptr, stride_b, stride_l, stride_h, heads, length,
                      HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block of BLOCK tokens of one head of x [B, L, H, D] in float32 (zeros past
    `length`): (block index, batch * heads + head, token indices, channel indices, values)."""
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    tokens = block * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    x = tl.load(x_ptr + b.to(tl.int64) * stride_b + tokens[:, None] * stride_l + h * stride_h + dims[None, :],
                mask=tokens[:, None] < length, other=0.0).to(tl.float32)
    return block, bh, tokens, dims, x


@triton.jit
def _quantize_blocks(x_ptr, mean_ptr, out_ptr, scale_ptr, premul,
                     stride_b, stride_l, stride_h, heads, length, length_pad,
                     HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, SMOOTH: tl.constexpr):
    """One block of BLOCK tokens of one head of x [B, L, H, D] -> int8 rows of out [B*H*L_pad, D]
    and its absmax scale; SMOOTH subtracts mean [B*H, D] first."""
    block, bh, tokens, dims, x = _load_token_block(x_ptr, stride_b, stride_l, stride_h, heads, length,
                                                   HEAD_DIM, BLOCK)
    inside = tokens[:, None] < length
    if SMOOTH:
        x = tl.where(inside, x - tl.load(mean_ptr + bh * HEAD_DIM + dims)[None, :], 0.0)
    x = x * premul
    absmax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = tl.where(absmax > 0, absmax / 127.0, 1.0)
    tl.store(scale_ptr + bh * (length_pad // BLOCK) + block, scale)
    x = x / scale
    quantized = tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int8)  # the cast truncates
    rows = bh.to(tl.int64) * length_pad + tokens
    tl.store(out_ptr + rows[:, None] * HEAD_DIM + dims[None, :], quantized)


@triton.jit
def _quantize_v(v_ptr, scale_ptr, out_ptr, stride_b, stride_l, stride_h, heads, length, length_pad,
                HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, EXACT_FP8_CAST: tl.constexpr):
    """One block of tokens of one head of v [B, L, H, D] / scale [B*H, D] -> e4m3 columns of out
    [B*H*D, L_pad] (token-contiguous)."""
    _, bh, tokens, dims, v = _load_token_block(v_ptr, stride_b, stride_l, stride_h, heads, length, HEAD_DIM, BLOCK)
    v = v / tl.load(scale_ptr + bh * HEAD_DIM + dims)[None, :]
    v = _to_e4m3(tl.minimum(tl.maximum(v, -448.0), 448.0), EXACT_FP8_CAST)
    rows = bh.to(tl.int64) * HEAD_DIM + dims
    tl.store(out_ptr + rows[None, :] * length_pad + tokens[:, None], v)


@triton.jit
def _attend_block(acc, row_sum, row_max, q, q_scale, k_desc, v_desc, k_scale_ptr, kv_row, v_row, start, k_len,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EXACT_FP8_CAST: tl.constexpr):
    """Fold key block [start, start + BLOCK_N) into the running (acc, row_sum, row_max)."""
    k = k_desc.load([kv_row + start, 0])
    qk = tl.dot(q, k.T, out_dtype=tl.int32).to(tl.float32)
    scale = q_scale * tl.load(k_scale_ptr + start // BLOCK_N)
    if MASKED:
        keys = start + tl.arange(0, BLOCK_N)
        qk = tl.where(keys[None, :] < k_len, qk, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(qk, 1) * scale)
    p = tl.math.exp2(qk * scale - new_max[:, None])
    alpha = tl.math.exp2(row_max - new_max)
    row_sum = row_sum * alpha + tl.sum(p, 1)
    v = v_desc.load([v_row, start]).T
    acc = acc * alpha[:, None]
    acc = tl.dot(_to_e4m3(p * 448.0, EXACT_FP8_CAST), v, acc)
    return acc, row_sum, new_max


@triton.jit
def _attention(q_desc, k_desc, v_desc, q_scale_ptr, k_scale_ptr, v_scale_ptr, out_ptr,
               stride_ob, stride_ol, stride_oh, heads, q_len, k_len, k_full, q_len_pad, k_len_pad,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               EXACT_FP8_CAST: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    block = tl.program_id(0)
    bh = tl.program_id(1)
    q = q_desc.load([bh * q_len_pad + block * BLOCK_M, 0])
    q_scale = tl.load(q_scale_ptr + bh * (q_len_pad // BLOCK_M) + block)
    k_scale_ptr += bh * (k_len_pad // BLOCK_N)
    kv_row = bh * k_len_pad
    v_row = bh * HEAD_DIM
    row_max = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in tl.range(0, k_full, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        acc, row_sum, row_max = _attend_block(acc, row_sum, row_max, q, q_scale, k_desc, v_desc, k_scale_ptr,
                                              kv_row, v_row, start, k_len, BLOCK_N, False, EXACT_FP8_CAST)
    if k_full < k_len:  # the last, partly filled key block
        acc, row_sum, row_max = _attend_block(acc, row_sum, row_max, q, q_scale, k_desc, v_desc, k_scale_ptr,
                                              kv_row, v_row, k_full, k_len, BLOCK_N, True, EXACT_FP8_CAST)
    dims = tl.arange(0, HEAD_DIM)
    out = acc * (tl.load(v_scale_ptr + bh * HEAD_DIM + dims)[None, :] / 448.0) / row_sum[:, None]
    tokens = block * BLOCK_M + tl.arange(0, BLOCK_M)
    b = bh // heads
    h = bh % heads
    pointers = out_ptr + b.to(tl.int64) * stride_ob + tokens[:, None] * stride_ol + h * stride_oh + dims[None, :]
    tl.store(pointers, out.to(out_ptr.dtype.element_ty), mask=tokens[:, None] < q_len)


def _quantize_qk(x: torch.Tensor, block: int, premul: float, mean: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    batch, length, heads, dim = x.shape
    length_pad = padded(length, block)
    out = torch.empty(batch * heads * length_pad, dim, dtype=torch.int8, device=x.device)
    scale = torch.empty(batch, heads, length_pad // block, dtype=torch.float32, device=x.device)
    _quantize_blocks[(length_pad // block, batch * heads)](
        x, mean if mean is not None else scale, out, scale, premul, x.stride(0), x.stride(1), x.stride(2),
        heads, length, length_pad, HEAD_DIM=dim, BLOCK=block, SMOOTH=mean is not None)
    return out.view(batch, heads, length_pad, dim), scale


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int, block_n: int) -> QuantizedQKV:
    """The kernels' quantisation pass (twin: `int8_attention.quantize_reference`)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (head) dimension, got strides {x.stride()}")
    q_i8, q_scale = _quantize_qk(q, block_m, softmax_scale_log2(q.shape[-1]), None)
    k_i8, k_scale = _quantize_qk(k, block_n, 1.0, smoothing_mean(k).contiguous())
    batch, length, heads, dim = v.shape
    length_pad = padded(length, block_n)
    scale_v = v_scales(v).contiguous()
    v_fp8 = torch.empty(batch * heads * dim, length_pad, dtype=FP8, device=v.device)
    _quantize_v[(length_pad // block_n, batch * heads)](
        v, scale_v, v_fp8, v.stride(0), v.stride(1), v.stride(2), heads, length, length_pad,
        HEAD_DIM=dim, BLOCK=block_n, EXACT_FP8_CAST=EXACT_FP8_CAST)
    return QuantizedQKV(q_i8, q_scale, k_i8, k_scale, v_fp8.view(batch, heads, dim, length_pad), scale_v,
                        q.shape[1], length, block_m, block_n)


def attention(quantized: QuantizedQKV, out_dtype: torch.dtype, *, num_warps: int = 4, num_stages: int = 3,
              warp_specialize: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v from the quantised inputs -> [B, L_q, H, D] in `out_dtype`
    (twin: `int8_attention.attention_reference`). `warp_specialize` asks Triton to split the
    key loop into producer and consumer warps (a speed choice; the same numbers)."""
    qz = quantized
    batch, heads, q_len_pad, dim = qz.q.shape
    k_len_pad = qz.k.shape[2]
    q_desc = TensorDescriptor.from_tensor(qz.q.contiguous().view(-1, dim), [qz.block_m, dim])
    k_desc = TensorDescriptor.from_tensor(qz.k.contiguous().view(-1, dim), [qz.block_n, dim])
    v_desc = TensorDescriptor.from_tensor(qz.v.contiguous().view(-1, k_len_pad), [dim, qz.block_n])
    out = torch.empty(batch, qz.q_len, heads, dim, dtype=out_dtype, device=qz.q.device)
    _attention[(q_len_pad // qz.block_m, batch * heads)](
        q_desc, k_desc, v_desc, qz.q_scale, qz.k_scale, qz.v_scale, out, out.stride(0), out.stride(1), out.stride(2),
        heads, qz.q_len, qz.k_len, qz.k_len // qz.block_n * qz.block_n, q_len_pad, k_len_pad, HEAD_DIM=dim, BLOCK_M=qz.block_m, BLOCK_N=qz.block_n,
        EXACT_FP8_CAST=EXACT_FP8_CAST, WARP_SPECIALIZE=warp_specialize, num_warps=num_warps, num_stages=num_stages)
    return out
