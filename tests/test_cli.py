"""`python -m wan_core generate`: end to end on tiny official-layout checkpoints, the mp4 read
back with PyAV, Ctrl-C, and clear errors for bad requests (issue 4, tests 6(e) and 6(f))."""
from __future__ import annotations

import logging
import os
import shutil
import signal

import numpy as np
import pytest
from PIL import Image

from wan_core.cli import main
from wan_core.pipeline import i2v_pixel_size
from wan_core.video import read_video

TINY = ["--size", "64*32", "--frame_num", "5", "--sample_steps", "3", "--base_seed", "5", "--allow_any_size"]


def test_generate_writes_an_mp4_with_the_requested_frames_and_size(tiny_folders, tmp_path, caplog):
    out = tmp_path / "fox.mp4"
    caplog.set_level(logging.INFO, logger="wan_core")
    rc = main(["generate", "--task", "t2v-A14B", "--ckpt_dir", str(tiny_folders["t2v-A14B"]),
               "--prompt", "a fox in the snow", "--save_file", str(out), *TINY])
    assert rc == 0
    assert "attention: sdpa (auto: sdpa is the only back-end on cpu)" in caplog.text  # the back-end that runs
    frames, fps = read_video(out)
    assert frames.shape == (5, 32, 64, 3) and fps == 16
    assert frames.std() > 0  # decoded pictures, not an empty stream


def test_i2v_through_the_cli_keeps_the_image_aspect(tiny_folders, tmp_path):
    image = tmp_path / "wide.png"
    Image.fromarray((np.random.default_rng(1).random((40, 100, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "i2v.mp4"
    # flags without the command word mean `generate`, like the reference's generate.py
    rc = main(["--task", "i2v-A14B", "--ckpt_dir", str(tiny_folders["i2v-A14B"]), "--prompt", "waves",
               "--image", str(image), "--save_file", str(out), "--sample_guide_scale", "3.0,4.0",
               "--offload_model", "true", "--t5_cpu", "--blocks_to_swap", "auto", *TINY])  # on a CPU: nothing to swap
    assert rc == 0
    height, width = i2v_pixel_size((40, 100), (64, 32), "i2v-A14B")
    frames, _ = read_video(out)
    assert frames.shape == (5, height, width, 3)


def test_ctrl_c_stops_after_the_current_step_and_writes_nothing(tiny_folders, tmp_path, monkeypatch, capsys):
    """A real SIGINT, sent during the first step's progress update, goes through the CLI's
    handler and the pipeline's per-step interrupt check."""
    import tqdm

    update = tqdm.tqdm.update

    def update_then_press_ctrl_c(bar, n=1):
        update(bar, n)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(tqdm.tqdm, "update", update_then_press_ctrl_c)
    out = tmp_path / "never.mp4"
    handler_before = signal.getsignal(signal.SIGINT)
    rc = main(["generate", "--task", "t2v-A14B", "--ckpt_dir", str(tiny_folders["t2v-A14B"]), "--prompt", "x",
               "--save_file", str(out), *TINY])
    assert rc == 130
    assert "interrupted after step 1 of 3; no video written" in capsys.readouterr().err
    assert not out.exists()
    assert signal.getsignal(signal.SIGINT) is handler_before


@pytest.mark.parametrize("task, extra, message", [
    ("t2v-A14B", ["--size", "640*640"], "size 640*640 is not supported by t2v-A14B; supported sizes "
                                        "(width*height): 720*1280, 1280*720, 480*832, 832*480"),
    ("ti2v-5B", ["--size", "1280*720"], "supported sizes (width*height): 704*1280, 1280*704"),
    ("t2v-A14B", ["--frame_num", "80"], "--frame_num must be 4n+1"),
    ("i2v-A14B", [], "i2v-A14B animates an image: pass --image"),
    ("t2v-A14B", ["--sample_steps", "0"], "steps must be a whole number >= 1, got 0"),
    ("t2v-A14B", ["--boundary", "1.5"], "boundary must be a fraction in (0, 1)"),
    ("t2v-A14B", ["--boundary", "0"], "boundary must be a fraction in (0, 1)"),
    ("i2v-A14B", ["--image", "/no/such/image.png"], "--image /no/such/image.png: file not found"),
    ("t2v-A14B", ["--blocks_to_swap", "41"], "blocks_to_swap must be 'auto' or a whole number 0..40"),
    ("ti2v-5B", ["--blocks_to_swap", "31"], "whole number 0..30 (this model has 30 blocks)"),
    ("t2v-A14B", ["--prefetch_blocks", "-1"], "--prefetch_blocks must be >= 0"),
])
def test_bad_requests_fail_fast_with_a_clear_message(task, extra, message, tmp_path, capsys):
    rc = main(["generate", "--task", task, "--ckpt_dir", str(tmp_path), "--prompt", "x", *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_missing_checkpoint_files_are_named(tiny_folders, tmp_path, capsys):
    partial = tmp_path / "Wan2.2-T2V-A14B"
    shutil.copytree(tiny_folders["t2v-A14B"], partial)
    (partial / "Wan2.1_VAE.pth").unlink()
    shutil.rmtree(partial / "low_noise_model")
    rc = main(["generate", "--task", "t2v-A14B", "--ckpt_dir", str(partial), "--prompt", "x", *TINY])
    assert rc == 2
    err = capsys.readouterr().err
    assert "missing: low_noise_model/" in err and "Wan2.1_VAE.pth" in err
    assert "models_t5_umt5-xxl-enc-bf16.pth" not in err  # present, so not reported


def test_blocks_to_swap_flag_takes_a_number_or_auto(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--ckpt_dir", ".", "--prompt", "x", "--blocks_to_swap", "lots"])
    assert "expected a number of blocks or auto" in capsys.readouterr().err


def test_guide_scale_flag_takes_one_number_or_a_pair(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--ckpt_dir", ".", "--prompt", "x", "--sample_guide_scale", "1,2,3"])
    assert "expected a number or LOW,HIGH" in capsys.readouterr().err


def test_compile_flag_compiles_and_keeps_the_video(tiny_folders, tmp_path):
    """--compile runs the blocks through torch.compile and the video stays the eager one. The
    latents agree to ~1e-5 (tests/test_nodes.py); the random tiny VAE amplifies that and the
    lossy mp4 can flip an encoder decision for a whole block, so frames are compared on average
    (a wrong model differs by tens of levels)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    videos, graphs = [], []
    for extra in ([], ["--compile"]):
        out = tmp_path / f"fox{len(extra)}.mp4"
        assert main(["generate", "--task", "ti2v-5B", "--ckpt_dir", str(tiny_folders["ti2v-5B"]),
                     "--prompt", "a fox", "--save_file", str(out), *TINY, "--size", "64*64", *extra]) == 0
        videos.append(read_video(out)[0].astype(np.int16))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] > graphs[0]
    assert np.abs(videos[0] - videos[1]).mean() <= 2
