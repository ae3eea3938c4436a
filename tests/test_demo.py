"""`python -m wan_core demo` end to end in a fresh process, as a user runs it (issue 4, test 6(e))."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from wan_core.demo import DEMO_TASKS, TINY_RUNS, detect_official_task, ensure_tiny_checkpoints, find_real_checkpoints
from wan_core.pipeline import i2v_pixel_size, parse_size, s2v_size
from wan_core.video import read_audio_track, read_video

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_demo_writes_a_video_per_task_and_says_how_to_use_real_weights(tmp_path):
    env = {**os.environ, "WAN22_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "wan_core", "demo", "--output_dir", str(tmp_path / "out")],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "writing tiny random checkpoints" in result.stderr
    assert "tiny random weights, which cannot make a real picture" in result.stdout
    for task in DEMO_TASKS:
        video = tmp_path / "out" / f"demo_{task}.mp4"
        assert str(video) in result.stdout
        assert f"python -m wan_core generate --task {task} --ckpt_dir /path/Wan2.2-" in result.stdout
        frames, _ = read_video(video)
        width, height = parse_size(TINY_RUNS[task].size)
        if task == "i2v-A14B":  # the demo image is 320x192: the same aspect as 160*96
            height, width = i2v_pixel_size((192, 320), (width, height), task)
        if task == "s2v-14B":  # 0.9 s of speech: two 8-frame clips less the first clip's 3, with the sound
            height, width = s2v_size((192, 320), width * height)
            assert frames.shape == (2 * TINY_RUNS[task].frame_num - 3, height, width, 3)
            sound, rate = read_audio_track(video)
            assert sound.shape[1] == pytest.approx(frames.shape[0] / 16 * rate, abs=2048)  # whole AAC frames
            continue
        assert frames.shape == (TINY_RUNS[task].frame_num, height, width, 3)
    cached = sorted(p.name for p in (tmp_path / "cache" / "demo").iterdir())
    assert len(cached) == 1 and not cached[0].startswith(".writing")


def test_tiny_checkpoints_are_written_once(tmp_path):
    first = ensure_tiny_checkpoints(str(tmp_path))
    stamps = {task: (folder / "Wan2.1_VAE.pth").stat().st_mtime_ns for task, folder in first.items()
              if task != "ti2v-5B"}
    again = ensure_tiny_checkpoints(str(tmp_path))
    assert again == first
    assert stamps == {task: (folder / "Wan2.1_VAE.pth").stat().st_mtime_ns for task, folder in again.items()
                      if task != "ti2v-5B"}
    assert {detect_official_task(folder) for folder in first.values()} == set(DEMO_TASKS)


def test_demo_ckpt_dir_finds_one_official_folder_or_several(tiny_folders, tmp_path):
    assert find_real_checkpoints(tiny_folders["i2v-A14B"]) == {"i2v-A14B": tiny_folders["i2v-A14B"]}
    holder = tiny_folders["t2v-A14B"].parent
    assert find_real_checkpoints(holder) == tiny_folders
    with pytest.raises(FileNotFoundError, match="neither an official Wan2.2 folder nor holds one"):
        find_real_checkpoints(tmp_path)


def test_real_weights_run_in_bf16_and_tiny_ones_at_their_small_size(tmp_path):
    from wan_core.demo import TinyRun, generate_argv

    real = generate_argv("t2v-A14B", tmp_path, tmp_path / "a.mp4", None, None, None)
    tiny = generate_argv("t2v-A14B", tmp_path, tmp_path / "a.mp4", None, TinyRun("160*96", 9, 8), None)
    assert "--convert_model_dtype" in real and "--size" not in real
    assert "--convert_model_dtype" not in tiny and tiny[tiny.index("--size") + 1] == "160*96"
