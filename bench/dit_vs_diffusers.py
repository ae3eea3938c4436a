"""One DiT forward pass at full size on a GPU: ours against diffusers' WanTransformer3DModel.

Both models hold the very same random bf16 weights (diffusers' parameters are our tensors
under diffusers' names, so the weights sit in GPU memory once). Default shape: a T2V-A14B
expert (40 layers, width 5120) at 480x832 and 81 frames -> 21x60x104 latent, 32760 tokens,
512 text tokens, batch 1. Prints each model's median time, the ratio, the fraction of the
FLOP floor (matmul + attention FLOPs over the bf16 matmul rate measured in this run), each
model's activation peak above the weights, and the bf16 difference between the two outputs.

    python bench/dit_vs_diffusers.py [--variant t2v|i2v|ti2v] [--layers 40] [--frames 81]
        [--height 480] [--width 832] [--repeats 5] [--backend sdpa]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wan_core.configs import task_for_model_type  # noqa: E402
from wan_core.dit import WanDiT  # noqa: E402
from wan_core.loading import to_layout  # noqa: E402


def matmul_rate(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 matrix-product rate in FLOP/s (the ceiling the floor is computed from)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def forward_flops(config, tokens: int, text_tokens: int) -> float:
    """Multiply-adds x 2 of the linear layers and the two attentions of one forward pass."""
    d, f = config.dim, config.ffn_dim
    per_block = (2 * tokens * d * d * 4              # self-attention q, k, v, o
                 + 2 * 2 * tokens * tokens * d       # q k^T and p v
                 + 2 * tokens * d * d * 2            # cross-attention q, o
                 + 2 * text_tokens * d * d * 2       # cross-attention k, v
                 + 2 * 2 * tokens * text_tokens * d  # cross-attention scores and values
                 + 2 * tokens * d * f * 2)           # MLP
    return config.num_layers * per_block


def timed(fn, repeats: int, device: torch.device | None = None, warmup: int = 0) -> tuple[float, list[float]]:
    """(median, all) seconds of `fn` over `repeats` calls after `warmup` untimed ones: CUDA events
    on a GPU (the default), the clock when `device` is a CPU."""
    on_cpu = device is not None and torch.device(device).type == "cpu"
    for _ in range(warmup):
        fn()
    if not on_cpu:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if on_cpu:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times), times


def random_model(config, device) -> WanDiT:
    """Ours with random bf16 weights on `device`: matrices N(0, 1/fan_in), norm weights N(1, 0.1),
    the rest N(0, 0.1), from seed 0 (the same numbers in every benchmark that compares paths)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = WanDiT(config).to(torch.bfloat16)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim >= 2:
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
            elif ".norm" in name:
                p.normal_(1, 0.1)
            else:
                p.normal_(0, 0.1)
    return model.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="t2v", choices=["t2v", "i2v", "ti2v"])
    parser.add_argument("--layers", type=int, default=None, help="fewer blocks than the real model")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="sdpa")
    parser.add_argument("--compile", action="store_true", help="also time ours with compile_blocks()")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()

    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    device = torch.device("cuda")
    task = task_for_model_type(args.variant)
    config = task.dit if args.layers is None else task.dit.tiny(
        dim=task.dit.dim, ffn_dim=task.dit.ffn_dim, freq_dim=task.dit.freq_dim, text_dim=task.dit.text_dim,
        num_heads=task.dit.num_heads, num_layers=args.layers)
    ours = random_model(config, device)
    ours.set_attention_backend(args.backend)
    weight_bytes = torch.cuda.memory_allocated(device)

    with torch.device("meta"):
        theirs = WanTransformer3DModel(
            patch_size=config.patch_size, num_attention_heads=config.num_heads, attention_head_dim=config.head_dim,
            in_channels=config.in_dim, out_channels=config.out_dim, text_dim=config.text_dim,
            freq_dim=config.freq_dim, ffn_dim=config.ffn_dim, num_layers=config.num_layers,
            cross_attn_norm=config.cross_attn_norm, qk_norm="rms_norm_across_heads", eps=config.eps)
    theirs.load_state_dict(to_layout(ours.state_dict(), "dit", ["diffusers"]), strict=True, assign=True)
    theirs.rope = WanRotaryPosEmbed(config.head_dim, config.patch_size, 1024).to(device)
    theirs.eval().requires_grad_(False)
    assert torch.cuda.memory_allocated(device) - weight_bytes < 2**30, "diffusers must share our weights"

    stride = task.vae_stride
    latent = ((args.frames - 1) // stride[0] + 1, args.height // stride[1], args.width // stride[2])
    tokens = math.prod(s // p for s, p in zip(latent, config.patch_size))
    x = torch.randn(1, config.in_dim, *latent, device=device, dtype=torch.bfloat16)
    t = torch.tensor([900.0], device=device)
    context = torch.randn(1, config.text_len, config.text_dim, device=device, dtype=torch.bfloat16)

    results = {}
    outputs = {}
    runs = {"ours": lambda: ours(x, t, context), "diffusers": lambda: theirs(x, t, context, return_dict=False)[0]}
    if args.compile:
        with torch.device("meta"):
            compiled = WanDiT(config)
        compiled.load_state_dict(ours.state_dict(), assign=True)
        compiled.eval().set_attention_backend(args.backend)
        compiled.compile_blocks()
        runs["ours_compiled"] = lambda: compiled(x, t, context)
    for name, fn in runs.items():
        with torch.no_grad():
            outputs[name] = fn().float()
            for _ in range(2):
                fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            median, times = timed(fn, args.repeats)
            peak = torch.cuda.max_memory_allocated(device) - base
        results[name] = {"median_s": median, "times_s": times, "activation_peak_gib": peak / 2**30}

    rate = matmul_rate(device)
    flops = forward_flops(config, tokens, config.text_len)
    floor = flops / rate
    diff = (outputs["ours"] - outputs["diffusers"]).norm() / outputs["diffusers"].norm()
    if args.compile:
        results["ours_compiled"]["relative_l2_difference_to_eager"] = (
            (outputs["ours_compiled"] - outputs["ours"]).norm() / outputs["ours"].norm()).item()
        results["ours_compiled"]["speedup_vs_diffusers"] = (results["diffusers"]["median_s"]
                                                            / results["ours_compiled"]["median_s"])
    summary = {
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
        "shape": {"variant": args.variant, "layers": config.num_layers, "dim": config.dim, "latent": latent,
                  "tokens": tokens, "backend": args.backend},
        "weights_gib": weight_bytes / 2**30, "matmul_tflops": rate / 1e12, "forward_tflop": flops / 1e12,
        "floor_s": floor, **results,
        "speedup_vs_diffusers": results["diffusers"]["median_s"] / results["ours"]["median_s"],
        "ours_fraction_of_floor": floor / results["ours"]["median_s"],
        "diffusers_fraction_of_floor": floor / results["diffusers"]["median_s"],
        "relative_l2_difference_bf16": diff.item(),
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"\n{summary['device']}: {config.num_layers} layers x {config.dim}, {tokens} tokens")
    for name in runs:
        r = results[name]
        print(f"  {name:9s} {r['median_s'] * 1000:8.1f} ms   {floor / r['median_s']:5.1%} of the FLOP floor   "
              f"activation peak {r['activation_peak_gib']:.2f} GiB")
    print(f"  ours / diffusers speed-up x{summary['speedup_vs_diffusers']:.3f}; floor {floor * 1000:.1f} ms "
          f"({flops / 1e12:.0f} TFLOP at a measured {rate / 1e12:.0f} TFLOP/s); bf16 rel. L2 difference {diff:.2e}")


if __name__ == "__main__":
    main()
