"""Headless generation: `python -m wan_core generate ...` (also the `wan22` command).

The flags are the reference's generate.py flags for the T2V-A14B, I2V-A14B and TI2V-5B tasks,
with the same defaults (each task's steps, shift, guide scale and frame count; a random seed
when --base_seed is negative; --offload_model on for a single GPU), plus a few of our own:
--negative_prompt, --boundary, --device, --quant, --blocks_to_swap, --prefetch_blocks and
--allow_any_size. `--ckpt_dir` is the official release folder (e.g. Wan2.2-T2V-A14B/ with
high_noise_model/, low_noise_model/, the umt5 .pth, google/umt5-xxl/ and the VAE .pth).

Ctrl-C during sampling stops after the current step without writing a video; a second Ctrl-C
stops at once.
"""
from __future__ import annotations

import argparse
import logging
import random
import re
import signal
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

import torch

from wan_core.configs import TASKS
from wan_core.offload import check_blocks_to_swap
from wan_core.pipeline import (GenerationInterrupted, default_size, format_size, load_task_models, parse_size,
                               resolve_task, validate_request)
from wan_core.sampling.schedule import SOLVERS

log = logging.getLogger("wan_core")

GENERATE_TASKS = tuple(name for name, task in TASKS.items() if task.dit.model_type in ("t2v", "i2v", "ti2v"))
QUANT_CHOICES = ("fp8_e4m3fn", "fp8_e5m2")


def _str2bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _guide_scale(value: str):
    """"5.0" -> 5.0; "3.0,4.0" -> (low_noise, high_noise) like the reference config."""
    try:
        numbers = [float(part) for part in value.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) == 1:
        return numbers[0]
    if len(numbers) == 2:
        return tuple(numbers)
    raise argparse.ArgumentTypeError(f"expected a number or LOW,HIGH (e.g. 3.0,4.0), got {value!r}")


def _blocks_to_swap(value: str):
    """"auto" or a whole number >= 0 (the upper bound is the model's layer count)."""
    if value.strip().lower() == "auto":
        return "auto"
    if value.strip().isdigit():
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a number of blocks or auto, got {value!r}")


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="t2v-A14B", choices=GENERATE_TASKS, help="The task to run.")
    parser.add_argument("--size", default=None,
                        help="WIDTH*HEIGHT of the video (default: the task's largest landscape size, 1280*720 or "
                             "1280*704). For i2v-A14B and ti2v-5B with --image only the area counts: the video "
                             "keeps the image's aspect ratio.")
    parser.add_argument("--frame_num", type=int, default=None,
                        help="Frames to generate, 4n+1 (default: 81, or 121 for ti2v-5B).")
    parser.add_argument("--ckpt_dir", required=True,
                        help="The official checkpoint folder of the task, e.g. ./Wan2.2-T2V-A14B.")
    parser.add_argument("--offload_model", type=_str2bool, default=None,
                        help="Keep the DiTs (and the text encoder) on the CPU and move each to the GPU only while it "
                             "runs (default: true on a GPU, as the reference does for one GPU).")
    parser.add_argument("--convert_model_dtype", action="store_true",
                        help="Hold the DiT weights in bfloat16 (the reference's param_dtype) instead of float32. "
                             "Use it on a GPU: without it the DiT also computes in float32 (the reference "
                             "autocasts its float32 weights to bf16), which needs twice the memory and runs "
                             "several times slower.")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each transformer block: the first step takes about a minute "
                             "longer, later ones run ~10%% faster (bench/RESULTS.md).")
    parser.add_argument("--t5_cpu", action="store_true", help="Run the umt5 text encoder on the CPU.")
    parser.add_argument("--prompt", required=True, help="What the video shows.")
    parser.add_argument("--negative_prompt", default="",
                        help="What to avoid (default: the task's own negative prompt, as the reference).")
    parser.add_argument("--image", default=None,
                        help="The image to animate (required for i2v-A14B, optional for ti2v-5B).")
    parser.add_argument("--sample_solver", default="unipc", choices=SOLVERS, help="The sampling solver.")
    parser.add_argument("--sample_steps", type=int, default=None, help="Sampling steps (default: the task's).")
    parser.add_argument("--sample_shift", type=float, default=None,
                        help="Flow-matching schedule shift (default: the task's).")
    parser.add_argument("--sample_guide_scale", type=_guide_scale, default=None,
                        help="Classifier-free guidance scale; one number, or LOW,HIGH for the low- and high-noise "
                             "experts (default: the task's).")
    parser.add_argument("--boundary", type=float, default=None,
                        help="MoE hand-off as a fraction of 1000 timesteps (default: 0.875 t2v, 0.9 i2v).")
    parser.add_argument("--base_seed", type=int, default=-1, help="Noise seed; negative picks a random one.")
    parser.add_argument("--save_file", default=None, help="The mp4 to write (default: a name from task, size, "
                                                          "prompt and time).")
    parser.add_argument("--device", default=None, help="Where sampling runs (default: cuda if available, else cpu).")
    parser.add_argument("--quant", default=None, choices=QUANT_CHOICES,
                        help="Keep the DiT block weights in fp8 (per-tensor scale, bf16/fp32 compute).")
    parser.add_argument("--blocks_to_swap", default=None, type=_blocks_to_swap,
                        help="N or auto: keep N transformer blocks of each expert in CPU memory and stream them to "
                             "the GPU during each step (auto: the fewest that fit the GPU's free memory for this "
                             "size and frame count). Fits a 14B expert at 720p into 12 GB for a few percent of "
                             "step time (bench/RESULTS.md).")
    parser.add_argument("--prefetch_blocks", type=int, default=1,
                        help="Swapped blocks copied ahead while one computes (default 1).")
    parser.add_argument("--allow_any_size", action="store_true",
                        help="Accept sizes the models were not trained at (multiples of VAE stride x patch).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m wan_core",
                                     description="Wan2.2 video generation without ComfyUI.")
    commands = parser.add_subparsers(dest="command", metavar="{generate,demo}")
    add_generate_arguments(commands.add_parser(
        "generate", help="generate a video from official checkpoints",
        description="Generate a video with the reference's flags from an official checkpoint folder."))
    from wan_core.demo import add_demo_arguments

    add_demo_arguments(commands.add_parser(
        "demo", help="run every task end to end (tiny random weights unless --ckpt_dir)",
        description="Make tiny random checkpoints in the official layout once, then run T2V-A14B, I2V-A14B and "
                    "TI2V-5B generation through the same code as `generate` and write the videos."))
    return parser


def default_save_file(task: str, size: tuple[int, int], prompt: str) -> str:
    words = re.sub(r"[^\w.-]+", "_", prompt).strip("_")[:50]
    return f"{task}_{size[0]}x{size[1]}_{words}_{datetime.now().strftime('%Y%m%d_%H%M%S')}.mp4"


class StopOnCtrlC:
    """While active, the first Ctrl-C only asks to stop (checked after each sampling step); a
    second one interrupts at once. Does nothing outside the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (press Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopOnCtrlC":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def run_generate(args: argparse.Namespace) -> Path:
    """Check the request, load the task's models, generate with a progress bar, write the mp4.
    Returns the path written."""
    from tqdm import tqdm

    from wan_core.video import write_video

    task = resolve_task(args.task)
    size = parse_size(args.size) if args.size else default_size(task)
    frame_num = task.frame_num if args.frame_num is None else args.frame_num
    steps = task.sample_steps if args.sample_steps is None else args.sample_steps
    validate_request(task, size=size, frame_num=frame_num, image=args.image, steps=steps, shift=args.sample_shift,
                     guide_scale=args.sample_guide_scale, boundary=args.boundary, solver=args.sample_solver,
                     allow_any_size=args.allow_any_size)
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"--image {args.image}: file not found")
    if args.blocks_to_swap is not None:
        check_blocks_to_swap(args.blocks_to_swap, task.dit.num_layers)
    if args.prefetch_blocks < 0:
        raise ValueError(f"--prefetch_blocks must be >= 0, got {args.prefetch_blocks}")
    seed = args.base_seed if args.base_seed >= 0 else random.randint(0, sys.maxsize)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    offload = args.offload_model if args.offload_model is not None else device.type != "cpu"
    dtype = torch.bfloat16 if args.convert_model_dtype else torch.float32

    log.info("loading %s from %s (DiT %s, device %s, offload_model=%s, t5_cpu=%s)", task.name, args.ckpt_dir,
             str(dtype).removeprefix("torch."), device, offload, args.t5_cpu)
    models = load_task_models(task, args.ckpt_dir, dtype=dtype, device=device, t5_cpu=args.t5_cpu,
                              offload_model=offload, quant=args.quant)
    if args.compile:
        models.compile_blocks()
    if args.blocks_to_swap is not None:
        swapped = models.enable_block_swap(args.blocks_to_swap, size=size, frame_num=frame_num,
                                           prefetch=args.prefetch_blocks)
        log.info("block swap: %s of %d blocks per expert in CPU memory", "/".join(map(str, swapped)),
                 task.dit.num_layers)
    log.info("generating %d frames at %s, %d steps, seed %d", frame_num, format_size(size), steps, seed)
    with tqdm(total=steps, desc=task.name, unit="step", file=sys.stderr) as bar, StopOnCtrlC() as stop:
        video = models.generate(
            prompt=args.prompt, negative_prompt=args.negative_prompt, size=size, frame_num=frame_num,
            image=args.image, steps=steps, shift=args.sample_shift, guide_scale=args.sample_guide_scale,
            boundary=args.boundary, solver=args.sample_solver, seed=seed, allow_any_size=args.allow_any_size,
            callback=lambda step, total, latent: bar.update(1), interrupt=stop)
    save_file = Path(args.save_file or default_save_file(task.name, size, args.prompt))
    write_video(video, save_file, fps=task.sample_fps)
    log.info("saved %d frames of %dx%d at %d fps to %s", video.shape[1], video.shape[3], video.shape[2],
             task.sample_fps, save_file)
    return save_file


def _normalise_argv(argv: Sequence[str]) -> list[str]:
    """`python -m wan_core --task ...` (flags without a command) means `generate`."""
    argv = list(argv)
    if argv and argv[0].startswith("--") and argv[0] != "--help":
        return ["generate", *argv]
    return argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    parser = build_parser()
    args = parser.parse_args(_normalise_argv(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "generate":
            run_generate(args)
        else:
            from wan_core.demo import run_demo

            run_demo(args)
    except GenerationInterrupted as stopped:
        print(f"{stopped}; no video written", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted; no video written", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
