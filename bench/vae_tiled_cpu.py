"""Peak memory and time of tiled against untiled Wan VAE decoding, on the CPU by default.

The full-size Wan2.1 VAE with random weights decodes a 480x832 latent (60x104) once untiled
and once with `Tiling(tile_size, overlap)`, each in a fresh subprocess, which reports its
peak memory above what it held before decoding, and the decode time. The parent compares the
videos (max and mean |tiled - untiled|) and prints a markdown section; `--append` adds it to
bench/RESULTS.md. `--peer` also runs diffusers' AutoencoderKLWan on the same weights, untiled
and with its own tiling at the same tile size and overlap (the peer for GPU runs).

    python bench/vae_tiled_cpu.py [--latent-frames 21] [--tile 256 256] [--overlap 64 64] [--append]
    python bench/vae_tiled_cpu.py --device cuda --latent-frames 21 --peer

On 2 cores a latent frame (4 video frames) takes over a minute; 21 latent frames (81 video
frames) take about half an hour per mode, so the default is 2. Memory per chunk does not grow
with the frame count; only the output video does (3 x 480 x 832 x 4 bytes a frame).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wan_core.loading import to_layout  # noqa: E402
from wan_core.testing.vae import diffusers_vae_config, vae_state_dict  # noqa: E402
from wan_core.vae import WAN21_VAE, Tiling, WanVAE  # noqa: E402

MiB = 2 ** 20
OURS, PEER = ("untiled", "tiled"), ("diffusers", "diffusers_tiled")


def _status_bytes(field: str) -> int:
    """A field of /proc/self/status in bytes (VmHWM: this process image's peak RSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class Memory:
    """This process's memory on `device`: resident set (VmRSS / VmHWM) on the CPU, the caching
    allocator's allocated bytes on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()  # the CPU peak (VmHWM) cannot be reset

    def in_use(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else _status_bytes("VmRSS")

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else _status_bytes("VmHWM")


Decode = Callable[[torch.Tensor, Callable[[int, int], None]], torch.Tensor]


def build_decoder(mode: str, args: argparse.Namespace, device: torch.device) -> Decode:
    """decode(latent, progress) -> video for `mode`, the weights already on `device`."""
    weights = vae_state_dict(WAN21_VAE, seed=0, device=device)
    if mode in OURS:
        with torch.device("meta"):
            vae = WanVAE(WAN21_VAE)
        vae.load_state_dict(weights, strict=True, assign=True)
        tile = Tiling(tuple(args.tile), tuple(args.overlap)) if mode == "tiled" else None
        return lambda latent, progress: vae.eval().decode(latent, tile=tile, callback=progress)

    from diffusers import AutoencoderKLWan

    config = {k: v for k, v in diffusers_vae_config(WAN21_VAE).items() if not k.startswith("_")}
    with torch.device(device):
        peer = AutoencoderKLWan.from_config(config)
    peer.load_state_dict(to_layout(weights, "vae", ["diffusers_2.1"]), strict=True)
    peer.eval()
    if mode == "diffusers_tiled":
        (tile_h, tile_w), (overlap_h, overlap_w) = args.tile, args.overlap
        peer.enable_tiling(tile_h, tile_w, tile_h - overlap_h, tile_w - overlap_w)
    mean = torch.tensor(WAN21_VAE.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN21_VAE.latents_std, device=device).view(1, -1, 1, 1, 1)

    def decode(latent: torch.Tensor, progress: Callable[[int, int], None]) -> torch.Tensor:
        with torch.no_grad():
            return peer.decode(latent * std + mean).sample

    return decode


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    memory = Memory(device)
    decode = build_decoder(args.worker, args, device)
    latent = torch.randn(1, WAN21_VAE.z_dim, args.latent_frames, args.height // 8, args.width // 8,
                         generator=torch.Generator().manual_seed(0)).to(device)
    if memory.cuda:  # kernels chosen and loaded before the timed run
        decode(latent[:, :, :2], lambda done, total: None)
    memory.sync()
    memory.reset_peak()
    in_use_before = memory.in_use()
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        print(f"  {args.worker}: {done}/{total} after {time.perf_counter() - start:.0f} s, "
              f"peak {memory.peak() / MiB:.0f} MiB", file=sys.stderr, flush=True)

    video = decode(latent, progress)
    memory.sync()
    seconds = time.perf_counter() - start
    torch.save(video.cpu(), args.out)
    print(json.dumps({"mode": args.worker, "seconds": seconds, "in_use_before": in_use_before,
                      "peak": memory.peak(), "frames": video.shape[2]}))


def run_mode(mode: str, args: argparse.Namespace, out: Path) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--out", str(out),
               "--latent-frames", str(args.latent_frames), "--height", str(args.height), "--width", str(args.width),
               "--tile", *map(str, args.tile), "--overlap", *map(str, args.overlap), "--threads", str(args.threads),
               "--device", args.device]
    load = os.getloadavg()[0]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load_before": load, "load_after": os.getloadavg()[0]}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def report(args: argparse.Namespace, results: dict[str, dict], differences: dict[str, tuple[float, float]]) -> str:
    tiled, untiled = results["tiled"], results["untiled"]
    command = "python bench/vae_tiled_cpu.py " + " ".join(sys.argv[1:])
    if args.device == "cpu":
        title, machine = "CPU", (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} with "
                                 f"{args.threads} threads")
        memory = ("peak = VmHWM (peak resident set) of that process; \"decode peak\" = that peak minus the "
                  "resident set just before decoding (imports, weights, latent). Load average (1 min) before / "
                  "after each run: this 2-core machine is shared, timings are noisy.")
    else:
        title, machine = "GPU", f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
        memory = ("peak = torch.cuda.max_memory_allocated of that process; \"decode peak\" = that peak minus "
                  "what was allocated just before decoding (weights, latent); one warm-up decode of 2 latent "
                  "frames first, not timed.")

    def decode_peak(r: dict) -> float:
        return (r["peak"] - r["in_use_before"]) / MiB

    tiling = f"{tuple(args.tile)} overlap {tuple(args.overlap)}"
    labels = {"untiled": "ours, untiled", "tiled": f"ours, tiled {tiling}", "diffusers": "diffusers, untiled",
              "diffusers_tiled": f"diffusers, tiled {tiling}"}
    rows = "\n".join(f"| {labels[mode]} | {r['seconds']:.1f} s | {r['peak'] / MiB:,.0f} MiB | {decode_peak(r):,.0f} MiB "
                     f"| {r['load_before']:.1f} / {r['load_after']:.1f} |" for mode, r in results.items())
    lines = [f"- Tiled / untiled: {tiled['seconds'] / untiled['seconds']:.2f}x the time, "
             f"{decode_peak(tiled) / max(1.0, decode_peak(untiled)):.2f}x the decode memory."]
    if "diffusers" in results:
        lines.append(f"- Ours / diffusers: untiled {untiled['seconds'] / results['diffusers']['seconds']:.2f}x the "
                     f"time and {decode_peak(untiled) / decode_peak(results['diffusers']):.2f}x the decode memory; "
                     f"tiled {tiled['seconds'] / results['diffusers_tiled']['seconds']:.2f}x the time and "
                     f"{decode_peak(tiled) / decode_peak(results['diffusers_tiled']):.2f}x the decode memory.")
    for (a, b), (max_diff, mean_diff) in differences.items():
        lines.append(f"- max |{labels[a]} - {labels[b]}| = {max_diff:.2e}, mean = {mean_diff:.2e}.")
    lines.append("- Video in [-1, 1]. With random weights every pixel depends on the whole frame (the mid-block "
                 "attention), so tiles cannot reproduce the untiled decode exactly; the tiled differences measure "
                 "the blend, not a trained VAE's seams.")
    body = "\n".join(lines)
    return f"""
## VAE tiled vs untiled ({title})

- Machine: {machine}. Date: {datetime.date.today().isoformat()}.
- Command: `{command}`
- Wan2.1 VAE at full size (127 M parameters, float32, random weights seed 0), decode of a latent of
  {args.latent_frames} frames at {args.height // 8}x{args.width // 8} -> {untiled['frames']} video frames at {args.height}x{args.width}. Each mode in a fresh
  subprocess; {memory}

| mode | decode time | peak | decode peak | load before / after |
|---|---|---|---|---|
{rows}

{body}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent-frames", type=int, default=2)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--tile", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    parser.add_argument("--overlap", type=int, nargs=2, default=[64, 64], metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--device", default="cpu", help="cpu (the default) or cuda")
    parser.add_argument("--peer", action="store_true", help="also run diffusers' AutoencoderKLWan")
    parser.add_argument("--append", action="store_true", help="append the section to bench/RESULTS.md")
    parser.add_argument("--worker", choices=OURS + PEER, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    modes = OURS + (PEER if args.peer else ())
    pairs = [("tiled", "untiled")] + ([("untiled", "diffusers"), ("tiled", "diffusers_tiled")] if args.peer else [])
    with tempfile.TemporaryDirectory() as tmp:
        results = {mode: run_mode(mode, args, Path(tmp) / f"{mode}.pt") for mode in modes}
        differences = {}
        for a, b in pairs:
            difference = (torch.load(Path(tmp) / f"{a}.pt") - torch.load(Path(tmp) / f"{b}.pt")).abs()
            differences[(a, b)] = (difference.max().item(), difference.mean().item())
    text = report(args, results, differences)
    print(text)
    if args.append:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
