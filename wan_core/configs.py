"""Every Wan2.2 variant as data.

The model code never branches on a task name: it reads a `DiTConfig`. Tasks
(`TaskConfig`) pair a DiT config with its VAE, text encoder and the sampling
defaults the reference ships. Sizes are (width, height) like the reference's
``--size W*H`` flag.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Union

NUM_TRAIN_TIMESTEPS = 1000
TEXT_LEN = 512
TEXT_DIM = 4096

# The reference's default negative prompt (Chinese; the models were trained with it).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
S2V_NEGATIVE_PROMPT = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，多余的手指，"
    "画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，"
    "背景人很多，倒着走"
)


@dataclass(frozen=True)
class DiTConfig:
    """Shape of one Wan transformer. `model_type` selects only input handling."""

    model_type: str = "t2v"  # t2v | i2v | ti2v | s2v
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = TEXT_LEN
    in_dim: int = 16
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = TEXT_DIM
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    # S2V additions (ignored by other model types)
    audio_dim: int = 1024
    audio_inject_layers: tuple[int, ...] = ()
    motion_frames: int = 73
    cond_dim: int = 16

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def tiny(self, **overrides) -> "DiTConfig":
        """A small config of the same variant, for tests and the demo."""
        small = dict(dim=32, ffn_dim=64, freq_dim=16, text_dim=24, num_heads=2, num_layers=2)
        if self.audio_inject_layers:
            small.update(audio_dim=20, audio_inject_layers=(0,), motion_frames=73)
        small.update(overrides)
        return replace(self, **small)


@dataclass(frozen=True)
class TaskConfig:
    name: str
    dit: DiTConfig
    vae_version: str  # "2.1" | "2.2"
    vae_stride: tuple[int, int, int]
    latent_channels: int
    sample_shift: float
    sample_steps: int
    # one scale, or (low_noise, high_noise) like the reference config
    sample_guide_scale: Union[float, tuple[float, float]]
    boundary: Optional[float] = None  # MoE hand-off as a fraction of NUM_TRAIN_TIMESTEPS
    sample_fps: int = 16
    frame_num: int = 81
    supported_sizes: tuple[tuple[int, int], ...] = ()  # (width, height)
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    # official folder layout
    high_noise_checkpoint: Optional[str] = None
    low_noise_checkpoint: Optional[str] = None
    t5_checkpoint: str = "models_t5_umt5-xxl-enc-bf16.pth"
    vae_checkpoint: str = "Wan2.1_VAE.pth"
    extra: dict = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return self.boundary is not None


_SIZES_14B = ((720, 1280), (1280, 720), (480, 832), (832, 480))

T2V_A14B_DIT = DiTConfig(model_type="t2v")
I2V_A14B_DIT = DiTConfig(model_type="i2v", in_dim=36)
TI2V_5B_DIT = DiTConfig(model_type="ti2v", in_dim=48, out_dim=48, dim=3072, ffn_dim=14336,
                        num_heads=24, num_layers=30)
S2V_14B_DIT = DiTConfig(model_type="s2v", audio_inject_layers=(0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39))

TASKS: dict[str, TaskConfig] = {
    "t2v-A14B": TaskConfig(
        name="t2v-A14B", dit=T2V_A14B_DIT, vae_version="2.1", vae_stride=(4, 8, 8), latent_channels=16,
        sample_shift=12.0, sample_steps=40, sample_guide_scale=(3.0, 4.0), boundary=0.875,
        supported_sizes=_SIZES_14B, high_noise_checkpoint="high_noise_model",
        low_noise_checkpoint="low_noise_model"),
    "i2v-A14B": TaskConfig(
        name="i2v-A14B", dit=I2V_A14B_DIT, vae_version="2.1", vae_stride=(4, 8, 8), latent_channels=16,
        sample_shift=5.0, sample_steps=40, sample_guide_scale=(3.5, 3.5), boundary=0.900,
        supported_sizes=_SIZES_14B, high_noise_checkpoint="high_noise_model",
        low_noise_checkpoint="low_noise_model"),
    "ti2v-5B": TaskConfig(
        name="ti2v-5B", dit=TI2V_5B_DIT, vae_version="2.2", vae_stride=(4, 16, 16), latent_channels=48,
        sample_shift=5.0, sample_steps=50, sample_guide_scale=5.0, sample_fps=24, frame_num=121,
        supported_sizes=((704, 1280), (1280, 704)), vae_checkpoint="Wan2.2_VAE.pth"),
    "s2v-14B": TaskConfig(
        name="s2v-14B", dit=S2V_14B_DIT, vae_version="2.1", vae_stride=(4, 8, 8), latent_channels=16,
        sample_shift=3.0, sample_steps=40, sample_guide_scale=4.5,
        supported_sizes=_SIZES_14B + ((1024, 704), (704, 1024), (704, 1280), (1280, 704)),
        negative_prompt=S2V_NEGATIVE_PROMPT,
        extra={"wav2vec": "wav2vec2-large-xlsr-53-english", "drop_first_motion": True}),
}


def get_task(name: str) -> TaskConfig:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}") from None


def task_for_model_type(model_type: str) -> TaskConfig:
    """The task whose DiT has this model_type (t2v → t2v-A14B, ti2v → ti2v-5B, …)."""
    for task in TASKS.values():
        if task.dit.model_type == model_type:
            return task
    raise ValueError(f"unknown model type {model_type!r}; expected one of "
                     f"{sorted(t.dit.model_type for t in TASKS.values())}")
