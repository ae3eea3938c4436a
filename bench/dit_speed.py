"""Full-size DiT forward speed of every path, in one GPU process, against diffusers on the same weights.

For each shape: diffusers' WanTransformer3DModel (bf16, eager), ComfyUI's own WanModel (bf16,
eager; with --comfyui, the folder holding ComfyUI's comfy/ package), ours bf16 eager (exact
elementwise path), ours bf16 eager with the fused elementwise kernels (all of
`wan_core.ops.fused`'s kinds, and all but "residual"), ours bf16 with compile_blocks(), and ours
fast: the same weights loaded through `load_dit(..., quant="fp8_e4m3fn_fast")` (e4m3 block
weights, fp8 matmuls except in the first and last block) with attention="auto" (the 8-bit
kernel where it passes its probe), compiled. All share one copy of the weights. Each gets its
median seconds per forward, the ratio to diffusers, TFLOP/s against the bf16 and the fp8 matrix
rates measured in this run, the activation peak above the weights, and (fast path) the output's
cosine and relative L2 against ours bf16 eager. Then, with --e2e, a 4-step sampling run of the
fast path and of bf16 from the same noise, both decoded by a random-weight Wan2.1 VAE: the
latents' relative L2 and the decoded videos' PSNR.

    python bench/dit_speed.py [--shapes t2v:832x480x81 t2v:1280x720x81 ti2v:1280x704x121]
        [--variants ...] [--comfyui PATH] [--layers N] [--repeats 2] [--e2e] [--json FILE]
        [--budget-s S] [--dry-run]

--dry-run runs a tiny model on the CPU (checks the script; timings mean nothing there).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.dit_vs_diffusers import forward_flops, matmul_rate, random_model, timed  # noqa: E402
from wan_core.configs import task_for_model_type  # noqa: E402
from wan_core.dit import WanDiT  # noqa: E402
from wan_core.loading import load_dit, to_layout  # noqa: E402
from wan_core.ops import fused  # noqa: E402
from wan_core.ops.attention import auto_reason, resolve_backend  # noqa: E402


def fp8_matmul_rate(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    """Measured e4m3 x e4m3 -> bf16 matrix-product rate (row-wise scales) in FLOP/s."""
    a = torch.randn(size, size, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(size, size, device=device).to(torch.float8_e4m3fn).t()
    ones_a, ones_b = torch.ones(size, 1, device=device), torch.ones(1, size, device=device)
    run = lambda: torch._scaled_mm(a, b, scale_a=ones_a, scale_b=ones_b, out_dtype=torch.bfloat16)  # noqa: E731
    median, _ = timed(run, 3)
    median, _ = timed(run, repeats)
    return 2 * size ** 3 / median


def allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def with_kinds(model, kinds):
    def run(x, t, context):
        with fused.only_fused(kinds):
            return model(x, t, context)
    return run


def diffusers_twin(ours: WanDiT, device):
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    config = ours.config
    with torch.device("meta"):
        theirs = WanTransformer3DModel(
            patch_size=config.patch_size, num_attention_heads=config.num_heads, attention_head_dim=config.head_dim,
            in_channels=config.in_dim, out_channels=config.out_dim, text_dim=config.text_dim,
            freq_dim=config.freq_dim, ffn_dim=config.ffn_dim, num_layers=config.num_layers,
            cross_attn_norm=config.cross_attn_norm, qk_norm="rms_norm_across_heads", eps=config.eps)
    theirs.load_state_dict(to_layout(ours.state_dict(), "dit", ["diffusers"]), strict=True, assign=True)
    theirs.rope = WanRotaryPosEmbed(config.head_dim, config.patch_size, 1024).to(device)
    return theirs.eval().requires_grad_(False)


def compare(out: torch.Tensor, reference: torch.Tensor) -> dict:
    out, reference = out.float().flatten(), reference.float().flatten()
    return {"cosine": F.cosine_similarity(out, reference, dim=0).item(),
            "relative_l2": ((out - reference).norm() / reference.norm()).item()}


def parse_shape(text: str) -> tuple[str, int, int, int]:
    variant, size = text.split(":")
    width, height, frames = (int(x) for x in size.split("x"))
    return variant, width, height, frames


def bench_family(variant: str, shapes, args, device, rates, on_row=None) -> list[dict]:
    task = task_for_model_type(variant)
    config = task.dit if args.layers is None else task.dit.tiny(
        dim=task.dit.dim, ffn_dim=task.dit.ffn_dim, freq_dim=task.dit.freq_dim, text_dim=task.dit.text_dim,
        num_heads=task.dit.num_heads, num_layers=args.layers)
    if args.dry_run:
        config = task.dit.tiny(dim=256, num_heads=2, ffn_dim=384, text_dim=64, freq_dim=16, num_layers=2)
    ours = random_model(config, device)
    ours.set_attention_backend("sdpa")
    weights_gib = allocated(device) / 2**30
    runs = {"ours_eager": with_kinds(ours, ()), "ours_eager_fused": with_kinds(ours, fused.KINDS),
            "ours_eager_fused_no_residual": with_kinds(ours, [k for k in fused.KINDS if k != "residual"])}
    if "comfyui" in args.variants:
        from wan_core.testing.comfy_model import comfyui_forward, comfyui_wan_model

        comfy_model = comfyui_wan_model(args.comfyui, config, ours.state_dict())
        runs["comfyui"] = lambda x, t, c: comfyui_forward(comfy_model, x, t, c)
    if "diffusers" in args.variants:
        theirs = diffusers_twin(ours, device)
        runs["diffusers"] = lambda x, t, c: theirs(x, t, c, return_dict=False)[0]
    if "ours_compiled" in args.variants:
        with torch.device("meta"):
            compiled = WanDiT(config)
        compiled.load_state_dict(ours.state_dict(), assign=True)
        compiled.eval().set_attention_backend("sdpa")
        compiled.compile_blocks()
        runs["ours_compiled"] = compiled
    fast_backend = resolve_backend("auto", device, torch.bfloat16)
    if "ours_fast_compiled" in args.variants:
        fast = load_dit(ours.state_dict(), dtype=torch.bfloat16, device=device, quant="fp8_e4m3fn_fast")
        fast.set_attention_backend("auto")
        fast.compile_blocks()
        runs["ours_fast_compiled"] = fast
    runs = {name: runs[name] for name in args.variants}
    rows = []
    for _, width, height, frames in shapes:
        if over_budget(args, f"{variant} {width}x{height}x{frames}"):
            continue
        stride = task.vae_stride
        latent = ((frames - 1) // stride[0] + 1, height // stride[1], width // stride[2])
        tokens = math.prod(s // p for s, p in zip(latent, config.patch_size))
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(1, config.in_dim, *latent, device=device, dtype=torch.bfloat16, generator=generator)
        t = torch.tensor([900.0], device=device)
        context = torch.randn(1, config.text_len, config.text_dim, device=device, dtype=torch.bfloat16,
                              generator=generator)
        flops = forward_flops(config, tokens, config.text_len)
        row = {"variant": variant, "size": f"{width}x{height}x{frames}", "latent": latent, "tokens": tokens,
               "layers": config.num_layers, "forward_tflop": flops / 1e12, "weights_gib": weights_gib,
               "fast_attention": fast_backend, "fast_attention_reason": auto_reason(device, torch.bfloat16)}
        outputs = {}
        for name, model in runs.items():
            if name != "ours_eager" and over_budget(args, f"{row['size']} {name}"):
                continue
            start = time.perf_counter()
            with torch.no_grad():
                outputs[name] = model(x, t, context).float()  # warm-up: compiles, plans
                warm_s = time.perf_counter() - start
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                base = allocated(device)
                median, times = timed(lambda: model(x, t, context), args.repeats, device)
                peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0) - base
            row[name] = {"median_s": median, "times_s": times, "first_call_s": warm_s,
                         "activation_peak_gib": peak / 2**30, "tflops": flops / median / 1e12,
                         "fraction_of_bf16_floor": flops / rates["bf16"] / median,
                         "vs_ours_eager_bf16": compare(outputs[name], outputs["ours_eager"])}
            print(json.dumps({"size": row["size"], name: row[name]}), flush=True)
            if on_row:
                on_row(row, partial=True)
        for name in outputs:
            for peer in ("diffusers", "comfyui", "ours_eager"):
                if peer in outputs:
                    row[name][f"speedup_vs_{peer}"] = row[peer]["median_s"] / row[name]["median_s"]
        if "ours_fast_compiled" in outputs:
            row["ours_fast_compiled"]["fraction_of_fp8_floor"] = (flops / rates["fp8"]
                                                                  / row["ours_fast_compiled"]["median_s"])
        rows.append(row)
        if on_row:
            on_row(row)
        del outputs, x, context
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.e2e and variant == "t2v" and "ours_fast_compiled" in runs and not over_budget(args, "e2e"):
        rows.append(end_to_end(ours, fast, task, device))
        if on_row:
            on_row(rows[-1])
    del ours, runs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# in the order they run: ours_eager first (every output is compared with it), then what the
# budget (--budget-s) may skip
VARIANTS = ("ours_eager", "ours_eager_fused", "ours_eager_fused_no_residual", "comfyui", "diffusers", "ours_compiled",
            "ours_fast_compiled")


def over_budget(args, what: str) -> bool:
    if args.budget_s is not None and time.perf_counter() - args.started > args.budget_s:
        print(json.dumps({"skipped": what, "reason": f"over the {args.budget_s:.0f} s budget"}), flush=True)
        return True
    return False


def end_to_end(exact: WanDiT, fast: WanDiT, task, device, size=(832, 480), frames: int = 33) -> dict:
    """4 UniPC steps with CFG from the same noise through the bf16 and the fast model, decoded by
    one random-weight Wan2.1 VAE: latent relative L2 and decoded-video PSNR (video in [-1, 1])."""
    from wan_core.sampling import sample
    from wan_core.testing.vae import vae_state_dict
    from wan_core.vae import WAN21_VAE, load_vae

    latent_shape = (task.dit.out_dim, (frames - 1) // task.vae_stride[0] + 1, size[1] // task.vae_stride[1],
                    size[0] // task.vae_stride[2])
    noise = torch.randn(1, *latent_shape, device=device, generator=torch.Generator(device=device).manual_seed(0))
    generator = torch.Generator(device=device).manual_seed(1)
    context = [torch.randn(77, 4096, device=device, dtype=torch.bfloat16, generator=generator)]
    context_null = [torch.randn(64, 4096, device=device, dtype=torch.bfloat16, generator=generator)]
    latents = {}
    for name, model in (("bf16", exact), ("fast", fast)):
        start = time.perf_counter()
        with torch.no_grad():
            latents[name] = sample(model, noise, context, context_null, steps=4, shift=task.sample_shift,
                                   guide_scale=4.0, seed=0).float()
        torch.cuda.synchronize()
        print(json.dumps({"e2e": name, "sample_s": time.perf_counter() - start}), flush=True)
    vae = load_vae(vae_state_dict(WAN21_VAE, device=device), dtype=torch.float32, device=device)
    with torch.no_grad():
        videos = {name: vae.decode(latent).float().clamp(-1, 1) for name, latent in latents.items()}
    mse = (videos["fast"] - videos["bf16"]).pow(2).mean().item()
    result = {"e2e": f"t2v 4 steps {size[0]}x{size[1]}x{frames}",
              "latent": compare(latents["fast"], latents["bf16"]),
              "video_psnr_db": 10 * math.log10(4.0 / mse) if mse > 0 else float("inf")}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["t2v:832x480x81", "t2v:1280x720x81", "ti2v:1280x704x121"])
    parser.add_argument("--layers", type=int, default=None, help="fewer blocks than the real model")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="which paths to time (ours_eager is always run: it is the reference)")
    parser.add_argument("--comfyui", type=Path, default=None,
                        help="a ComfyUI checkout (or the folder holding a copy of its comfy/): also time its WanModel")
    parser.add_argument("--e2e", action="store_true", help="also the 4-step sampling comparison")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tiling-from", type=Path, default=None,
                        help="a bench/attention_kernels.py JSON: use its fastest int8_fp8_triton tiling")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip the shapes, paths and e2e run still to come once this many seconds have passed")
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU (checks the script)")
    args = parser.parse_args()
    args.variants = [v for v in VARIANTS if (v in args.variants and (v != "comfyui" or args.comfyui))
                     or v == "ours_eager"]
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        args.variants = [v for v in args.variants if v not in ("ours_compiled", "ours_fast_compiled")]
    if args.tiling_from and args.tiling_from.exists():
        from bench.attention_kernels import best_tiling

        best = best_tiling(json.loads(args.tiling_from.read_text()).get("attention"))
        if best:
            from wan_core.ops import int8_attention

            (int8_attention.BLOCK_M, int8_attention.BLOCK_N, int8_attention.NUM_WARPS, int8_attention.NUM_STAGES,
             warp_specialize) = best
            int8_attention.WARP_SPECIALIZE = bool(warp_specialize)
    args.started = time.perf_counter()
    started = args.started
    rates = ({"bf16": float("nan"), "fp8": float("nan")} if args.dry_run
             else {"bf16": matmul_rate(device), "fp8": fp8_matmul_rate(device)})
    from wan_core.ops import int8_attention

    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
               "torch": torch.__version__, "variants": args.variants, "fused_kinds": list(fused.KINDS),
               "int8_fp8_tiling": [int8_attention.BLOCK_M, int8_attention.BLOCK_N, int8_attention.NUM_WARPS,
                                   int8_attention.NUM_STAGES, int8_attention.WARP_SPECIALIZE],
               "bf16_matmul_tflops": rates["bf16"] / 1e12, "fp8_matmul_tflops": rates["fp8"] / 1e12, "rows": []}
    shapes = [parse_shape(s) for s in args.shapes]

    def save(row, partial: bool = False):
        if not partial:
            summary["rows"].append(row)
        summary["elapsed_s"] = time.perf_counter() - started
        if args.json:
            args.json.write_text(json.dumps({**summary, "rows": summary["rows"] + ([row] if partial else [])},
                                            indent=1))

    for variant in dict.fromkeys(s[0] for s in shapes):
        bench_family(variant, [s for s in shapes if s[0] == variant], args, device, rates, save)
    print(f"\n{summary['device']}: bf16 {summary['bf16_matmul_tflops']:.0f}, fp8 {summary['fp8_matmul_tflops']:.0f} "
          f"TFLOP/s measured; {time.perf_counter() - started:.0f} s")
    for row in summary["rows"]:
        if "e2e" in row:
            print(f"  e2e {row['e2e']}: latent cos {row['latent']['cosine']:.5f} rel {row['latent']['relative_l2']:.4f}, "
                  f"decoded PSNR {row['video_psnr_db']:.1f} dB")
            continue
        print(f"  {row['variant']} {row['size']} ({row['tokens']} tokens, {row['layers']} blocks, fast attention "
              f"{row['fast_attention']}):   s/forward  x diffusers  x comfyui  x ours_eager")
        for name in (v for v in VARIANTS if v in row):
            r, nan = row[name], float("nan")
            print(f"    {name:28s} {r['median_s']:7.3f}  x{r.get('speedup_vs_diffusers', nan):.3f}  "
                  f"x{r.get('speedup_vs_comfyui', nan):.3f}  x{r.get('speedup_vs_ours_eager', nan):.3f}  "
                  f"{r['tflops']:5.0f} TFLOP/s ({r['fraction_of_bf16_floor']:.1%} of bf16 floor)  "
                  f"peak +{r['activation_peak_gib']:.2f} GiB  "
                  f"cos {r['vs_ours_eager_bf16']['cosine']:.5f} rel {r['vs_ours_eager_bf16']['relative_l2']:.4f}")


if __name__ == "__main__":
    main()
