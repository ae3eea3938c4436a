"""The S2V DiT's audio input: all 25 wav2vec2 hidden states, one vector per video frame.

The reference's recipe (wan/modules/s2v/audio_encoder.py; docs/s2v-facts.md §3), step by step:

1. normalise the whole 16 kHz clip: (x - mean) / sqrt(var + 1e-7), biased variance
   (transformers' Wav2Vec2FeatureExtractor with do_normalize, which is what the reference calls);
2. wav2vec2 in one pass with every hidden state: [25, T50, C] at 50 frames per second,
   T50 = floor((samples - 400) / 320) + 1;
3. linear interpolation in time (align_corners) to 30 frames per second:
   T30 = int(T50 / 50.0 * 30), computed in floating point (one less than T50 * 3 // 5 for some T50);
4. clips = int(T30 / (F * 30 / fps)) + 1 for F frames per clip (one more when T30 is a whole
   number of clips; the last clip usually runs past the audio);
5. video frame i of the clips * F takes 30-fps frame round(i * 30 / fps), numpy's
   round-half-to-even (at 16 fps the halves fall on i = 4 mod 8: frame 12 takes 22, not 23);
   a frame whose index is past the audio gets zeros (not the last frame, not silence).
"""
from __future__ import annotations

import logging
import math
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from wan_core.audio.waveform import SAMPLE_RATE, load_audio

log = logging.getLogger("wan_core")

WAV2VEC_RATE = 50   # wav2vec2 frames per second (hop 320 samples at 16 kHz)
FEATURE_RATE = 30   # the reference resamples them to this rate before bucketing
NORMALIZE_EPS = 1e-7


def wav2vec_frames(samples: int, kernels=(10, 3, 3, 3, 3, 2, 2), strides=(5, 2, 2, 2, 2, 2, 2)) -> int:
    """Frames wav2vec2's convolution stack makes of `samples` (floor((samples - 400) / 320) + 1)."""
    frames = samples
    for kernel, stride in zip(kernels, strides):
        frames = (frames - kernel) // stride + 1
    return max(frames, 0)


def feature_frames(wav2vec_count: int) -> int:
    """T30 = int(T50 / 50.0 * 30): the 30-fps frame count, truncated in floating point."""
    return int(wav2vec_count / float(WAV2VEC_RATE) * FEATURE_RATE)


def clip_count(feature_count: int, frames_per_clip: int, fps: int = 16) -> int:
    """Clips the audio asks for: int(T30 / (F * 30 / fps)) + 1."""
    return int(feature_count / (frames_per_clip * (FEATURE_RATE / fps))) + 1


def frame_indices(num_frames: int, fps: int = 16) -> np.ndarray:
    """The 30-fps feature frame each of `num_frames` video frames at `fps` takes: the reference
    places frame i at time i / fps (numpy linspace from 0, end excluded) and rounds time * 30
    half to even (indices past the audio are the caller's to zero)."""
    duration = num_frames / fps
    span = math.ceil(num_frames / fps * FEATURE_RATE)  # the reference's padded length
    times = np.linspace(0, duration, num_frames, endpoint=False)
    return np.clip(np.round(times * FEATURE_RATE).astype(int), 0, span - 1)


MIN_SAMPLES = next(n for n in range(400, 2000) if feature_frames(wav2vec_frames(n)) >= 1)


def encode_waveform(encoder, waveform: np.ndarray) -> torch.Tensor:
    """All hidden states of wav2vec2 for a mono 16 kHz waveform: [25, T50, C] float32 on the CPU."""
    from transformers import Wav2Vec2FeatureExtractor

    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=True)
    inputs = extractor(waveform, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
    with torch.no_grad():
        out = encoder(inputs.to(device=encoder.device, dtype=encoder.dtype), output_hidden_states=True)
    return torch.cat(out.hidden_states).float().cpu()


def audio_features(encoder, waveform: Union[np.ndarray, torch.Tensor], sample_rate: int, *,
                   frames_per_clip: int = 80, fps: int = 16) -> tuple[torch.Tensor, int]:
    """(features [1, 25, C, clips * frames_per_clip] float32, clips) for `waveform` (mono
    [samples] or [channels, samples] at `sample_rate`; resampled to 16 kHz as `load_audio`).

    Clip r's slice is features[..., r * F : (r + 1) * F]. The encoder runs where it is (the
    reference: float32 on the CPU)."""
    if isinstance(frames_per_clip, bool) or not isinstance(frames_per_clip, int) or frames_per_clip < 4 \
            or frames_per_clip % 4:
        raise ValueError(f"frames_per_clip must be a multiple of 4 (the VAE's 4 frames per latent), got "
                         f"{frames_per_clip!r}")
    waveform = load_audio((waveform, sample_rate))
    if waveform.size < MIN_SAMPLES:
        raise ValueError(f"the audio is {waveform.size / SAMPLE_RATE:.3f} s long; speech-to-video needs at least "
                         f"{MIN_SAMPLES / SAMPLE_RATE:.3f} s (one 30-fps audio frame)")
    if not np.any(waveform):
        log.warning("the audio is silent: the video will show a silent speaker")
    states = encode_waveform(encoder, waveform)
    count = feature_frames(states.shape[1])
    states = F.interpolate(states.transpose(1, 2), size=count, mode="linear", align_corners=True).transpose(1, 2)
    clips = clip_count(count, frames_per_clip, fps)
    indices = torch.from_numpy(frame_indices(clips * frames_per_clip, fps))
    inside = indices < count
    features = states.new_zeros(states.shape[0], clips * frames_per_clip, states.shape[2])
    features[:, inside] = states[:, indices[inside]]
    return features.permute(0, 2, 1)[None].contiguous(), clips
