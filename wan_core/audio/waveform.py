"""Audio in: a file, ComfyUI's AUDIO or a waveform, as the mono 16 kHz float32 signal S2V encodes.

As the reference (librosa.load(path, sr=16000)): channels are averaged first, then librosa
resamples with its default (soxr "HQ"). The resampler is not a free choice: another one
changes the final features by ~1e-2 (docs/s2v-facts.md §3).
"""
from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Mapping, Union

import numpy as np
import torch

SAMPLE_RATE = 16000  # wav2vec2's

AudioInput = Union[str, os.PathLike, Mapping, tuple]


def load_audio(source: AudioInput) -> np.ndarray:
    """The mono float32 waveform at 16 kHz, a 1-D numpy array.

    `source`: a path to an audio file librosa reads (wav, flac, ogg, mp3, ...); ComfyUI's AUDIO
    dict {"waveform": [1, channels, samples], "sample_rate": int}; or (waveform, sample_rate)
    with waveform [samples] or [channels, samples] (a tensor or an array, floats in [-1, 1]).
    """
    if isinstance(source, (str, os.PathLike)):
        return _load_file(Path(source))
    if isinstance(source, Mapping):
        if "waveform" not in source or "sample_rate" not in source:
            raise ValueError(f"an AUDIO dict needs 'waveform' [1, channels, samples] and 'sample_rate', got the "
                             f"keys {sorted(source)}")
        waveform = _as_array(source["waveform"], "AUDIO waveform")
        if waveform.ndim != 3:
            raise ValueError(f"AUDIO waveform must be [batch, channels, samples], got shape {waveform.shape}")
        if waveform.shape[0] != 1:
            raise ValueError(f"AUDIO holds a batch of {waveform.shape[0]} clips; speech-to-video takes one")
        return _to_16k(waveform[0], source["sample_rate"], "AUDIO")
    if isinstance(source, tuple) and len(source) == 2:
        waveform = _as_array(source[0], "waveform")
        if waveform.ndim not in (1, 2):
            raise ValueError(f"waveform must be [samples] or [channels, samples], got shape {waveform.shape}")
        return _to_16k(waveform if waveform.ndim == 2 else waveform[None], source[1], "waveform")
    if source is None:
        raise ValueError("no audio: speech-to-video needs the speech (a file path, an AUDIO dict or "
                         "(waveform, sample_rate))")
    raise TypeError(f"audio must be a file path, an AUDIO dict or (waveform, sample_rate), got {type(source).__name__}")


def read_audio_file(path: Union[str, os.PathLike]) -> tuple[np.ndarray, int]:
    """An audio file as it is: ([channels, samples] float32, its own sample rate), for muxing
    the speech into the video."""
    waveform, sample_rate = _librosa_load(Path(path), sr=None, mono=False)
    return np.atleast_2d(waveform), int(sample_rate)


def _load_file(path: Path) -> np.ndarray:
    return _librosa_load(path, sr=SAMPLE_RATE, mono=True)[0]


def _librosa_load(path: Path, **options) -> tuple[np.ndarray, int]:
    import librosa

    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        waveform, sample_rate = librosa.load(path, **options)
    except Exception as e:  # soundfile, audioread and librosa each raise their own kinds
        raise ValueError(f"{path} is not a readable audio file ({type(e).__name__}: {e}); convert it to wav, "
                         f"flac or mp3") from None
    return _checked(np.ascontiguousarray(waveform, dtype=np.float32), str(path)), sample_rate


def _as_array(waveform, what: str) -> np.ndarray:
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().float().cpu().numpy()
    if not isinstance(waveform, np.ndarray) or not np.issubdtype(waveform.dtype, np.floating):
        raise TypeError(f"{what} must be a float tensor or array, got {type(waveform).__name__}"
                        f"{'' if not hasattr(waveform, 'dtype') else ' of ' + str(waveform.dtype)}")
    return waveform.astype(np.float32, copy=False)


def _to_16k(channels: np.ndarray, sample_rate, what: str) -> np.ndarray:
    """[channels, samples] at `sample_rate` -> mono at 16 kHz: mean over channels, then librosa's resampler."""
    import librosa

    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Integral) or sample_rate <= 0:
        raise ValueError(f"{what}: sample_rate must be a positive whole number of Hz, got {sample_rate!r}")
    mono = np.mean(channels, axis=0)
    if int(sample_rate) != SAMPLE_RATE and mono.size:
        mono = librosa.resample(mono, orig_sr=int(sample_rate), target_sr=SAMPLE_RATE)
    return _checked(np.ascontiguousarray(mono, dtype=np.float32), what)


def _checked(waveform: np.ndarray, what: str) -> np.ndarray:
    if waveform.size == 0:
        raise ValueError(f"{what} holds no audio samples")
    if not np.isfinite(waveform).all():
        raise ValueError(f"{what} has NaN or infinite samples")
    return waveform
