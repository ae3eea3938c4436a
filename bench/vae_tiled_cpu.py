"""Peak memory and time of tiled against untiled Wan VAE decoding on the CPU.

The full-size Wan2.1 VAE with random weights decodes a 480x832 latent (60x104) once untiled
and once with `Tiling(tile_size, overlap)`, each in a fresh subprocess, which reports its
peak resident set size (VmHWM) after building the model and after decoding, and the decode
time. The parent compares the two videos (max and mean |tiled - untiled|) and prints a
markdown section; `--append` adds it to bench/RESULTS.md.

    python bench/vae_tiled_cpu.py [--latent-frames 21] [--tile 256 256] [--overlap 64 64] [--append]

On 2 cores a latent frame (4 video frames) takes minutes; 21 latent frames (81 video frames)
take about an hour per mode, so fewer frames are the practical choice. Memory per chunk does
not grow with the frame count; only the output video does (3 x 480 x 832 x 4 bytes a frame).
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wan_core.testing.vae import vae_state_dict  # noqa: E402
from wan_core.vae import WAN21_VAE, Tiling, WanVAE  # noqa: E402

MiB = 2 ** 20


def _status_bytes(field: str) -> int:
    """A field of /proc/self/status in bytes (VmHWM: this process image's peak RSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    with torch.device("meta"):
        vae = WanVAE(WAN21_VAE)
    vae.load_state_dict(vae_state_dict(WAN21_VAE, seed=0), strict=True, assign=True)
    vae.eval()
    latent = torch.randn(1, WAN21_VAE.z_dim, args.latent_frames, args.height // 8, args.width // 8,
                         generator=torch.Generator().manual_seed(0))
    tile = None if args.worker == "untiled" else Tiling(tuple(args.tile), tuple(args.overlap))
    rss_before = _status_bytes("VmRSS")
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        print(f"  {args.worker}: {done}/{total} after {time.perf_counter() - start:.0f} s, "
              f"peak {_status_bytes('VmHWM') / MiB:.0f} MiB", file=sys.stderr, flush=True)

    video = vae.decode(latent, tile=tile, callback=progress)
    seconds = time.perf_counter() - start
    torch.save(video, args.out)
    print(json.dumps({"mode": args.worker, "seconds": seconds, "rss_before": rss_before,
                      "peak": _status_bytes("VmHWM"), "frames": video.shape[2]}))


def run_mode(mode: str, args: argparse.Namespace, out: Path) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--out", str(out),
               "--latent-frames", str(args.latent_frames), "--height", str(args.height), "--width", str(args.width),
               "--tile", *map(str, args.tile), "--overlap", *map(str, args.overlap), "--threads", str(args.threads)]
    load = os.getloadavg()[0]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load_before": load, "load_after": os.getloadavg()[0]}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def report(args: argparse.Namespace, results: dict[str, dict], max_diff: float, mean_diff: float) -> str:
    tiled, untiled = results["tiled"], results["untiled"]
    frames = untiled["frames"]
    command = "python bench/vae_tiled_cpu.py " + " ".join(sys.argv[1:])
    rows = "\n".join(
        f"| {mode} | {r['seconds']:.0f} s | {r['peak'] / MiB:,.0f} MiB | {(r['peak'] - r['rss_before']) / MiB:,.0f} MiB "
        f"| {r['load_before']:.1f} / {r['load_after']:.1f} |"
        for mode, r in (("untiled", untiled), (f"tiled {tuple(args.tile)} overlap {tuple(args.overlap)}", tiled)))
    return f"""
## VAE tiled vs untiled (CPU)

- Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} with {args.threads} threads.
  Date: {datetime.date.today().isoformat()}.
- Command: `{command}`
- Wan2.1 VAE at full size (127 M parameters, float32, random weights seed 0), decode of a
  latent of {args.latent_frames} frames at {args.height // 8}x{args.width // 8} -> {frames} video frames at
  {args.height}x{args.width}. Each mode in a fresh subprocess; peak = VmHWM (peak resident set) of that
  process; "decode peak" = that peak minus the resident set just before decoding (imports,
  weights, latent).
  Load average (1 min) before / after each run: this 2-core machine is shared, timings are noisy.

| mode | decode time | peak RSS | decode peak | load |
|---|---|---|---|---|
{rows}

- Tiled / untiled: {tiled['seconds'] / untiled['seconds']:.2f}x the time, {(tiled['peak'] - tiled['rss_before']) / max(1, untiled['peak'] - untiled['rss_before']):.2f}x the decode memory.
- max |tiled - untiled| = {max_diff:.4f}, mean = {mean_diff:.4f} (video in [-1, 1]). With random weights
  every pixel depends on the whole frame (the mid-block attention), so tiles cannot reproduce the
  untiled decode exactly; this measures the blend, not a trained VAE's seams.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent-frames", type=int, default=2)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--tile", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    parser.add_argument("--overlap", type=int, nargs=2, default=[64, 64], metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--append", action="store_true", help="append the section to bench/RESULTS.md")
    parser.add_argument("--worker", choices=["untiled", "tiled"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = {mode: run_mode(mode, args, Path(tmp) / f"{mode}.pt") for mode in ("untiled", "tiled")}
        difference = (torch.load(Path(tmp) / "tiled.pt") - torch.load(Path(tmp) / "untiled.pt")).abs()
    text = report(args, results, difference.max().item(), difference.mean().item())
    print(text)
    if args.append:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
