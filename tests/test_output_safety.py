"""Nothing lost: the output path is checked before any model loads, videos are written to a
temporary file and renamed into place, a second writer is refused (or takes a free name), and
Ctrl-C during decoding or writing says truthfully what was (not) written (issue 15, item 1)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import wan_core.cli as cli
from wan_core.cli import main
from wan_core.video import (OutputBusyError, OutputLock, OutputPathError, check_output_path, read_video,
                            write_video)

TINY = ["--size", "64*32", "--frame_num", "5", "--sample_steps", "2", "--base_seed", "5", "--allow_any_size"]
VIDEO = torch.linspace(-1, 1, 3 * 5 * 16 * 16).reshape(3, 5, 16, 16)


def _leftovers(folder) -> list[str]:
    """Temporary or lock files left beside the outputs."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def existing(tmp_path):
    path = tmp_path / "keep.mp4"
    write_video(torch.zeros(3, 5, 16, 16), path, fps=16)
    return path, path.read_bytes()


def test_video_round_trips_in_every_supported_container(tmp_path):
    for suffix in (".mp4", ".mov", ".mkv", ".webm"):
        frames, fps = read_video(write_video(VIDEO, tmp_path / f"v{suffix}", fps=16))
        assert frames.shape == (5, 16, 16, 3) and fps == 16, suffix
        assert np.abs(frames.astype(int).mean() - 127) < 20, suffix  # the gradient, not black
    assert _leftovers(tmp_path) == []


def test_an_interrupt_mid_write_keeps_the_old_file_byte_for_byte(existing, monkeypatch):
    import av

    path, before = existing
    real = av.VideoFrame.from_ndarray
    calls = []

    def interrupt_on_the_third_frame(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", interrupt_on_the_third_frame)
    with pytest.raises(KeyboardInterrupt):
        write_video(VIDEO, path, fps=16)
    assert len(calls) == 3  # it was interrupted in the middle of the frames
    assert path.read_bytes() == before
    assert _leftovers(path.parent) == []


def test_an_encoder_failure_keeps_the_old_file_and_a_new_path_absent(existing, monkeypatch, tmp_path):
    import av

    path, before = existing

    def broken(*args, **kwargs):
        raise OSError("broken encoder")

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", broken)
    for target in (path, tmp_path / "new.mp4"):
        with pytest.raises(OSError, match="broken encoder"):
            write_video(VIDEO, target, fps=16)
    assert path.read_bytes() == before
    assert not (tmp_path / "new.mp4").exists() and _leftovers(tmp_path) == []


def _unwritable_folder(tmp_path):
    """A folder this process cannot create files in (as root, permission bits do not stop it)."""
    if os.geteuid() == 0:
        return "/sys/fs"
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    return str(folder)


@pytest.mark.parametrize("name, message", [
    ("out.txt", "extension '.txt'; a video is written as one of .mp4, .mov, .mkv, .webm"),
    ("out", "no extension"),
    ("out.gif", "extension '.gif'"),
    ("folder", "is a folder; give a file name inside it"),
    ("a_file/out.mp4", "is a file, not a folder"),
    ("UNWRITABLE/out.mp4", "cannot write in"),
])
def test_bad_output_paths_are_named_with_the_reason(name, message, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_bytes(b"x")
    path = name.replace("UNWRITABLE", _unwritable_folder(tmp_path)) if name.startswith("UNWRITABLE") \
        else str(tmp_path / name)
    with pytest.raises(OutputPathError, match=message) as error:
        check_output_path(path, "--save_file")
    assert str(error.value).startswith("--save_file ")
    assert check_output_path(tmp_path / "new" / "deeper" / "ok.webm") == tmp_path / "new" / "deeper" / "ok.webm"


def test_a_second_writer_is_refused_or_takes_a_free_name(tmp_path):
    path = tmp_path / "shared.mp4"
    with OutputLock(path) as first:
        assert first.path == path
        with pytest.raises(OutputBusyError, match=f"{path} is being written by another run \\(process {os.getpid()}\\)"):
            OutputLock(path)
        with OutputLock(path, unique=True) as second:
            assert second.path == tmp_path / "shared-2.mp4"
    assert _leftovers(tmp_path) == []  # both locks released
    with OutputLock(path):
        pass


def test_a_lock_left_by_a_killed_writer_is_taken_over(tmp_path):
    path = tmp_path / "stale.mp4"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".stale.mp4.lock").write_text(dead.stdout.strip())
    with OutputLock(path) as lock:
        assert lock.path == path
        assert (tmp_path / ".stale.mp4.lock").read_text() == str(os.getpid())


# --- the CLI: checked before any model loads, truthful about interrupts -------------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if the CLI gets as far as loading a model."""
    calls = []

    def load(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(cli, "load_task_models", load)
    return calls


@pytest.mark.parametrize("extra, message", [
    (["--save_file", "OUT/x.txt"], "--save_file OUT/x.txt: extension '.txt'"),
    (["--save_file", "OUT"], "is a folder"),
    (["--save_file", "OUT/x.gif"], "extension '.gif'"),
    (["--device", "cuda"], "--device cuda: this machine has no CUDA GPU"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device"),
    (["--base_seed", str(2 ** 70)], "--base_seed must be a whole number in 0..18446744073709551615"),
    (["--sample_shift", "inf"], "--sample_shift must be a finite number > 0"),
    (["--sample_shift", "nan"], "--sample_shift must be a finite number > 0"),
    (["--sample_guide_scale", "nan"], "--sample_guide_scale must be a finite number or a (low_noise, high_noise)"),
    (["--sample_guide_scale", "3,inf"], "--sample_guide_scale must be a finite number"),
    (["--boundary", "nan"], "--boundary must be a fraction in (0, 1)"),
])
def test_bad_inputs_fail_before_any_model_loads(extra, message, no_loading, tiny_folders, tmp_path, capsys):
    extra = [part.replace("OUT", str(tmp_path)) for part in extra]
    message = message.replace("OUT", str(tmp_path))
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = main(["generate", "--task", "t2v-A14B", "--ckpt_dir", str(tiny_folders["t2v-A14B"]), "--prompt", "x",
               *TINY, *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert "Traceback" not in err and no_loading == []


def test_a_busy_output_fails_before_any_model_loads(no_loading, tiny_folders, tmp_path, capsys):
    out = tmp_path / "busy.mp4"
    with OutputLock(out):  # another run holds it
        rc = main(["generate", "--task", "t2v-A14B", "--ckpt_dir", str(tiny_folders["t2v-A14B"]), "--prompt", "x",
                   "--save_file", str(out), *TINY])
    assert rc == 2 and "is being written by another run" in capsys.readouterr().err
    assert no_loading == [] and not out.exists()


def _press_ctrl_c_when(monkeypatch, owner, attribute, after_calls: int = 1):
    """Send a real SIGINT to this process on the `after_calls`-th call of owner.attribute."""
    real = getattr(owner, attribute)
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == after_calls:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, wrapped)
    return calls


def _generate(tiny_folders, out) -> int:
    return main(["generate", "--task", "t2v-A14B", "--ckpt_dir", str(tiny_folders["t2v-A14B"]), "--prompt", "x",
                 "--save_file", str(out), *TINY])


def test_ctrl_c_during_decode_stops_and_keeps_the_existing_video(existing, tiny_folders, monkeypatch, capsys):
    import tqdm

    path, before = existing
    # the decode bar's first update is the first decoded latent frame
    real_init = tqdm.tqdm.__init__

    def init(bar, *args, **kwargs):
        real_init(bar, *args, **kwargs)
        if "decoding" in (kwargs.get("desc") or ""):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(tqdm.tqdm, "__init__", init)
    rc = _generate(tiny_folders, path)
    err = capsys.readouterr().err
    assert rc == 130, err
    assert "stopping after this latent frame is decoded; no video will be written" in err
    assert "generation interrupted while decoding (1 of 2 latent frames done); no video written" in err
    assert path.read_bytes() == before and _leftovers(path.parent) == []


def test_ctrl_c_while_writing_stops_at_once_and_keeps_the_existing_video(existing, tiny_folders, monkeypatch,
                                                                         capsys):
    import av

    path, before = existing
    calls = _press_ctrl_c_when(monkeypatch, av.VideoFrame, "from_ndarray", after_calls=2)
    rc = _generate(tiny_folders, path)
    err = capsys.readouterr().err
    assert rc == 130 and len(calls) == 2, err
    assert f"interrupted while writing {path}; the existing {path} is unchanged; no video written" in err
    assert path.read_bytes() == before and _leftovers(path.parent) == []


def test_a_complete_run_replaces_the_existing_video_and_leaves_nothing_beside_it(existing, tiny_folders, capsys):
    path, before = existing
    assert _generate(tiny_folders, path) == 0
    assert path.read_bytes() != before
    frames, _ = read_video(path)
    assert frames.shape == (5, 32, 64, 3)
    assert _leftovers(path.parent) == []


def test_unexpected_errors_are_one_line_not_a_traceback(monkeypatch, tiny_folders, tmp_path, capsys):
    def explode(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(cli, "load_task_models", explode)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    rc = _generate(tiny_folders, tmp_path / "x.mp4")
    err = capsys.readouterr().err
    assert rc == 1
    assert "error: RuntimeError: CUDA error: out of memory (set WAN22_DEBUG=1 to see the traceback)" in err
    assert "Traceback" not in err


def test_a_huge_request_says_what_it_needs_before_anything_loads(no_loading, tiny_folders, tmp_path, caplog):
    caplog.set_level("INFO", logger="wan_core")
    rc = main(["generate", "--task", "t2v-A14B", "--ckpt_dir", str(tiny_folders["t2v-A14B"]), "--prompt", "x",
               "--size", "4096*4096", "--allow_any_size", "--save_file", str(tmp_path / "huge.mp4")])
    assert rc == 1 and len(no_loading) == 1  # it got as far as loading (refused by the fixture) ...
    said = [record.getMessage() for record in caplog.records]
    work = next(i for i, m in enumerate(said) if m.startswith("work: "))
    loading = next(i for i, m in enumerate(said) if m.startswith("loading t2v-A14B"))
    assert work < loading  # ... after saying what the request costs
    assert "80 DiT forwards over 1,376,256 tokens each" in said[work] and "GiB of activations" in said[work]
    assert any("4096*4096 is 18.2x the tokens of t2v-A14B's largest trained size" in m for m in said)


@pytest.mark.parametrize("content", [b"<svg xmlns='http://www.w3.org/2000/svg' width='8' height='8'/>",
                                     b"\x89PNG\r\n\x1a\n broken"])
def test_an_unreadable_image_fails_before_any_model_loads(content, no_loading, tiny_folders, tmp_path, capsys):
    image = tmp_path / "start.png"
    image.write_bytes(content)
    rc = main(["generate", "--task", "i2v-A14B", "--ckpt_dir", str(tiny_folders["i2v-A14B"]), "--prompt", "x",
               "--image", str(image), *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and f"--image {image}: not an image Pillow can read" in err, err
    assert no_loading == [] and "Traceback" not in err
