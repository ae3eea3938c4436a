"""`python -m wan_core demo`: every task end to end, with or without real weights.

Without weights it writes tiny random checkpoints in the official folder layout once (cached
under $WAN22_CACHE, default ~/.cache/comfyui-wan22, in demo/<hash of the tiny configs>/), then
runs T2V-A14B (two experts and the hand-off), I2V-A14B, image-conditioned TI2V-5B and S2V-14B
(a synthetic tone as the speech, two clips) through exactly the code `python -m wan_core
generate` runs (it builds that command line and runs it), with small sizes, few frames and few
steps. Random weights cannot draw a picture: the videos show coloured noise; what the demo
proves is that the whole path (official layout loading, text encoding, image and audio
conditioning, sampling, VAE decoding, mp4 writing with the sound) works on this machine.

`demo --ckpt_dir DIR` runs the same commands on real weights at the tasks' default settings,
where DIR is one official folder (Wan2.2-T2V-A14B, ...) or a folder holding several.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from wan_core.configs import TASKS, TaskConfig
from wan_core.pipeline import TOKENIZER_DIR, official_folder_name

log = logging.getLogger("wan_core")

DEMO_TASKS = ("t2v-A14B", "i2v-A14B", "ti2v-5B", "s2v-14B")
PROMPTS = {
    "t2v-A14B": "A red fox trots through fresh snow at dawn, its breath steaming in the cold air, "
                "the low sun lighting the pine trees behind it.",
    "i2v-A14B": "The scene slowly comes alive: light shifts across the shapes as the camera drifts gently forward.",
    "ti2v-5B": "The colours ripple and flow like paint stirred in water, the camera circling slowly.",
    "s2v-14B": "A person faces the camera and speaks calmly, with small natural head movements.",
}


@dataclass(frozen=True)
class TinyRun:
    """Settings for tiny random weights: small, but the A14B runs still cross the hand-off."""

    size: str
    frame_num: int  # S2V: frames per clip
    steps: int


TINY_RUNS = {
    "t2v-A14B": TinyRun(size="160*96", frame_num=9, steps=8),  # 6 high-noise steps, then 2 low-noise
    "i2v-A14B": TinyRun(size="160*96", frame_num=9, steps=8),  # 3 high-noise steps, then 5 low-noise
    "ti2v-5B": TinyRun(size="160*96", frame_num=9, steps=8),
    "s2v-14B": TinyRun(size="128*64", frame_num=8, steps=4),  # 0.9 s of speech: two 8-frame clips
}
DEMO_SPEECH_SECONDS = 0.9
DEMO_SEED = 42


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt_dir", default=None,
                        help="Real weights: an official folder (e.g. Wan2.2-T2V-A14B) or a folder holding several. "
                             "Without it, tiny random weights are used.")
    parser.add_argument("--output_dir", default="outputs", help="Where the videos go (default: ./outputs).")
    parser.add_argument("--cache_dir", default=None,
                        help="Where tiny checkpoints are kept (default: $WAN22_CACHE or ~/.cache/comfyui-wan22).")
    parser.add_argument("--device", default=None, help="Where sampling runs (default: cuda if available, else cpu).")


def cache_root(cache_dir: Optional[str] = None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("WAN22_CACHE"):
        return Path(os.environ["WAN22_CACHE"])
    return Path.home() / ".cache" / "comfyui-wan22"


# --------------------------------------------------------------------------------------------
# Tiny checkpoints in the official layout


def _tiny_configs() -> dict:
    from wan_core.testing import tiny_dit_config, tiny_text_config, tiny_vae_config

    return {"dit": {v: tiny_dit_config(v) for v in ("t2v", "i2v", "ti2v", "s2v")},
            "vae": {v: tiny_vae_config(v) for v in ("2.1", "2.2")},
            "text": tiny_text_config()}


def _configs_key(configs: dict) -> str:
    """Changes whenever a tiny config changes, so a stale cache is never reused."""
    described = repr({k: v for k, v in configs.items() if k != "text"}) + configs["text"].to_json_string()
    return hashlib.sha256(described.encode()).hexdigest()[:12]


def write_tiny_task_folder(folder: Path, task: TaskConfig, configs: dict) -> Path:
    """An official-layout folder for `task` with tiny random weights (experts differ by seed)."""
    from wan_core.testing import write_dit_checkpoint, write_text_encoder_checkpoint, write_vae_checkpoint

    variant = task.dit.model_type
    if task.is_moe:
        for seed, subfolder in enumerate((task.high_noise_checkpoint, task.low_noise_checkpoint), start=1):
            write_dit_checkpoint(folder / subfolder, variant, "official", seed=seed, config=configs["dit"][variant])
    else:
        write_dit_checkpoint(folder, variant, "official", seed=3, config=configs["dit"][variant])
    write_text_encoder_checkpoint(folder / task.t5_checkpoint, "official", config=configs["text"])
    write_vae_checkpoint(folder / task.vae_checkpoint, task.vae_version, "official",
                         config=configs["vae"][task.vae_version])
    if "wav2vec" in task.extra:  # S2V's audio encoder folder
        from wan_core.testing import write_audio_encoder_checkpoint

        write_audio_encoder_checkpoint(folder / task.extra["wav2vec"], "transformers")
    if not (folder / TOKENIZER_DIR).is_dir():
        raise RuntimeError(f"the text encoder factory wrote no {TOKENIZER_DIR} folder in {folder}")
    return folder


def ensure_tiny_checkpoints(cache_dir: Optional[str] = None) -> dict[str, Path]:
    """{task: official-layout folder} of tiny random checkpoints, written on first use.

    Each set is written to a temporary folder and renamed into place when complete, so an
    interrupted first run never leaves a half-written cache behind."""
    configs = _tiny_configs()
    root = cache_root(cache_dir) / "demo" / _configs_key(configs)
    folders = {task: root / official_folder_name(task) for task in DEMO_TASKS}
    missing = [task for task, folder in folders.items() if not folder.is_dir()]
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        log.info("writing tiny random checkpoints (official layout) to %s", root)
    for task in missing:
        scratch = Path(tempfile.mkdtemp(prefix=".writing-", dir=root))
        try:
            write_tiny_task_folder(scratch / "model", TASKS[task], configs)
            (scratch / "model").rename(folders[task])
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return folders


def write_demo_image(path: Path, width: int = 320, height: int = 192) -> Path:
    """A smooth synthetic picture (colour gradients and a disc) to animate."""
    from PIL import Image

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    red = xs / (width - 1)
    green = ys / (height - 1)
    disc = ((xs - 0.62 * width) ** 2 + (ys - 0.45 * height) ** 2) < (0.22 * height) ** 2
    blue = np.where(disc, 0.95, 0.35)
    pixels = (np.stack([red, green, blue], axis=-1) * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_demo_speech(path: Path, seconds: float = DEMO_SPEECH_SECONDS, rate: int = 22050) -> Path:
    """A synthetic voice-like tone (a 200 Hz buzz whose loudness moves like syllables) to speak."""
    import soundfile

    t = np.arange(int(round(seconds * rate))) / rate
    tone = 0.3 * np.sin(2 * np.pi * 200 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, tone.astype(np.float32), rate)
    return path


def needs_image(task: str) -> bool:
    return TASKS[task].dit.model_type in ("i2v", "ti2v", "s2v")


# --------------------------------------------------------------------------------------------
# Real weights


def detect_official_task(folder: Path) -> Optional[str]:
    """The task of an official folder from its DiT's config.json (None if it is not one)."""
    for config_path in (folder / "high_noise_model" / "config.json", folder / "config.json"):
        if config_path.is_file():
            try:
                model_type = json.loads(config_path.read_text()).get("model_type")
            except (OSError, json.JSONDecodeError):
                return None
            matches = [name for name in DEMO_TASKS if TASKS[name].dit.model_type == model_type]
            return matches[0] if matches else None
    return None


def find_real_checkpoints(ckpt_dir: Path) -> dict[str, Path]:
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"--ckpt_dir {ckpt_dir}: folder not found")
    own = detect_official_task(ckpt_dir)
    if own is not None:
        return {own: ckpt_dir}
    found = {task: ckpt_dir / official_folder_name(task) for task in DEMO_TASKS
             if (ckpt_dir / official_folder_name(task)).is_dir()}
    if not found:
        raise FileNotFoundError(f"--ckpt_dir {ckpt_dir} is neither an official Wan2.2 folder nor holds one "
                                f"({', '.join(official_folder_name(t) for t in DEMO_TASKS)})")
    return found


# --------------------------------------------------------------------------------------------
# The demo


def generate_argv(task: str, ckpt_dir: Path, save_file: Path, image: Optional[Path],
                  tiny: Optional[TinyRun], device: Optional[str], audio: Optional[Path] = None) -> list[str]:
    """The `python -m wan_core generate` arguments the demo runs for `task`."""
    argv = ["--task", task, "--ckpt_dir", str(ckpt_dir), "--prompt", PROMPTS[task], "--base_seed", str(DEMO_SEED),
            "--save_file", str(save_file)]
    if image is not None:
        argv += ["--image", str(image)]
    if audio is not None:
        argv += ["--audio", str(audio)]
    if tiny is not None:
        length = "--infer_frames" if TASKS[task].dit.model_type == "s2v" else "--frame_num"
        argv += ["--size", tiny.size, length, str(tiny.frame_num), "--sample_steps", str(tiny.steps),
                 "--allow_any_size"]
    else:  # real 14B experts: bf16 weights, as the reference's single-GPU recipe
        argv.append("--convert_model_dtype")
    if device:
        argv += ["--device", device]
    return argv


def _command(argv: list[str]) -> str:
    return "python -m wan_core generate " + " ".join(shlex.quote(a) for a in argv)


def run_demo(args: argparse.Namespace) -> list[Path]:
    """Run the demo; returns the videos written."""
    from wan_core.cli import add_generate_arguments, run_generate
    from wan_core.video import read_video

    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    real = args.ckpt_dir is not None
    folders = find_real_checkpoints(Path(args.ckpt_dir)) if real else ensure_tiny_checkpoints(args.cache_dir)
    image = write_demo_image(output_dir / "demo_input.png")
    speech = write_demo_speech(output_dir / "demo_speech.wav")

    generate_parser = argparse.ArgumentParser(prog="python -m wan_core generate")
    add_generate_arguments(generate_parser)
    written, commands = [], []
    for task, folder in folders.items():
        speaks = TASKS[task].dit.model_type == "s2v"
        argv = generate_argv(task, folder, output_dir / f"demo_{task}.mp4", image if needs_image(task) else None,
                             None if real else TINY_RUNS[task], args.device, speech if speaks else None)
        log.info("running: %s", _command(argv))
        written.append(run_generate(generate_parser.parse_args(argv)))
        commands.append((task, argv))

    elapsed = time.perf_counter() - started
    print(f"\nWrote {len(written)} videos in {elapsed:.0f} s:")
    for path in written:
        frames, fps = read_video(path)
        print(f"  {path}  ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, {fps:g} fps)")
    print(f"  (input image for image- and speech-to-video: {image}; speech: {speech})")
    if real:
        return written
    print("\nThese used tiny random weights, which cannot make a real picture (expect coloured noise); they\n"
          "check the whole path from the official folder layout to the mp4. The same commands run the\n"
          "real models: download the official folders and point --ckpt_dir at them, e.g.\n")
    for task, _ in commands:
        example = ["--task", task, "--ckpt_dir", f"/path/{official_folder_name(task)}", "--convert_model_dtype",
                   "--prompt", PROMPTS[task]]
        if needs_image(task):
            example += ["--image", "your_image.jpg"]
        if TASKS[task].dit.model_type == "s2v":
            example += ["--audio", "your_speech.wav"]
        print(f"  {_command(example)} --save_file {task}.mp4\n")
    print("or run this demo on them: python -m wan_core demo --ckpt_dir /path/holding/the/Wan2.2-folders")
    return written
