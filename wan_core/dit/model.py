"""The Wan2.x diffusion transformer: one class for t2v, i2v and ti2v, its shape from a `DiTConfig`.

Parameter names are the reference's, so official and ComfyUI files load without renaming.
Precision follows the reference: the timestep embedding, the modulation arithmetic, the
residual stream and the output head run in float32 whatever the weights' dtype; the attention
and MLP matrices run in the weights' dtype (bf16 for real use).

Shapes: B batch, C channels, F/H/W latent frames/height/width, L = (F/pf)(H/ph)(W/pw)
tokens, D model width, N heads, d = D/N head size (128 for every Wan model).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from wan_core.configs import DiTConfig
from wan_core.dit.weights import WeightPatches
from wan_core.offload.placement import WeightPlacement
from wan_core.ops.attention import AUTO, attention, check_backend, resolve_backend
from wan_core.ops.fused import apply_rope, modulate, norm_modulate, residual_norm_modulate, rms_norm_rope

ROPE_THETA = 10000.0
ROPE_MAX_POSITIONS = 1024  # the reference's table length per axis
# Row-wise work (everything but the attention itself) runs in chunks of this many tokens, so its
# intermediates take one chunk's memory: at 720p x 81 frames (75600 tokens) a block's activation
# peak drops from about 13 to 7 times the size of one [tokens, dim] bf16 tensor. Below it, one chunk.
CHUNK_TOKENS = 8192


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(t w_j), sin(t w_j)] with w_j = 10000^(-j/(dim/2)), computed in float64 like the
    reference (timesteps up to 1000 lose digits in float32), returned as float32."""
    half = dim // 2
    frequencies = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timesteps.device) / half)
    angles = timesteps.to(torch.float64)[..., None] * frequencies
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).float()


def rope_axis_sizes(head_dim: int) -> tuple[int, int, int]:
    """How many of the head's channel pairs rotate with the frame, row and column index.

    The reference gives height and width d//6 pairs each and the frame axis the rest
    (128 -> 22, 21, 21 pairs)."""
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def rope_angles(grid: tuple[int, int, int], head_dim: int, device: torch.device) -> torch.Tensor:
    """Rotation angle of every (token, channel pair): [L, head_dim/2], float64.

    Each axis has its own frequency ladder theta^(-2j/n_axis) over its n_axis channels (2 per
    pair), so the position along frames, rows and columns is encoded independently."""
    for axis, size in enumerate(grid):
        if size > ROPE_MAX_POSITIONS:
            raise ValueError(f"the latent has {size} positions along axis {'FHW'[axis]}; the model's "
                             f"position table holds {ROPE_MAX_POSITIONS}")
    return rope_angles_at([torch.arange(size, dtype=torch.float64, device=device) for size in grid], head_dim)


def rope_angles_at(positions: Sequence[torch.Tensor], head_dim: int) -> torch.Tensor:
    """`rope_angles` for the grid of the given (frame, row, column) positions, which may be
    negative or skip values (S2V's reference and motion tokens): [L, head_dim/2], float64.
    A negative position rotates by the conjugate of the positive one."""
    grid = tuple(len(p) for p in positions)
    angles = []
    for axis, (position, pairs) in enumerate(zip(positions, rope_axis_sizes(head_dim))):
        position = position.to(torch.float64)
        inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, 2 * pairs, 2, dtype=torch.float64,
                                                     device=position.device) / (2 * pairs))
        shape = [1, 1, 1, pairs]
        shape[axis] = grid[axis]
        angles.append(torch.outer(position, inv_freq).view(shape).expand(*grid, pairs))
    return torch.cat(angles, dim=-1).reshape(math.prod(grid), head_dim // 2)


def token_chunks(tokens: int) -> list[slice]:
    """Consecutive slices of at most CHUNK_TOKENS tokens covering `tokens`."""
    return [slice(start, start + CHUNK_TOKENS) for start in range(0, tokens, CHUNK_TOKENS)]


def by_token_chunks(fn: Callable[[slice], torch.Tensor], tokens: int) -> torch.Tensor:
    """fn(rows) for each chunk of token rows, joined along dim 1 into one tensor: the same
    numbers as fn(slice(None)) for row-wise work, holding one chunk's intermediates at a time."""
    chunks = token_chunks(tokens)
    if len(chunks) == 1:
        return fn(slice(None))
    out = None
    for rows in chunks:
        part = fn(rows)
        if out is None:
            out = part.new_empty(part.shape[0], tokens, *part.shape[2:])
        out[:, rows] = part
    return out


def _rows(values: torch.Tensor, rows: slice) -> torch.Tensor:
    """The token rows of a per-token [B, L, ...] modulation; a [B, 1, ...] one as it is."""
    return values if values.shape[1] == 1 else values[:, rows]


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension (all heads together), statistics in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with q/k RMS-normalised across heads. Self-attention rotates q and k
    by RoPE; cross-attention (rope=None) attends to the text tokens."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.sequence_parallel = None  # wan_core.parallel: self-attention over this rank's token shard

    def forward(self, x: torch.Tensor, source: torch.Tensor, rope: Optional[torch.Tensor],
                backend: str) -> torch.Tensor:
        heads = (self.num_heads, -1)

        def normed(linear: nn.Module, norm: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
            def rows_of(rows: slice) -> torch.Tensor:
                projected = linear(inputs[:, rows])
                if rope is not None and isinstance(norm, RMSNorm):
                    return rms_norm_rope(projected, norm.weight, norm.eps, rope[rows], self.num_heads)
                projected = norm(projected).unflatten(-1, heads)
                return projected if rope is None else apply_rope(projected, rope[rows])
            return by_token_chunks(rows_of, inputs.shape[1])

        q, k = normed(self.q, self.norm_q, x), normed(self.k, self.norm_k, source)
        v = self.v(source).unflatten(-1, heads)
        attend = attention if self.sequence_parallel is None else self.sequence_parallel.attention
        out = attend(q, k, v, backend).flatten(-2)
        del q, k, v  # freed before the output projection
        return self.o(out)


class WanBlock(nn.Module):
    """Self-attention, cross-attention to the text, MLP. The timestep sets six float32 vectors
    (shift, scale, gate for the self-attention; shift, scale, gate for the MLP); the
    cross-attention is not modulated."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = Attention(dim, config.num_heads, config.qk_norm, eps)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(dim, config.num_heads, config.qk_norm, eps)
        self.norm2 = LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(self, x: torch.Tensor, time_mod: torch.Tensor, context: torch.Tensor,
                rope: torch.Tensor, backend: str, segments: Optional[Sequence[int]] = None) -> torch.Tensor:
        # x: float32 residual stream [B,L,D]; time_mod: [B,L or 1,6,D] float32, or with
        # `segments` (token counts summing to L) one row per segment [B,len(segments),6,D]
        dtype = context.dtype
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + time_mod).unbind(2)
        tokens = x.shape[1]
        h = by_token_chunks(lambda rows: per_run(partial(norm_modulate, norm=self.norm1, dtype=dtype), rows, segments,
                                                 (x[:, rows],), (shift_sa, scale_sa)), tokens)
        attended = self.self_attn(h, h, rope, backend)
        del h
        # the gated residual, cross-attention (queries are tokens) and MLP are row-wise: chunk by
        # chunk, into this block's own residual tensor; each residual is added in the pass of the
        # norm that follows it
        out = torch.empty_like(x)
        for rows in token_chunks(tokens):
            part = out[:, rows]
            h = per_run(partial(residual_norm_modulate, norm=self.norm3, dtype=dtype), rows, segments,
                        (part, x[:, rows], attended[:, rows]), (gate_sa, None, None))
            h = per_run(partial(residual_norm_modulate, norm=self.norm2, dtype=dtype), rows, segments,
                        (part, part, self.cross_attn(h, context, None, backend)), (None, shift_ff, scale_ff))
            if segments is None:
                part.addcmul_(self.ffn(h), _rows(gate_ff, rows))
            else:
                part.copy_(per_run(torch.addcmul, rows, segments, (part, self.ffn(h)), (gate_ff,)))
        return out


def per_run(op, rows: slice, segments: Optional[Sequence[int]], tokens: Sequence[torch.Tensor],
            vectors: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """op(*tokens, *vectors) for the token rows `rows` of the block (`tokens` already cut to
    them). Each vector [B, 1 | L | len(segments), D] holds one row for every token, one per
    token, or with `segments` one per run of tokens of those lengths (S2V's reference and motion
    tokens take the timestep-0 modulation): then one pass per run, so no per-token copy of the
    vectors is made. A None vector is passed on as None."""
    if segments is None:
        return op(*tokens, *(None if v is None else _rows(v, rows) for v in vectors))
    start = rows.start or 0
    stop = sum(segments) if rows.stop is None else min(rows.stop, sum(segments))
    parts, offset = [], 0
    for index, length in enumerate(segments):
        low, high = max(offset, start), min(offset + length, stop)
        if low < high:
            cut = slice(low - start, high - start)
            parts.append(op(*(t[:, cut] for t in tokens), *(None if v is None else v[:, index:index + 1] for v in vectors)))
        offset += length
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class Head(nn.Module):
    """Final norm, its own (shift, scale) modulation from the time embedding, and the linear map
    from tokens to patches of output channels; all in float32 as in the reference."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.norm = LayerNorm(config.dim, config.eps, elementwise_affine=False)
        self.head = nn.Linear(config.dim, config.out_dim * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.zeros(1, 2, config.dim))

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + time_emb.unsqueeze(2)).unbind(2)
        return _linear_fp32(self.head, modulate(self.norm(x), shift, scale))


FP32_SLICE_ELEMENTS = 2 ** 22  # weight elements upcast at a time by _linear_fp32 (16 MiB in float32)


def _linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear layer evaluated in float32 whatever its weights' dtype (the reference runs the
    time embedding and the head under a float32 autocast).

    A low-precision weight is upcast a slice of output rows at a time, so no float32 copy of
    the whole matrix is made (the 14B time projection's would be 0.6 GB per forward pass);
    each output is the same float32 dot product either way."""
    x, weight, bias = x.float(), layer.weight, layer.bias
    if weight.dtype == torch.float32:
        return F.linear(x, weight, bias)
    rows = max(1, FP32_SLICE_ELEMENTS // weight.shape[1])
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for start in range(0, weight.shape[0], rows):
        part = slice(start, start + rows)
        out[..., part] = F.linear(x, weight[part].float(), None if bias is None else bias[part].float())
    return out


Context = Union[torch.Tensor, Sequence[torch.Tensor]]


class WanDiT(nn.Module):
    """The Wan2.2 transformer for t2v / i2v (14B experts), ti2v (5B) and s2v (14B with the
    plug-in of wan_core.dit.s2v); see `forward`."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        if config.dim % config.num_heads or config.head_dim % 2:
            raise ValueError(f"dim {config.dim} must split into {config.num_heads} heads of even size")
        self.config = config
        self.attention_backend = AUTO
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = Head(config)
        if config.model_type == "s2v":
            from wan_core.dit.s2v import add_s2v_modules

            add_s2v_modules(self, config)
        self.sequence_parallel = None  # wan_core.parallel.SequenceParallel: the tokens split over ranks
        self.placement = WeightPlacement(self)  # host copies, device copies, patches, block swap

    def weight_units(self) -> list[tuple[str, nn.Module, str]]:
        """(prefix, module, names to skip) of each unit weights are patched and moved by: every
        transformer block, then everything outside the blocks."""
        return [(f"blocks.{i}.", block, "") for i, block in enumerate(self.blocks)] + [("", self, "blocks.")]

    @property
    def weight_patches(self) -> Optional[WeightPatches]:
        return self.placement.patches

    def set_weight_patches(self, patches: Optional[WeightPatches]) -> None:
        """Compute with base + `patches` from now on (None: the base alone).

        The base tensors are never modified: a patched entry's base is kept as a host copy and
        the device holds only the patched tensor (one device copy per weight); swapped blocks
        are patched at each upload. Setting patches with the same `key` as the current ones
        does nothing."""
        self.placement.set_patches(patches)

    def enable_block_swap(self, blocks_to_swap: Union[int, str], *, device: Union[str, torch.device],
                          prefetch: int = 1, host_memory: str = "auto", latent_shape: Optional[Sequence[int]] = None,
                          free_memory: Optional[int] = None, place: bool = True) -> int:
        """Keep the last `blocks_to_swap` blocks in host memory and copy each to `device` for its
        turn in every forward pass, `prefetch` blocks ahead on a side stream; returns the number
        swapped. Outputs are bit-identical to the resident model's.

        `blocks_to_swap`: 0..num_layers, or "auto": the fewest that fit `free_memory` bytes
        (default: what the device has free, plus what this model holds there) for a forward over
        `latent_shape` [B, C, F, H, W] (default: the task's default size and frames), with the
        margin of `wan_core.offload.budget`. `host_memory`: "pinned" (the swapped blocks copied
        once into page-locked RAM: fastest), "staged" (they stay memory-mapped / in ordinary RAM
        and stream through a ring of page-locked buffers) or "auto" (pinned when RAM allows).
        The model is placed on `device` now, or with `place=False` when it is next moved there.
        On a CPU device nothing is swapped (the weights already live in host memory): returns 0.
        """
        from wan_core.offload import enable_block_swap

        return enable_block_swap(self, blocks_to_swap, device=device, prefetch=prefetch, host_memory=host_memory,
                                 latent_shape=latent_shape, free_memory=free_memory, place=place)

    def disable_block_swap(self) -> None:
        """Stop swapping: every block is placed where the rest of the model is."""
        self.placement.disable_swap()

    def release_host_weights(self) -> bool:
        """Give back the host RAM of the weights this model's checkpoint file can provide again
        (they are mapped from the file when next needed: forward, .to(), state_dict(); until
        then released parameters are meta-device placeholders; weights on a GPU stay). Returns
        False for a model not loaded from a file."""
        return self.placement.release_host()

    def state_dict(self, *args, **kwargs):
        if self.placement.released:
            self.placement.remap()
        return super().state_dict(*args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        # Device moves (.to, .cuda, .cpu, also from a parent module) go through the placement:
        # the live weights are derived from the host copy, which is never copied back.
        probe = torch.empty(0, dtype=self.dtype, device=self.device if self.device.type != "meta" else "cpu")
        moved = fn(probe)
        if moved.dtype == probe.dtype and self.device.type != "meta":
            self.placement.move(moved.device)
            return self
        self.placement.forget()
        return super()._apply(fn, recurse)

    def compile_blocks(self, **options) -> None:
        """Compile each transformer block with torch.compile (regional compilation: the 40
        identical blocks share one compiled graph). It fuses the float32 modulation, norm,
        RoPE and residual arithmetic around the matmuls, which eager mode runs as separate
        memory-bound passes. `options` go to torch.compile."""
        for block in self.blocks:
            block.compile(**options)

    def set_attention_backend(self, name: str) -> None:
        """Use attention backend `name` ("auto", "sdpa", "flash_attn", "sageattention",
        "int8_fp8_triton") from now on; "auto" is resolved per device (`resolve_backend`)."""
        self.attention_backend = check_backend(name)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.placement.current_device()

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: Context, *,
                y: Optional[torch.Tensor] = None, ref_latent: Optional[torch.Tensor] = None,
                audio_features: Optional[torch.Tensor] = None, motion_latent: Optional[torch.Tensor] = None,
                pose_latent: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predict the flow (noise - data) for latents `x` at timesteps `t`.

        x: [B, C, F, H, W] latents (C + C_y = config.in_dim). t: [B] timesteps in 0..1000, or
        [B, L] one per token (TI2V gives the conditioning frame's tokens t = 0). context:
        [B, L_text, text_dim] or a list of B [L_i, text_dim] text embeddings, zero-padded to
        text_len as the reference does (the padding is attended to, not masked). y: [B, C_y,
        F, H, W] i2v conditioning, concatenated to x on channels. Returns [B, out_dim, F, H, W]
        in float32.

        S2V models (one clip; see wan_core.dit.s2v): ref_latent [B, 16, 1, H, W] the reference
        image's latent, audio_features [B, 25, C_a, 4F] this clip's wav2vec2 features (zeros for
        the unconditional pass), motion_latent [B, 16, 19, H, W] the re-encoded last 73 frames or
        None (the first clip: no motion tokens), pose_latent [B, 16, F, H, W] or None (no pose).
        """
        config = self.config
        self.placement.prepare()
        s2v = None
        if config.model_type == "s2v":
            from wan_core.dit.s2v import S2VForward

            s2v = S2VForward(self, x, t, ref_latent, audio_features, motion_latent, pose_latent)
        elif any(v is not None for v in (ref_latent, audio_features, motion_latent, pose_latent)):
            raise ValueError(f"ref_latent, audio_features, motion_latent and pose_latent are S2V inputs; this is "
                             f"a {config.model_type} model")
        if y is not None:
            if y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
                raise ValueError(f"y has shape {tuple(y.shape)}; it must match x {tuple(x.shape)} in batch, "
                                 f"frames, height and width")
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        self._check_input(x)
        batch = x.shape[0]
        grid = tuple(s // p for s, p in zip(x.shape[2:], config.patch_size))
        embedded = self.patch_embedding(x.to(self.dtype))
        if s2v is not None:
            embedded = s2v.add_pose(embedded)
        tokens = embedded.flatten(2).transpose(1, 2)
        split = self.sequence_parallel
        if split is not None:  # this rank keeps its share of the tokens until the gather
            if s2v is not None:
                raise ValueError("S2V models do not run sequence-parallel yet: run S2V on one GPU")
            split.begin(tokens.shape[1])
            tokens, t = split.split_tokens(tokens), split.split_timesteps(t)
        num_tokens = tokens.shape[1]

        time_emb, time_mod = self._time_embedding(t, batch, num_tokens)
        context = self._embed_text(context, batch)
        angles = rope_angles(grid, config.head_dim, x.device)
        segments = None
        if s2v is not None:
            tokens, angles, time_mod, segments = s2v.extend(tokens, angles, time_mod, t)
        # token-major [B, L, D] rows: the patch embedding's transposed view would make every
        # block's elementwise pass and residual stream channel-major (strided, uncoalesced on GPUs)
        tokens = tokens.to(torch.float32, memory_format=torch.contiguous_format)
        rope = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)[:, None]
        if split is not None:
            rope = split.split_rope(rope)  # the shard's true positions
        backend = resolve_backend(self.attention_backend, x.device, self.dtype)  # outside compiled blocks
        for index, block in enumerate(self.placement.blocks_in_turn(self.blocks)):
            tokens = block(tokens, time_mod, context, rope, backend, segments)
            if s2v is not None:
                tokens = s2v.after_block(index, tokens, backend)
        out = self.head(tokens[:, :num_tokens], time_emb)
        return self._unpatchify(out if split is None else split.gather(out), grid)

    def _check_input(self, x: torch.Tensor) -> None:
        config = self.config
        if x.ndim != 5:
            raise ValueError(f"x must be a latent video [B, C, F, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != config.in_dim:
            need = "; i2v models also need y (mask + image latent)" if config.model_type == "i2v" else ""
            raise ValueError(f"this {config.model_type} model takes {config.in_dim} input channels (x and y "
                             f"together), got {x.shape[1]}{need}")
        if any(s % p for s, p in zip(x.shape[2:], config.patch_size)):
            raise ValueError(f"latent frames/height/width {tuple(x.shape[2:])} must be multiples of the "
                             f"patch size {config.patch_size}")

    def _time_embedding(self, t: torch.Tensor, batch: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(time embedding [B, T, D], block modulation [B, T, 6, D]), both float32, where T is 1
        for one timestep per sample and L for per-token timesteps."""
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim == 1:
            t = t[:, None]
        if t.shape not in ((batch, 1), (batch, num_tokens)):
            raise ValueError(f"t must be [B] or [B, tokens] = [{batch}] or [{batch}, {num_tokens}], "
                             f"got {tuple(t.shape)}")
        e = sinusoidal_embedding(t, self.config.freq_dim)
        e = _linear_fp32(self.time_embedding[2], F.silu(_linear_fp32(self.time_embedding[0], e)))
        modulation = _linear_fp32(self.time_projection[1], F.silu(e)).unflatten(-1, (6, self.config.dim))
        return e, modulation

    def _embed_text(self, context: Context, batch: int) -> torch.Tensor:
        text_len, text_dim = self.config.text_len, self.config.text_dim
        items = list(context) if not isinstance(context, torch.Tensor) or context.ndim == 3 else [context]
        if len(items) != batch:
            raise ValueError(f"context has {len(items)} prompts for a batch of {batch}")
        for item in items:
            if item.ndim != 2 or item.shape[-1] != text_dim or item.shape[0] > text_len:
                raise ValueError(f"each context must be [L <= {text_len}, {text_dim}] text embeddings, got "
                                 f"{tuple(item.shape)}")
        padded = torch.stack([F.pad(item.to(device=self.device, dtype=self.dtype), (0, 0, 0, text_len - item.shape[0]))
                              for item in items])
        return self.text_embedding(padded)

    def _unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, pf*ph*pw*C] -> [B, C, F, H, W]; each token's vector is (pf, ph, pw, C)-ordered."""
        pf, ph, pw = self.config.patch_size
        f, h, w = grid
        x = tokens.view(tokens.shape[0], f, h, w, pf, ph, pw, self.config.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(tokens.shape[0], self.config.out_dim, f * pf, h * ph, w * pw)
