"""One S2V-14B DiT forward per kind of clip at full size on a GPU, with random bf16 weights.

The first clip (noisy + reference tokens; the motion tokens dropped) and every later clip
(plus 1.5 latent frames of frame-pack motion tokens) at 1024x704 and 80 frames per clip:
latent 20x88x128, 56320 noisy + 2816 reference + 4224 motion tokens, 512 text tokens, the
25 x 1024 audio features of 80 frames. Prints each forward's time, peak memory above the
weights, and the fraction of the FLOP floor (matmul + attention FLOPs over the bf16 matmul rate
measured in this run).

There is no diffusers S2V: the peer is the reference's own WanModel_S2V (`--official` points at
a checkout of the official Wan2.2 code; it is never part of this project) on the very same
weight tensors, run as its pipeline runs it (under a bf16 autocast, SDPA for flash-attn), for
its time and the bf16 difference of the outputs.

    python bench/s2v_forward.py [--official DIR] [--frames 80] [--height 704] [--width 1024]
        [--repeats 1] [--json FILE]      # --tiny --device cpu: a smoke test of the script
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dit_vs_diffusers import forward_flops, matmul_rate  # noqa: E402

from wan_core.configs import TASKS  # noqa: E402
from wan_core.dit import WanDiT  # noqa: E402
from wan_core.dit.s2v import WAV2VEC_STATES, injector_count, motion_latent_count  # noqa: E402


def fill_random(model: torch.nn.Module, seed: int = 0) -> None:
    """Seeded random weights in place: matrices N(0, 1/fan_in), norm gains and the audio layer
    mix around 1 (it is divided by its sum), everything else N(0, 0.1^2)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32)
            if name == "casual_audio_encoder.weights" or (".norm" in name and name.endswith("weight")):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("weight") and p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * noise)


def s2v_flops(config, noisy: int, extra: int, frames: int, text_tokens: int) -> float:
    """The blocks over noisy + appended tokens, and the audio injectors' q and o projections on
    the noisy tokens (their k, v and attention over 5 audio tokens per frame are negligible)."""
    injectors = injector_count(config.audio_inject_layers, config.num_layers)
    return forward_flops(config, noisy + extra, text_tokens) + injectors * 2 * noisy * config.dim ** 2 * 2


def run_timed(fn, repeats: int, device: torch.device) -> tuple[float, float, torch.Tensor]:
    """(median seconds, peak bytes above what was allocated before, last output)."""
    import statistics

    times = []
    torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0
    return statistics.median(times), peak, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, default=None, help="a checkout of the official Wan2.2 code")
    parser.add_argument("--frames", type=int, default=80, help="frames per clip")
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny test config (smoke test on a CPU)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = TASKS["s2v-14B"].dit
    if args.tiny:
        from wan_core.testing import tiny_dit_config

        config = tiny_dit_config("s2v")
    started = time.perf_counter()
    with torch.device("meta"):
        ours = WanDiT(config).to(dtype)
    ours = ours.to_empty(device=device)
    fill_random(ours)
    ours.eval().requires_grad_(False)
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    f, h, w = args.frames // 4, args.height // 8, args.width // 8
    g = torch.Generator(device=device).manual_seed(1)

    def randn(*shape):
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    x, ref = randn(1, 16, f, h, w), randn(1, 16, 1, h, w)
    motion = randn(1, 16, motion_latent_count(config.motion_frames), h, w)
    audio = randn(1, WAV2VEC_STATES, config.audio_dim, args.frames)
    context = [randn(config.text_len, config.text_dim)]
    t = torch.tensor([999], device=device)
    cases = {"first clip": None, "later clip": motion}
    noisy, per_frame = f * (h // 2) * (w // 2), (h // 2) * (w // 2)
    extra = {"first clip": per_frame, "later clip": per_frame + per_frame * 3 // 2}

    results: dict = {}
    outputs = {}
    with torch.no_grad():
        # warm-up on one latent frame: library handles and kernels, at a fraction of a clip's cost
        ours(x[:, :, :1], t, context, ref_latent=ref, audio_features=audio[..., :4], motion_latent=motion)
        for name, motion_latent in cases.items():
            seconds, peak, out = run_timed(lambda: ours(x, t, context, ref_latent=ref, audio_features=audio,
                                                        motion_latent=motion_latent), args.repeats, device)
            outputs[name] = out.float()
            results[f"ours, {name}"] = {"seconds": seconds, "activation_peak_gib": peak / 2**30,
                                        "tokens": noisy + extra[name]}
        print(json.dumps(results), flush=True)  # ours, before the peer runs
        if args.official is not None:
            from wan_core.testing.official import build_official_s2v, official_s2v_forward

            theirs = build_official_s2v(args.official, config, ours.state_dict())
            seconds, peak, out = run_timed(lambda: official_s2v_forward(
                theirs, x, t, context, ref_latent=ref, audio_features=audio, motion_latent=motion,
                pose_latent=None), args.repeats, device)
            mine = outputs["later clip"]
            results["reference WanModel_S2V, later clip"] = {
                "seconds": seconds, "activation_peak_gib": peak / 2**30, "tokens": noisy + extra["later clip"],
                "relative_l2_difference_to_ours": ((out.float() - mine).norm() / out.float().norm()).item(),
                "max_abs_difference_over_max": ((out.float() - mine).abs().max() / out.float().abs().max()).item()}

    rate = matmul_rate(device) if device.type == "cuda" else float("nan")
    for name, r in results.items():
        case = "first clip" if "first" in name else "later clip"
        r["floor_seconds"] = s2v_flops(config, noisy, extra[case], f, config.text_len) / rate
        r["fraction_of_floor"] = r["floor_seconds"] / r["seconds"]
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "dtype": str(dtype), "size": f"{args.width}x{args.height}",
               "frames_per_clip": args.frames, "latent": [f, h, w], "weights_gib": weights / 2**30,
               "matmul_tflops": rate / 1e12, "wall_seconds": time.perf_counter() - started, "results": results}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"\n{summary['device']}: S2V {config.num_layers} layers x {config.dim}, {args.width}x{args.height}, "
          f"{args.frames} frames/clip, {dtype}; weights {weights / 2**30:.1f} GiB; matmul {rate / 1e12:.0f} TFLOP/s")
    for name, r in results.items():
        line = (f"  {name:36s} {r['seconds'] * 1000:9.1f} ms  {r['tokens']} tokens  {r['fraction_of_floor']:6.1%} of "
                f"floor  peak +{r['activation_peak_gib']:.2f} GiB")
        if "relative_l2_difference_to_ours" in r:
            line += f"  rel L2 vs ours {r['relative_l2_difference_to_ours']:.2e}"
        print(line)


if __name__ == "__main__":
    main()
