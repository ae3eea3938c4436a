"""Writing generated videos to mp4 with PyAV (H.264, yuv420p).

`write_video` takes what the pipeline returns (a [3, F, H, W] tensor in [-1, 1]) or plain
frames ([F, H, W, 3] uint8). Float video is turned into 8-bit the way the reference's
`save_video` does: clamp to [-1, 1], map to [0, 1], scale by 255 and truncate.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

VideoInput = Union[torch.Tensor, np.ndarray]


def to_uint8_frames(video: VideoInput) -> np.ndarray:
    """[F, H, W, 3] uint8 frames from a [3, F, H, W] (or [1, 3, F, H, W]) float video in
    [-1, 1], or from [F, H, W, 3] uint8 frames (returned unchanged)."""
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(video)
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"video must be a torch tensor or numpy array, got {type(video).__name__}")
    if video.dtype == torch.uint8:
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be [frames, height, width, 3], got shape {tuple(video.shape)}")
        return video.cpu().numpy()
    if not video.is_floating_point():
        raise TypeError(f"video must be uint8 frames or a float tensor in [-1, 1], got dtype {video.dtype}")
    if video.ndim == 5 and video.shape[0] == 1:
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"a float video must be [3, frames, height, width] in [-1, 1] (what generate returns), "
                         f"got shape {tuple(video.shape)}")
    unit = (video.detach().float().cpu().clamp(-1, 1) + 1) / 2
    return (unit * 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()


def write_video(video: VideoInput, path: Union[str, os.PathLike], fps: int, *, crf: int = 18,
                audio: Optional[tuple[np.ndarray, int]] = None) -> Path:
    """Encode `video` (see `to_uint8_frames`) as an H.264 mp4 at `fps` frames per second.

    H.264 in yuv420p needs even width and height (every Wan output size is a multiple of 16).
    `crf` is x264's constant-rate factor (lower is better quality, 18 is visually lossless).
    `audio`: (waveform [channels, samples] or [samples] float in [-1, 1], sample rate), muxed
    as AAC at 192 kb/s from t = 0 (what the reference's ffmpeg step writes for S2V); more than
    two channels are mixed down to mono.
    Returns the path written; missing parent folders are created.
    """
    import av

    frames = to_uint8_frames(video)
    count, height, width, _ = frames.shape
    if count == 0:
        raise ValueError("video has no frames")
    if height % 2 or width % 2:
        raise ValueError(f"H.264 mp4 needs even frame sizes, got {width}x{height}; crop or resize by one pixel")
    if not (isinstance(fps, (int, float)) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf)}
        # every stream must exist before the first packet is muxed (the header is written then)
        sound = None if audio is None else _audio_stream(container, *audio)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
        if sound is not None:
            audio_stream, audio_frame = sound
            container.mux(audio_stream.encode(audio_frame))
            container.mux(audio_stream.encode(None))  # flush
    return path


AUDIO_BIT_RATE = 192_000


def _audio_stream(container, waveform: np.ndarray, sample_rate: int):
    """(AAC stream, the whole waveform as one frame) for `write_video`."""
    import av

    samples = np.asarray(waveform, dtype=np.float32)
    samples = samples[None] if samples.ndim == 1 else samples
    if samples.ndim != 2 or samples.shape[1] == 0:
        raise ValueError(f"audio must be [channels, samples] with samples, got shape {samples.shape}")
    if samples.shape[0] > 2:
        samples = samples.mean(axis=0, keepdims=True)
    layout = "stereo" if samples.shape[0] == 2 else "mono"
    stream = container.add_stream("aac", rate=int(sample_rate))
    stream.bit_rate, stream.layout = AUDIO_BIT_RATE, layout
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.clip(-1, 1)), format="fltp", layout=layout)
    frame.sample_rate = int(sample_rate)
    return stream, frame


def read_audio_track(path: Union[str, os.PathLike]) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of a media file: ([channels, samples] float32, sample rate)."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError(f"{path} has no audio stream")
        stream = container.streams.audio[0]
        chunks = [frame.to_ndarray() for frame in container.decode(stream)]
        return np.concatenate(chunks, axis=1).astype(np.float32), stream.sample_rate


def read_video(path: Union[str, os.PathLike]) -> tuple[np.ndarray, float]:
    """Decode an mp4 back to ([F, H, W, 3] uint8 frames, fps)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        fps = float(stream.average_rate) if stream.average_rate else 0.0
    return np.stack(frames), fps
