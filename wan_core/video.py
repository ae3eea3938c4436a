"""Writing generated videos safely (H.264 mp4/mov/mkv or VP9 webm, with PyAV).

`write_video` takes what the pipeline returns (a [3, F, H, W] tensor in [-1, 1]) or plain
frames ([F, H, W, 3] uint8). Float video is turned into 8-bit the way the reference's
`save_video` does: clamp to [-1, 1], map to [0, 1], scale by 255 and truncate.

Nothing is lost on the way to the disk:
- `check_output_path` says before any model loads whether a path can take a video: a known
  extension whose encoder PyAV has, not a folder, in a folder that can be written;
- the video is encoded into a temporary file beside the target and renamed over it only when
  complete, so an interrupt or an encoder failure leaves an existing file byte for byte as it was;
- `OutputLock` reserves a path for one writer for the whole run (a lock file beside it holding
  the writer's process id); a second writer is told who holds it, or takes the next free name.
"""
from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

VideoInput = Union[torch.Tensor, np.ndarray]


@dataclass(frozen=True)
class VideoFormat:
    container: str  # PyAV / FFmpeg muxer name
    codec: str  # FFmpeg encoder name
    options: tuple[tuple[str, str], ...]  # encoder options; "{crf}" is filled in
    takes_aac: bool = True  # whether the container can hold S2V's AAC sound

    def encoder_options(self, crf: int) -> dict[str, str]:
        return {key: value.format(crf=crf) for key, value in self.options}


# Extension -> how it is written. H.264 in yuv420p plays everywhere; VP9 is webm's own codec.
VIDEO_FORMATS = {
    ".mp4": VideoFormat("mp4", "libx264", (("crf", "{crf}"),)),
    ".mov": VideoFormat("mov", "libx264", (("crf", "{crf}"),)),
    ".mkv": VideoFormat("matroska", "libx264", (("crf", "{crf}"),)),
    ".webm": VideoFormat("webm", "libvpx-vp9", (("crf", "{crf}"), ("b", "0")), takes_aac=False),
}
LOCK_SUFFIX = ".lock"


class OutputPathError(ValueError):
    """The output path cannot take a video (checked before any work is done)."""


class OutputBusyError(OutputPathError):
    """Another run is writing the same output path."""


def video_format(path: Union[str, os.PathLike], what: str = "output") -> VideoFormat:
    """The container/codec pair for `path`'s extension, after checking PyAV can encode it."""
    import av

    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_FORMATS:
        got = f"extension {suffix!r}" if suffix else "no extension"
        raise OutputPathError(f"{what} {path}: {got}; a video is written as one of "
                              f"{', '.join(VIDEO_FORMATS)} (e.g. video.mp4)")
    chosen = VIDEO_FORMATS[suffix]
    try:
        av.codec.Codec(chosen.codec, "w")
    except Exception:  # PyAV raises its own UnknownCodecError, differently named across versions
        others = [s for s, f in VIDEO_FORMATS.items() if f.codec != chosen.codec]
        raise OutputPathError(f"{what} {path}: this PyAV/FFmpeg build has no {chosen.codec} encoder for "
                              f"{suffix}; write {', '.join(others)} instead") from None
    return chosen


def check_output_path(path: Union[str, os.PathLike], what: str = "output") -> Path:
    """Check, without writing the video, that `path` can take one: see the module docstring.
    `what` names the input in messages (e.g. "--save_file"). Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a folder; give a file name inside it, e.g. {path / 'video.mp4'}")
    video_format(path, what)
    if path.exists() and not path.is_file():
        raise OutputPathError(f"{what} {path} exists and is not a regular file")
    folder = path.parent
    while not folder.exists():  # missing folders are created when writing: the first existing one counts
        folder = folder.parent
    if not folder.is_dir():
        raise OutputPathError(f"{what} {path}: {folder} is a file, not a folder")
    _probe_writable(folder, what, path)
    return path


def _probe_writable(folder: Path, what: str, path: Path) -> None:
    """Create and remove a file in `folder`: permission bits do not tell (root ignores them,
    read-only mounts do not show them)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".wan22-probe-"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputPathError(f"{what} {path}: cannot write in {folder} ({reason}); choose a writable "
                              f"folder") from None


def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{LOCK_SUFFIX}")


def _holder(lock: Path) -> Optional[int]:
    """The live process holding `lock`, or None when the lock is stale or unreadable."""
    try:
        pid = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, owned by someone else
    return pid


class OutputLock:
    """Reserves an output path for this process until `release()` (or the `with` block ends).

    The lock is a file `.<name>.lock` beside the target, created exclusively, holding this
    process's id; a lock whose process is gone (killed) is taken over. With `unique` a taken
    path (locked, or an existing file) gives way to the first free `name-2.mp4`, `name-3.mp4`…;
    without it a locked path raises OutputBusyError and an existing file will be replaced.
    """

    def __init__(self, path: Union[str, os.PathLike], *, unique: bool = False, what: str = "output"):
        self.requested = Path(path)
        self.path: Optional[Path] = None
        self._lock: Optional[Path] = None
        base = self.requested
        for n in range(1, 10_000):
            candidate = base if n == 1 else base.with_name(f"{base.stem}-{n}{base.suffix}")
            if unique and candidate.exists():
                continue
            if self._acquire(candidate):
                self.path = candidate
                return
            if not unique:
                holder = _holder(_lock_path(candidate))
                raise OutputBusyError(f"{what} {candidate} is being written by another run (process {holder}); "
                                      f"choose another file name or wait for it to finish")
        raise OutputBusyError(f"{what} {base}: no free name found beside it")

    def _acquire(self, candidate: Path) -> bool:
        lock = _lock_path(candidate)
        lock.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if _holder(lock) is not None:
                    return False
                try:  # stale: its writer died without releasing it
                    lock.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as out:
                out.write(str(os.getpid()))
            self._lock = lock
            return True
        return False

    def release(self) -> None:
        if self._lock is not None:
            try:
                self._lock.unlink()
            except FileNotFoundError:
                pass
            self._lock = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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
    """Encode `video` (see `to_uint8_frames`) at `fps` frames per second into `path`, whose
    extension picks the container (VIDEO_FORMATS). Atomic: the frames go to a temporary file
    beside `path`, which replaces `path` only once complete; on any failure or interrupt the
    temporary file is removed and an existing `path` is untouched.

    yuv420p needs even width and height (every Wan output size is a multiple of 16). `crf` is
    the constant-rate factor (lower is better quality; 18 is visually lossless for H.264).
    `audio`: (waveform [channels, samples] or [samples] float in [-1, 1], sample rate), muxed
    as AAC at 192 kb/s from t = 0 (what the reference's ffmpeg step writes for S2V); more than
    two channels are mixed down to mono. Containers without AAC (.webm) refuse audio.
    Returns the path written; missing parent folders are created.
    """
    import av

    path = Path(path)
    chosen = video_format(path)
    frames = to_uint8_frames(video)
    count, height, width, _ = frames.shape
    if count == 0:
        raise ValueError("video has no frames")
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p video needs even frame sizes, got {width}x{height}; crop or resize by one pixel")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < float("inf"):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if audio is not None and not chosen.takes_aac:
        raise OutputPathError(f"{path}: {path.suffix} cannot hold the AAC sound; write the video with sound as "
                              f"{', '.join(s for s, f in VIDEO_FORMATS.items() if f.takes_aac)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".part{path.suffix}")
    os.close(fd)
    try:
        with av.open(temporary, mode="w", format=chosen.container) as container:
            stream = container.add_stream(chosen.codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = chosen.encoder_options(crf)
            # every stream must exist before the first packet is muxed (the header is written then)
            sound = None if audio is None else _audio_stream(container, *audio)
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())  # flush the encoder's delayed frames
            if sound is not None:
                audio_stream, audio_frame = sound
                container.mux(audio_stream.encode(audio_frame))
                container.mux(audio_stream.encode(None))  # flush
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        if path.exists():  # keep the replaced file's permissions
            os.chmod(temporary, path.stat().st_mode & 0o7777)
        else:
            os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError as error:
            if error.errno != errno.ENOENT:
                raise
        raise
    return path


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


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
    """Decode a video file back to ([F, H, W, 3] uint8 frames, fps)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        fps = float(stream.average_rate) if stream.average_rate else 0.0
    return np.stack(frames), fps
