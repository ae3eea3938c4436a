"""Headless generation: `python -m wan_core generate ...` (also the `wan22` command).

The flags are the reference's generate.py flags for the T2V-A14B, I2V-A14B, TI2V-5B and S2V-14B tasks,
with the same defaults (each task's steps, shift, guide scale and frame count; a random seed
when --base_seed is negative; --offload_model on for a single GPU), plus a few of our own:
--negative_prompt, --boundary, --device, --quant, --blocks_to_swap, --prefetch_blocks,
--allow_any_size and --save_latent. `--ckpt_dir` is the official release folder (e.g.
Wan2.2-T2V-A14B/ with high_noise_model/, low_noise_model/, the umt5 .pth, google/umt5-xxl/ and
the VAE .pth).

Ctrl-C during sampling stops after the current step without writing a video; a second Ctrl-C
stops at once.

Several GPUs (the reference's recipe): `torchrun --nproc_per_node N -m wan_core generate
--ulysses_size N [--dit_fsdp --t5_fsdp] ...`, or N = 2U with `--ulysses_size U --cfg_parallel`;
rank 0 alone writes the video and the latent (wan_core.parallel).

Everything that needs no model (the request, the image, the device, the output path) is
checked before any model loads. Ctrl-C during sampling or decoding stops after the current step
(or decoded latent frame) without writing a video; a second Ctrl-C stops at once, as does one
while the video is written (an existing file at --save_file is then left as it was).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import re
import signal
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import save_file as save_file_safetensors

from wan_core.configs import TASKS
from wan_core.ops.attention import AUTO, auto_reason, available_backends, resolve_backend
from wan_core.offload import check_blocks_to_swap
from wan_core.parallel.groups import ParallelConfig, init_distributed
from wan_core.parallel.launch import any_rank, distribute_task_models, same_on_all_ranks
from wan_core.pipeline import (GenerationInterrupted, Request, check_device, default_size, format_size,
                               load_task_models, parse_size, resolve_task)
from wan_core.sampling import GuideScale
from wan_core.sampling.schedule import SOLVERS
from wan_core.video import VIDEO_FORMATS, OutputLock, check_output_path, write_video

log = logging.getLogger("wan_core")
DEBUG_ENV = "WAN22_DEBUG"

GENERATE_TASKS = tuple(TASKS)
QUANT_CHOICES = ("fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")


def _str2bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _guide_scale(value: str):
    """"5.0" -> 5.0; "3.0,4.0" -> GuideScale(low_noise=3.0, high_noise=4.0), the reference config's
    order. Non-finite numbers are refused by the request check."""
    try:
        numbers = [float(part) for part in value.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) == 1:
        return numbers[0]
    if len(numbers) == 2:
        return GuideScale(*numbers)
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
                             "1280*704). For i2v-A14B and ti2v-5B with --image, and for s2v-14B, only the area "
                             "counts: the video keeps the image's aspect ratio.")
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
    parser.add_argument("--save_file", default=None,
                        help=f"The video to write, {'/'.join(VIDEO_FORMATS)} (default: an mp4 named from task, size, "
                             f"prompt and time). Checked before any model loads; written to a temporary file and "
                             f"renamed into place when complete, so an existing file is never left half-written.")
    parser.add_argument("--device", default=None, help="Where sampling runs (default: cuda if available, else cpu).")
    parser.add_argument("--quant", default=None, choices=QUANT_CHOICES,
                        help="Keep the DiT block weights in fp8 (per-tensor scale, bf16/fp32 compute); "
                             "fp8_e4m3fn_fast also multiplies in fp8 on GPUs that can (compute capability >= 8.9).")
    parser.add_argument("--attention", default=AUTO, choices=(AUTO, *available_backends()),
                        help="Attention back-end: auto (the fastest one here that passes an accuracy probe, else "
                             "sdpa) or one by name; sdpa is exact.")
    parser.add_argument("--blocks_to_swap", default=None, type=_blocks_to_swap,
                        help="N or auto: keep N transformer blocks of each expert in CPU memory and stream them to "
                             "the GPU during each step (auto: the fewest that fit the GPU's free memory for this "
                             "size and frame count). Fits a 14B expert at 720p into 12 GB for a few percent of "
                             "step time (bench/RESULTS.md).")
    parser.add_argument("--prefetch_blocks", type=int, default=1,
                        help="Swapped blocks copied ahead while one computes (default 1).")
    parser.add_argument("--allow_any_size", action="store_true",
                        help="Accept sizes the models were not trained at (multiples of VAE stride x patch).")
    parser.add_argument("--save_latent", default=None, metavar="FILE",
                        help="Also write the final latent (before decoding) to FILE: float32 safetensors, key 'latent'.")
    parser.add_argument("--ulysses_size", type=int, default=1,
                        help="Split the video tokens over this many processes (Ulysses sequence parallelism; run "
                             "under torchrun). It must divide the model's 40 heads (24 for ti2v-5B).")
    parser.add_argument("--cfg_parallel", action="store_true",
                        help="Run the conditional and unconditional passes on two halves of the processes (torchrun "
                             "with 2 x ulysses_size processes).")
    parser.add_argument("--dit_fsdp", action="store_true",
                        help="Shard the DiT weights over the processes with FSDP2 (each GPU holds 1/N of an expert).")
    parser.add_argument("--t5_fsdp", action="store_true",
                        help="Shard the umt5 text encoder's weights over the processes with FSDP2.")
    s2v = parser.add_argument_group("s2v-14B (speech to video)")
    s2v.add_argument("--audio", default=None, help="The speech to animate (wav, flac, mp3, ...); required for s2v-14B.")
    s2v.add_argument("--pose_video", default=None, help="A pose video (e.g. DWPose renders) that drives the body.")
    s2v.add_argument("--num_clip", type=int, default=None,
                     help="Generate at most this many clips (default: as many as the audio needs).")
    s2v.add_argument("--start_from_ref", action="store_true",
                     help="Start the video from the reference image (the reference's init_first_frame).")
    s2v.add_argument("--infer_frames", type=int, default=80, help="Frames per clip, a multiple of 4 (default 80).")
    s2v.add_argument("--correct_audio_lead", action="store_true",
                     help="Start the muxed sound 3 frames in, so each frame plays with the audio it was generated "
                          "for (the reference's video leads its sound by 3 frames, 0.19 s).")


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


# The names the CLI shows for a request's fields (wan_core.pipeline.Request's messages).
CLI_NAMES = {"size": "--size", "frame_num": "--frame_num", "image": "--image", "steps": "--sample_steps",
             "shift": "--sample_shift", "guide_scale": "--sample_guide_scale", "boundary": "--boundary",
             "solver": "--sample_solver", "seed": "--base_seed"}
# What the first Ctrl-C waits for, by phase; while the video is written it stops at once (the
# temporary file is dropped, an existing file stays as it was).
STOP_POINTS = {"sampling": "this step", "decoding": "this latent frame is decoded"}


class StopOnCtrlC:
    """While active, the first Ctrl-C only asks to stop (checked after each sampling step and
    each decoded latent frame); a second one interrupts at once, and so does the first while
    the video is being written (`phase = "writing"`). Does nothing outside the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self.phase = "sampling"
        self._previous = None

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum, frame) -> None:
        if self.requested or self.phase not in STOP_POINTS:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nstopping after {STOP_POINTS[self.phase]}; no video will be written (press Ctrl-C again to stop "
              f"now)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopOnCtrlC":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def check_args(args: argparse.Namespace, seed: int) -> tuple[Request, torch.device]:
    """The request (its image decoded) and the device, checked without any model."""
    request = Request.check(args.task, size=args.size, frame_num=args.frame_num, image=args.image,
                            steps=args.sample_steps, shift=args.sample_shift, guide_scale=args.sample_guide_scale,
                            boundary=args.boundary, solver=args.sample_solver, seed=seed,
                            allow_any_size=args.allow_any_size, names=CLI_NAMES)
    return request, check_device(args.device, "--device")


def _seed(args: argparse.Namespace) -> int:
    return args.base_seed if args.base_seed >= 0 else random.randint(0, sys.maxsize)


def run_generate(args: argparse.Namespace) -> Path:
    """Check the request, the parallel plan, the device and the output path (reserved for this
    run), then load the task's models, generate with progress bars, write the video atomically.
    Under torchrun every rank samples its share and rank 0 alone decodes and writes. Returns the
    path written."""
    task = resolve_task(args.task)
    if task.dit.model_type == "s2v":
        return _run_s2v(args, task)
    plan = ParallelConfig(ulysses_size=args.ulysses_size, cfg_parallel=args.cfg_parallel, dit_fsdp=args.dit_fsdp,
                          t5_fsdp=args.t5_fsdp)
    plan.check(int(os.environ.get("WORLD_SIZE", "1")), task.dit.num_heads, task.name)
    if args.t5_fsdp and args.t5_cpu:
        raise ValueError("--t5_fsdp shards the text encoder over the GPUs and --t5_cpu keeps it on the CPU: pick one")
    request, device = check_args(args, _seed(args))
    if args.blocks_to_swap is not None:
        check_blocks_to_swap(args.blocks_to_swap, task.dit.num_layers)
        if plan.world_size > 1:
            raise ValueError("--blocks_to_swap streams one GPU's blocks from CPU memory; on several GPUs shard the "
                             "weights with --dit_fsdp instead")
    if args.prefetch_blocks < 0:
        raise ValueError(f"--prefetch_blocks must be >= 0, got {args.prefetch_blocks}")
    save_file = args.save_file or default_save_file(task.name, request.video_size, args.prompt)
    check_output_path(save_file, "--save_file")
    device, world_size = init_distributed(device)
    request = same_on_all_ranks(request)  # rank 0's (its random seed) on every rank
    if dist.is_initialized() and dist.get_rank() != 0:
        log.setLevel(logging.WARNING)
        _generate_and_write(args, request, device, plan, world_size, None)
        return Path(save_file)
    workload = request.workload()
    log.info("work: %s", workload.describe())
    if workload.oversized > 1:
        log.warning("%s is %.1fx the tokens of %s's largest trained size (%s, %d frames): expect %.0fx the time "
                    "per step or more, and check the memory above", format_size(request.video_size),
                    workload.oversized, task.name, format_size(default_size(task)), task.frame_num,
                    workload.oversized)
    with OutputLock(save_file, unique=args.save_file is None, what="--save_file") as reserved:
        return _generate_and_write(args, request, device, plan, world_size, reserved.path)


def _generate_and_write(args: argparse.Namespace, request: Request, device: torch.device, plan: ParallelConfig,
                        world_size: int, save_file: Optional[Path]) -> Optional[Path]:
    """Load, sample (every rank), then decode and write (the rank given a `save_file`)."""
    from tqdm import tqdm

    task, settings = request.task, request.sampling
    # one GPU: the reference offloads by default; several: each holds its own share
    offload = args.offload_model if args.offload_model is not None else device.type != "cpu" and world_size == 1
    dtype = torch.bfloat16 if args.convert_model_dtype else torch.float32
    log.info("loading %s from %s (DiT %s, device %s, offload_model=%s, t5_cpu=%s)", task.name, args.ckpt_dir,
             str(dtype).removeprefix("torch."), device, offload, args.t5_cpu)
    # several processes: the DiTs (and text encoder) wait on the CPU until each rank takes its share
    models = load_task_models(task, args.ckpt_dir, dtype=dtype, device=device, t5_cpu=args.t5_cpu,
                              offload_model=offload or world_size > 1, quant=args.quant)
    _set_attention(models, args.attention, device, dtype)
    if args.compile:
        models.compile_blocks()
    if args.blocks_to_swap is not None:
        swapped = models.enable_block_swap(args.blocks_to_swap, size=request.video_size, frame_num=request.frame_num,
                                           prefetch=args.prefetch_blocks)
        log.info("block swap: %s of %d blocks per expert in CPU memory", "/".join(map(str, swapped)),
                 task.dit.num_layers)
    if world_size > 1:
        models, _ = distribute_task_models(models, plan, device, offload_model=offload, t5_cpu=args.t5_cpu)
    log.info("generating %d frames at %s, %d steps, seed %d", request.frame_num, format_size(request.video_size),
             settings.steps, settings.seed)
    writes = save_file is not None
    with StopOnCtrlC() as stop, tqdm(total=settings.steps, desc=f"{task.name} sampling", unit="step",
                                     file=sys.stderr, disable=not writes) as bar:
        latent = models.generate(prompt=args.prompt, negative_prompt=args.negative_prompt, request=request,
                                 callback=lambda step, total, latent: bar.update(1), interrupt=any_rank(stop, device),
                                 output="latent")
        if not writes:
            return None
        if args.save_latent:
            save_file_safetensors({"latent": latent.float().cpu().contiguous()}, args.save_latent)
            log.info("saved the latent %s to %s", tuple(latent.shape), args.save_latent)
        stop.phase = "decoding"
        with tqdm(desc=f"{task.name} decoding", unit="frame", file=sys.stderr) as decode_bar:
            def on_decode(done: int, total: int) -> None:
                decode_bar.total = total
                decode_bar.update(done - decode_bar.n)
                if stop.requested:
                    raise GenerationInterrupted(f"generation interrupted while decoding ({done} of {total} latent "
                                                f"frames done)")

            video = models.vae.decode(latent.to(device=models.vae.device, dtype=models.vae.dtype),
                                      callback=on_decode)[0]
        if stop.requested:
            raise GenerationInterrupted("generation interrupted after decoding")
        _write_interruptibly(stop, video, save_file, fps=task.sample_fps)
    log.info("saved %d frames of %dx%d at %d fps to %s", video.shape[1], video.shape[3], video.shape[2],
             task.sample_fps, save_file)
    return save_file


def _write_interruptibly(stop: "StopOnCtrlC", video: torch.Tensor, save_file: Path, **options) -> None:
    """write_video in the "writing" phase: a Ctrl-C stops at once and says the old file stayed."""
    stop.phase = "writing"
    existed = save_file.exists()
    try:
        write_video(video, save_file, **options)
    except KeyboardInterrupt:
        kept = f"; the existing {save_file} is unchanged" if existed else ""
        raise GenerationInterrupted(f"interrupted while writing {save_file}{kept}") from None


def _set_attention(models, attention: str, device: torch.device, dtype: torch.dtype) -> None:
    """Give every DiT the attention back-end asked for and log which one runs."""
    for expert in models.experts if isinstance(models.experts, tuple) else (models.experts,):
        expert.set_attention_backend(attention)
    log.info("attention: %s%s", resolve_backend(attention, device, dtype),
             f" (auto: {auto_reason(device, dtype)})" if attention == AUTO else "")


def _run_s2v(args: argparse.Namespace, task) -> Path:
    """s2v-14B: check, load the models (and the official folder's wav2vec2), generate clip by
    clip, write the mp4 with the speech muxed in. As the reference's ffmpeg -shortest, the mp4
    ends with the shorter of video and audio."""
    from wan_core.audio import read_audio_file
    from wan_core.pipeline import validate_s2v_request

    size = parse_size(args.size) if args.size else default_size(task)
    steps = task.sample_steps if args.sample_steps is None else args.sample_steps
    validate_s2v_request(task, size=size, image=args.image, audio=args.audio, frames_per_clip=args.infer_frames,
                         num_clips=args.num_clip, steps=steps, shift=args.sample_shift,
                         guide_scale=args.sample_guide_scale, solver=args.sample_solver,
                         allow_any_size=args.allow_any_size)
    for flag, path in (("--image", args.image), ("--audio", args.audio), ("--pose_video", args.pose_video)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: file not found")
    if args.ulysses_size > 1 or args.cfg_parallel or args.dit_fsdp or args.t5_fsdp:
        raise ValueError(f"{task.name} runs on one GPU: drop --ulysses_size / --cfg_parallel / --dit_fsdp / --t5_fsdp")
    if args.blocks_to_swap is not None:
        check_blocks_to_swap(args.blocks_to_swap, task.dit.num_layers)
    if args.frame_num is not None or args.boundary is not None:
        raise ValueError(f"{task.name} sets its length with --infer_frames and --num_clip and runs one model: "
                         f"drop --frame_num / --boundary")
    device = check_device(args.device, "--device")
    save_file = args.save_file or default_save_file(task.name, size, args.prompt)
    check_output_path(save_file, "--save_file")
    waveform, sample_rate = read_audio_file(args.audio)
    with OutputLock(save_file, unique=args.save_file is None, what="--save_file") as reserved:
        return _generate_s2v_and_write(args, task, size, steps, waveform, sample_rate, device, reserved.path)


def _generate_s2v_and_write(args: argparse.Namespace, task, size, steps: int, waveform, sample_rate: int,
                            device: torch.device, save_file: Path) -> Path:
    from tqdm import tqdm

    from wan_core.pipeline import audio_for_video

    seed = _seed(args)
    offload = args.offload_model if args.offload_model is not None else device.type != "cpu"
    dtype = torch.bfloat16 if args.convert_model_dtype else torch.float32
    log.info("loading %s from %s (DiT %s, device %s, offload_model=%s)", task.name, args.ckpt_dir,
             str(dtype).removeprefix("torch."), device, offload)
    models = load_task_models(task, args.ckpt_dir, dtype=dtype, device=device, t5_cpu=args.t5_cpu,
                              offload_model=offload, quant=args.quant)
    _set_attention(models, args.attention, device, dtype)
    if args.compile:
        models.compile_blocks()
    if args.blocks_to_swap is not None:  # planned for one clip's frames (the motion frames come on top)
        swapped = models.enable_block_swap(args.blocks_to_swap, size=size, frame_num=args.infer_frames + 1,
                                           prefetch=args.prefetch_blocks)
        log.info("block swap: %d of %d blocks in CPU memory", swapped[0], task.dit.num_layers)

    def on_step(done: int, total: int, latent) -> None:
        bar.total = total
        bar.update(1)

    with tqdm(desc=task.name, unit="step", file=sys.stderr) as bar, StopOnCtrlC() as stop:
        video = models.generate(
            prompt=args.prompt, negative_prompt=args.negative_prompt, size=size, image=args.image, audio=args.audio,
            pose_video=args.pose_video, num_clips=args.num_clip, frames_per_clip=args.infer_frames,
            init_first_frame=args.start_from_ref, steps=steps, shift=args.sample_shift,
            guide_scale=args.sample_guide_scale, solver=args.sample_solver, seed=seed,
            allow_any_size=args.allow_any_size, callback=on_step, interrupt=stop)
        if stop.requested:
            raise GenerationInterrupted("generation interrupted after the last clip")
        fps = task.sample_fps
        audio_frames = math.ceil(waveform.shape[1] / sample_rate * fps)
        video = video[:, :min(video.shape[1], audio_frames)]
        sound = audio_for_video(torch.from_numpy(waveform), sample_rate, video.shape[1], fps,
                                correct_lead=args.correct_audio_lead).numpy()
        _write_interruptibly(stop, video, save_file, fps=fps, audio=(sound, sample_rate))
    log.info("saved %d frames of %dx%d at %d fps with the audio to %s", video.shape[1], video.shape[3],
             video.shape[2], fps, save_file)
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
    except Exception as error:  # anything else: one line, the traceback only on request
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {type(error).__name__}: {error} (set {DEBUG_ENV}=1 to see the traceback)", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
