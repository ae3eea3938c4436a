"""The S2V-14B additions to the one Wan transformer (a plug-in of `WanDiT`, not a second model).

What S2V adds around the 40 ordinary blocks (facts: docs/s2v-facts.md, read from the reference's
wan/modules/s2v/; every name below is the checkpoint's):

- `casual_audio_encoder` (sic, the checkpoint's spelling): a learned mix of the 25 wav2vec2 hidden
  states, then causal 1-D convolutions (left replicate padding, two stride-2 steps) to 4 audio
  tokens of model width per latent frame (+ the learned `padding_tokens` = 5) and one "global"
  vector per latent frame. Each clip's features get 73 copies of their first frame in front (the
  motion frames' span) and the first 19 outputs are dropped, so latent frame k sees audio frames
  up to 4k+3.
- `audio_injector`: after the blocks listed in `audio_inject_layers`, the noisy tokens of each
  latent frame are normalised (LayerNorm eps 1e-5, no affine), modulated by shift/scale from
  that frame's global audio vector (adaLN, shift first), and cross-attend to that frame's 5
  audio tokens; the result is added to the residual stream (no gate).
- `cond_encoder`: the pose latent's patch convolution, added to the noisy tokens; without pose
  the latent is zero, so only its bias is added (the reference always runs it).
- The reference-image latent, embedded by the main `patch_embedding`, appended as one frame at
  temporal RoPE position 30; `frame_packer`: the last 19 motion latents at three scales (newest
  1 latent at 1x2x2, next 2 at 2x4x4, oldest 16 at 4x8x8) at negative temporal positions.
- `trainable_cond_mask`: a learned vector per token type (0 noisy, 1 reference, 2 motion).
- Time modulation in two columns: the noisy tokens use the timestep's, every later token the
  embedding of t = 0 (`WanBlock`'s segments); the head sees the noisy tokens only.

Precision follows the reference: the audio encoder runs in float32 (the reference autocasts it
to float32), the convolutions and matrices of the rest in the weights' dtype, norms and the
residual stream in float32.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from wan_core.configs import DiTConfig
from wan_core.dit.model import Attention, modulate, rope_angles_at

if TYPE_CHECKING:
    from wan_core.dit.model import WanDiT

WAV2VEC_STATES = 25          # hidden states of wav2vec2-large (the input of each of 24 layers + the last)
AUDIO_TOKENS = 4             # audio tokens per latent frame, before the padding token
REF_POSITION = 30            # the reference frame's temporal RoPE position, whatever the clip length
PACK_LATENTS = (16, 2, 1)    # motion latents per frame-pack scale, oldest first
PACK_STRIDES = (4, 2, 1)     # temporal stride of each scale's patch (spatial: 2x that)
ADALN_EPS = 1e-5             # the audio adaLN's LayerNorm (diffusers' AdaLayerNorm default), not the model's 1e-6
AUDIO_NORM_EPS = 1e-6
NOISY, REFERENCE, MOTION = 0, 1, 2  # token type ids


def motion_latent_count(motion_frames: int) -> int:
    """Latent frames of the pixel motion buffer: (73 + 3) // 4 = 19, as the VAE folds 1 + 4k."""
    return (motion_frames + 3) // 4


def injector_of_block(inject_layers: Sequence[int], num_layers: int) -> dict[int, int]:
    """{block index: injector index} as the reference builds it, and so how many injectors the
    checkpoint holds (the largest index + 1, or 0).

    The reference walks the blocks in order and, for each listed layer i whose text
    "transformer_blocks.<i>" is a substring of the block's name "root.transformer_blocks.<b>"
    (that is: str(b) starts with str(i)), gives i the next injector, overwriting an earlier
    one. With the 14B's list each layer matches only itself; an entry i < 10 would also take
    blocks 10i..10i+9 (docs/s2v-facts.md §2, measured)."""
    mapping: dict[int, int] = {}
    count = 0
    for block in range(num_layers):
        for layer in inject_layers:
            if str(block).startswith(str(layer)):
                mapping[layer] = count
                count += 1
    return {layer: injector for layer, injector in mapping.items() if layer < num_layers}


def injector_count(inject_layers: Sequence[int], num_layers: int) -> int:
    mapping = injector_of_block(inject_layers, num_layers)
    return max(mapping.values()) + 1 if mapping else 0


# --------------------------------------------------------------------------------------------
# Modules (checkpoint names)


class CausalConv1d(nn.Module):
    """Kernel-3 convolution over time that sees only the past: the input is padded on the left
    by repeating its first frame twice. Computed in float32."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(in_channels, out_channels, 3, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] float32
        x = F.pad(x, (2, 0), mode="replicate")
        return F.conv1d(x, self.conv.weight.float(), self.conv.bias.float(), stride=self.stride)


def _norm_silu(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine over the channels of [N, C, T], then SiLU; back to [N, C, T]."""
    x = x.transpose(1, 2)
    return F.silu(F.layer_norm(x, x.shape[-1:], eps=AUDIO_NORM_EPS)).transpose(1, 2)


class AudioTokenEncoder(nn.Module):
    """The causal convolution stack (`casual_audio_encoder.encoder`): [B, C_a, T] -> (audio
    tokens [B, T', 5, D], global vectors [B, T', 1, D]) with T' = ceil(T / 4)."""

    def __init__(self, audio_dim: int, dim: int):
        super().__init__()
        width = dim // 4
        self.conv1_local = CausalConv1d(audio_dim, width * AUDIO_TOKENS, stride=1)
        self.conv1_global = CausalConv1d(audio_dim, width, stride=1)
        self.conv2 = CausalConv1d(width, dim // 2, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, stride=2)
        self.final_linear = nn.Linear(dim, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D/4, T] after its first conv -> [N, T', D]; the local and global branches share it."""
        x = self.conv3(_norm_silu(self.conv2(_norm_silu(x))))
        return _norm_silu(x).transpose(1, 2)

    def forward(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, frames = mixed.shape
        # the local conv's channels are AUDIO_TOKENS consecutive groups, one per token
        local = self.conv1_local(mixed).unflatten(1, (AUDIO_TOKENS, -1)).flatten(0, 1)
        local = self._downsample(local).unflatten(0, (batch, AUDIO_TOKENS)).transpose(1, 2)
        padding = self.padding_tokens.float().expand(batch, local.shape[1], 1, -1)
        tokens = torch.cat([local, padding], dim=2)
        final = self.final_linear
        vector = F.linear(self._downsample(self.conv1_global(mixed)), final.weight.float(), final.bias.float())
        return tokens, vector[:, :, None]


class CausalAudioEncoder(nn.Module):
    """`casual_audio_encoder`: the learned mix of the wav2vec2 hidden states, then the convolutions."""

    def __init__(self, audio_dim: int, dim: int):
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, WAV2VEC_STATES, 1, 1), 0.01))
        self.encoder = AudioTokenEncoder(audio_dim, dim)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, 25, C_a, T] -> (tokens [B, T', 5, D], global [B, T', 1, D]), float32."""
        weights = F.silu(self.weights.float())
        mixed = ((features.float() * weights) / weights.sum(dim=1, keepdim=True)).sum(dim=1)
        return self.encoder(mixed)


class AudioAdaLN(nn.Module):
    """LayerNorm (eps 1e-5, no affine) then x (1 + scale) + shift with [shift, scale] =
    linear(SiLU(global audio vector)), shift first (diffusers' AdaLayerNorm with chunk_dim=1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        # x: [N, tokens, D] float32; vector: [N, D] float32
        params = self.linear(F.silu(vector).to(self.linear.weight.dtype)).float()
        shift, scale = params[:, None].chunk(2, dim=-1)
        return modulate(F.layer_norm(x.float(), x.shape[-1:], eps=ADALN_EPS), shift, scale)


class AudioInjector(nn.Module):
    """`audio_injector`: one cross-attention and one adaLN per injection point."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        count = injector_count(config.audio_inject_layers, config.num_layers)
        self.injector = nn.ModuleList(Attention(config.dim, config.num_heads, qk_norm=True, eps=config.eps)
                                      for _ in range(count))
        self.injector_adain_layers = nn.ModuleList(AudioAdaLN(config.dim) for _ in range(count))


class FramePacker(nn.Module):
    """`frame_packer`: the motion latents as tokens at three scales (newest 1 latent at 1x2x2,
    the next 2 at 2x4x4, the oldest 16 at 4x8x8), 1.5x the tokens of one latent frame."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        channels = config.cond_dim
        self.proj = nn.Conv3d(channels, config.dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(channels, config.dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(channels, config.dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        """motion [B, C, 19, h, w], oldest first -> tokens [B, 1.5 (h/2)(w/2), D], newest scale first."""
        oldest, middle, newest = motion.split(list(PACK_LATENTS), dim=2)
        parts = [self.proj(newest), self.proj_2x(middle), self.proj_4x(oldest)]
        return torch.cat([p.flatten(2).transpose(1, 2) for p in parts], dim=1)


def add_s2v_modules(model: nn.Module, config: DiTConfig) -> None:
    """Give `model` S2V's extra modules, outside `model.blocks` (ordinary parameters of the
    "everything else" weight unit: block swap moves only the blocks, fp8 converts only their
    linears)."""
    model.cond_encoder = nn.Conv3d(config.cond_dim, config.dim, kernel_size=config.patch_size,
                                   stride=config.patch_size)
    model.casual_audio_encoder = CausalAudioEncoder(config.audio_dim, config.dim)
    model.audio_injector = AudioInjector(config)
    model.trainable_cond_mask = nn.Embedding(3, config.dim)
    model.frame_packer = FramePacker(config)


# --------------------------------------------------------------------------------------------
# RoPE positions of the extra tokens


def _truncated_linspace(start: float, stop: float, count: int) -> torch.Tensor:
    """int(linspace(start, stop, count)) element-wise, truncating toward zero like numpy's
    astype(int) in the reference."""
    return torch.from_numpy(np.linspace(start, stop, count).astype(np.int64))


def reference_positions(h2: int, w2: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(frame, row, column) RoPE positions of the reference frame's (h/2)(w/2) tokens."""
    return torch.tensor([REF_POSITION]), torch.arange(h2), torch.arange(w2)


def motion_positions(h2: int, w2: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(frame, row, column) RoPE positions of each frame-pack scale, newest first, for a latent
    of h2 x w2 patches (h/2, w/2).

    A scale of n latents in n/k temporal slots spans the n positions before the newer scales,
    -start .. -start + n - 1 with start = n + (latents of the newer scales), and its slots take
    -int(linspace(start, start - n + 1, n/k)): -1 for the newest latent, -3 for the next 2, and
    -19, -14, -9, -4 for the oldest 16 (not consecutive). Rows of a scale with spatial stride k
    are int(linspace(0, h2 - 1, h2 / k)), spread over the whole grid and truncated, not a
    coarse grid of their own (columns likewise)."""
    positions = []
    newer = 0
    for latents, stride in zip(reversed(PACK_LATENTS), reversed(PACK_STRIDES)):
        start = newer + latents  # the scale spans positions -start .. -(newer + 1)
        frames = -_truncated_linspace(start, start - latents + 1, latents // stride)
        rows = _truncated_linspace(0, h2 - 1, h2 // stride)
        columns = _truncated_linspace(0, w2 - 1, w2 // stride)
        positions.append((frames, rows, columns))
        newer = start
    return positions


# --------------------------------------------------------------------------------------------
# One forward


def _shape(t: Optional[torch.Tensor]) -> Optional[tuple[int, ...]]:
    return None if t is None else tuple(t.shape)


class S2VForward:
    """The extra inputs of one S2V forward, checked and prepared, and the hooks `WanDiT.forward`
    calls: `add_pose` on the embedded noisy latent, `extend` before the blocks (reference and
    motion tokens, their RoPE and the timestep-0 modulation column), `after_block` after each
    block (audio injection)."""

    def __init__(self, model: "WanDiT", x: torch.Tensor, t: torch.Tensor, ref_latent: Optional[torch.Tensor],
                 audio_features: Optional[torch.Tensor], motion_latent: Optional[torch.Tensor],
                 pose_latent: Optional[torch.Tensor]):
        config = model.config
        self.model = model
        self.motion_latents = motion_latent_count(config.motion_frames)
        batch, channels, frames, height, width = x.shape
        if height % 8 or width % 8:
            raise ValueError(f"S2V latents must be multiples of 8 high and wide (the frame packer's coarsest "
                             f"patch is 8x8 latent pixels; 64-pixel multiples), got {height}x{width}")
        latent = (batch, config.cond_dim)
        if ref_latent is None or _shape(ref_latent) != (*latent, 1, height, width):
            raise ValueError(f"ref_latent must be the reference image's latent [{batch}, {config.cond_dim}, 1, "
                             f"{height}, {width}], got {_shape(ref_latent)}")
        if audio_features is None or audio_features.ndim != 4 or audio_features.shape[0] != batch \
                or audio_features.shape[1:] != (WAV2VEC_STATES, config.audio_dim, 4 * frames):
            raise ValueError(f"audio_features must be this clip's wav2vec2 features [{batch}, {WAV2VEC_STATES}, "
                             f"{config.audio_dim}, {4 * frames}] (4 video frames per latent frame; zeros for the "
                             f"unconditional pass), got {_shape(audio_features)}")
        if pose_latent is not None and _shape(pose_latent) != (*latent, frames, height, width):
            raise ValueError(f"pose_latent must be [{batch}, {config.cond_dim}, {frames}, {height}, {width}] like x, "
                             f"or None (no pose), got {_shape(pose_latent)}")
        if motion_latent is not None and (motion_latent.ndim != 5 or motion_latent.shape[:2] != latent
                                          or motion_latent.shape[3:] != (height, width)):
            raise ValueError(f"motion_latent must be [{batch}, {config.cond_dim}, {self.motion_latents}, {height}, "
                             f"{width}] (the last {config.motion_frames} frames re-encoded), or None for the first "
                             f"clip, got {_shape(motion_latent)}")
        t = torch.as_tensor(t)
        if t.ndim > 1:
            raise ValueError(f"S2V takes one timestep per sample, t of shape [{batch}], got {tuple(t.shape)}")
        self.grid = (frames, height // 2, width // 2)
        self.ref_latent = ref_latent
        self.motion_latent = motion_latent
        self.pose_latent = pose_latent
        self.injectors = injector_of_block(config.audio_inject_layers, config.num_layers)
        self.audio_tokens, self.audio_vectors = self._encode_audio(audio_features)
        self.num_noisy = math.prod(self.grid)

    def _encode_audio(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This clip's features behind 73 copies of their first frame (the motion frames' span),
        encoded; the first 19 outputs (the prefix's) dropped: one entry per latent frame."""
        features = features.to(self.model.device)
        prefix = features[..., :1].expand(*features.shape[:-1], self.model.config.motion_frames)
        tokens, vectors = self.model.casual_audio_encoder(torch.cat([prefix, features], dim=-1))
        return tokens[:, self.motion_latents:], vectors[:, self.motion_latents:, 0]

    def add_pose(self, embedded: torch.Tensor) -> torch.Tensor:
        """The pose condition's patch embedding added to the embedded noisy latent [B, D, f, h/2, w/2];
        no pose is a zero latent, whose embedding is the bias alone."""
        encoder = self.model.cond_encoder
        if self.pose_latent is None:
            return embedded + encoder.bias.view(1, -1, 1, 1, 1)
        return embedded + encoder(self.pose_latent.to(device=embedded.device, dtype=embedded.dtype))

    def extend(self, tokens: torch.Tensor, angles: torch.Tensor, time_mod: torch.Tensor, t: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Append the reference (and motion) tokens with their type embeddings and RoPE angles,
        and give every appended token the modulation of t = 0.

        tokens [B, L, D] (noisy, in the weights' dtype), angles [L, d/2], time_mod [B, 1, 6, D]
        (t's). Returns (tokens, angles, time_mod [B, 2, 6, D], segments (noisy, appended))."""
        model = self.model
        dtype, device = tokens.dtype, tokens.device
        f, h2, w2 = self.grid
        type_embedding = model.trainable_cond_mask.weight.to(dtype)
        ref = model.patch_embedding(self.ref_latent.to(device=device, dtype=dtype)).flatten(2).transpose(1, 2)
        parts = [tokens + type_embedding[NOISY], ref + type_embedding[REFERENCE]]
        positions = [reference_positions(h2, w2)]
        if self.motion_latent is not None:
            motion = model.frame_packer(self._last_motion_latents(dtype, device))
            parts.append(motion + type_embedding[MOTION])
            positions += motion_positions(h2, w2)
        head_dim = model.config.head_dim
        angles = torch.cat([angles, *(rope_angles_at([p.to(device) for p in grid], head_dim) for grid in positions)])
        zero_mod = model._time_embedding(torch.zeros_like(torch.as_tensor(t, device=device)), tokens.shape[0], 1)[1]
        tokens = torch.cat(parts, dim=1)
        return tokens, angles, torch.cat([time_mod, zero_mod], dim=1), (self.num_noisy, tokens.shape[1] - self.num_noisy)

    def _last_motion_latents(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The newest 19 motion latents; fewer are padded with zero latents in front (oldest side)."""
        motion = self.motion_latent.to(device=device, dtype=dtype)[:, :, -self.motion_latents:]
        missing = self.motion_latents - motion.shape[2]
        return F.pad(motion, (0, 0, 0, 0, missing, 0)) if missing else motion

    def after_block(self, index: int, tokens: torch.Tensor, backend: str) -> torch.Tensor:
        """Audio injection after block `index` (when it is an injection layer): each latent frame's
        noisy tokens attend to that frame's audio tokens; the result is added to them."""
        injector = self.injectors.get(index)
        if injector is None:
            return tokens
        model = self.model
        dtype = model.dtype
        frames = self.grid[0]
        noisy = tokens[:, :self.num_noisy].flatten(0, 1).unflatten(0, (-1, self.num_noisy // frames))
        audio = self.audio_tokens.flatten(0, 1).to(dtype)
        normed = model.audio_injector.injector_adain_layers[injector](noisy, self.audio_vectors.flatten(0, 1))
        attended = model.audio_injector.injector[injector](normed.to(dtype), audio, None, backend)
        tokens[:, :self.num_noisy] += attended.float().reshape(tokens.shape[0], self.num_noisy, -1)
        return tokens


# --------------------------------------------------------------------------------------------
# The config of a checkpoint

# Architecture switches of the reference's WanModel_S2V config.json and the values this
# implementation (the 14B's) has; a config.json that sets another value is refused.
_SUPPORTED_SWITCHES = {"enable_adain": True, "adain_mode": "attn_norm", "enable_framepack": True,
                       "enable_motioner": False, "zero_timestep": True, "add_last_motion": True,
                       "num_audio_token": AUDIO_TOKENS, "trainable_token_pos_emb": False}


def s2v_config(base: DiTConfig, shapes: dict[str, tuple[int, ...]], folder_config: Optional[dict]) -> DiTConfig:
    """The S2V `DiTConfig` of a checkpoint: widths from its shapes (`base` already has the
    transformer's), the injection layers (and heads) from the official folder's config.json
    when there is one, else the 14B's list, which then must fit the weights.

    The weights say how many injectors there are, not after which blocks they act."""
    from dataclasses import replace

    from wan_core.configs import S2V_14B_DIT

    needed = [k for k in ("casual_audio_encoder.encoder.conv1_local.conv.weight", "cond_encoder.weight") if k not in shapes]
    if needed:
        raise ValueError(f"it has S2V tensors but not {needed}: an incomplete S2V-14B checkpoint (re-download it)")
    audio_dim = shapes["casual_audio_encoder.encoder.conv1_local.conv.weight"][1]
    cond_dim = shapes["cond_encoder.weight"][1]
    injectors = len({k.split(".")[2] for k in shapes if k.startswith("audio_injector.injector.")})
    changes: dict = dict(audio_dim=audio_dim, cond_dim=cond_dim)
    if folder_config is not None:
        for key, supported in _SUPPORTED_SWITCHES.items():
            if key in folder_config and folder_config[key] != supported:
                raise ValueError(f"its config.json sets {key}={folder_config[key]!r}; the Wan2.2 S2V model "
                                 f"this loader implements has {key}={supported!r}")
        layers = folder_config.get("audio_inject_layers", S2V_14B_DIT.audio_inject_layers)
        if not (isinstance(layers, (list, tuple)) and all(isinstance(i, int) and i >= 0 for i in layers)):
            raise ValueError(f"its config.json's audio_inject_layers must be a list of block numbers, got {layers!r}")
        changes["audio_inject_layers"] = tuple(layers)
        if isinstance(folder_config.get("num_heads"), int):
            changes["num_heads"] = folder_config["num_heads"]
    config = replace(base, **changes)
    expected = injector_count(config.audio_inject_layers, config.num_layers)
    if expected != injectors:
        where = ("its config.json's audio_inject_layers" if folder_config is not None else
                 "the S2V-14B's injection layers (used when no config.json says otherwise)")
        raise ValueError(f"it has {injectors} audio injectors for {config.num_layers} blocks, but {where} "
                         f"{list(config.audio_inject_layers)} make {expected}; keep the model's config.json beside "
                         f"its shards")
    return config
