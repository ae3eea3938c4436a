"""Several GPUs for one video: a full-size T2V-A14B expert (random bf16 weights) on 1 vs N GPUs.

One command per GPU count, under torchrun; every number is measured in that run:

    torchrun --nproc_per_node N bench/parallel_dit.py [--sizes 1280*720,832*480] [--frames 81]
        [--repeats 3] [--e2e_steps 4] [--quant fp8_e4m3fn] [--json FILE]

For each size:
- `1 GPU`: rank 0 alone (the others wait): one DiT forward, and one guided step (the
  conditional and the unconditional forward), the path the parallel ones replace;
- `ulysses`: the tokens split over all N ranks (forward and guided step);
- `cfg`: the two passes of a step on two halves (N = 2), and `ulysses+cfg` (N >= 4, even):
  Ulysses over N/2 within each half;
- the same with the weights sharded by FSDP2 (`+fsdp`), after the unsharded expert is freed;
each with its speed-up over 1 GPU, the fraction of the FLOP floor (the forward's FLOPs over N x
the bf16 matmul rate measured here) and the peak memory per GPU, plus the expert's weight bytes
per GPU with and without FSDP. Then `--e2e_steps` steps of the two-expert hand-off with CFG end
to end on rank 0 alone and on all N ranks (Ulysses), then on all N with the experts sharded by
FSDP and the inactive one's shards on the CPU (its peak memory per GPU), and the differences of
the latents.

`--device cpu --tiny` runs the same code with gloo on a tiny model (the CPU test).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dit_vs_diffusers import forward_flops, matmul_rate  # noqa: E402

from wan_core.configs import TASKS  # noqa: E402
from wan_core.dit import WanDiT  # noqa: E402
from wan_core.ops.linear import FP8Linear, quantize_fp8  # noqa: E402
from wan_core.parallel import (ParallelConfig, enable_sequence_parallel, init_distributed, init_groups,  # noqa: E402
                               parallelize, shard_dit, weight_bytes)
from wan_core.pipeline import parse_size  # noqa: E402
from wan_core.sampling import sample  # noqa: E402

TASK = TASKS["t2v-A14B"]


def expert_config(tiny: bool):
    if tiny:
        return TASK.dit.tiny(dim=768, num_heads=6, ffn_dim=512, text_dim=64, freq_dim=32, num_layers=2)
    return TASK.dit


def random_expert(config, device: torch.device, dtype: torch.dtype, seed: int, quant) -> WanDiT:
    """The same random weights on every rank: each tensor drawn on `device` by a generator
    seeded from (seed, its name); matrices N(0, 1/fan_in), norm gains near 1, the rest N(0, 0.1^2)."""
    with torch.device("meta"):
        model = WanDiT(config)
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
            generator = torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little"))
            noise = torch.randn(tensor.shape, generator=generator, device=device, dtype=torch.float32)
            if name.endswith("weight") and tensor.ndim >= 2:
                noise /= math.sqrt(tensor[0].numel())
            elif ".norm" in name:
                noise = 1 + 0.1 * noise
            else:
                noise *= 0.1
            tensor.copy_(noise)
    if quant:
        for block in model.blocks:
            for module_name, linear in list(block.named_modules()):
                if type(linear) is torch.nn.Linear:
                    fp8 = FP8Linear(linear.in_features, linear.out_features, fp8_dtype=getattr(torch, quant),
                                    bias_dtype=dtype, device=device)
                    fp8.weight.data, fp8.weight_scale = quantize_fp8(linear.weight, fp8.weight.dtype)
                    fp8.bias.data = linear.bias.data
                    parent, _, attr = module_name.rpartition(".")
                    setattr(block.get_submodule(parent) if parent else block, attr, fp8)
    return model.eval().requires_grad_(False)


def synchronize(device: torch.device, all_ranks: bool = True) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if all_ranks:
        dist.barrier()


def timed(fn, repeats: int, device: torch.device, all_ranks: bool = True) -> tuple[float, float]:
    """(median seconds over `repeats` after one warm-up, this rank's peak memory in GiB during
    them); `all_ranks`: every rank runs `fn` (each repeat ends when all are done)."""
    fn()
    synchronize(device, all_ranks)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device, all_ranks)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def peak_over_ranks(value: float, device: torch.device) -> float:
    """The largest of every rank's `value` (peak memory: the GPU that needs most decides)."""
    box = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return box.item()


def inputs(config, size, frames: int, device: torch.device, dtype: torch.dtype):
    stride = TASK.vae_stride
    latent = ((frames - 1) // stride[0] + 1, size[1] // stride[1], size[0] // stride[2])
    g = torch.Generator(device=device).manual_seed(7)
    x = torch.randn(1, config.in_dim, *latent, generator=g, device=device)
    context = [torch.randn(config.text_len, config.text_dim, generator=g, device=device).to(dtype)]
    context_null = [torch.randn(config.text_len, config.text_dim, generator=g, device=device).to(dtype)]
    tokens = math.prod(s // p for s, p in zip(latent, config.patch_size))
    return x, context, context_null, tokens


def arrangements(world: int) -> list[tuple[str, ParallelConfig]]:
    modes = [("ulysses", ParallelConfig(ulysses_size=world))]
    if world == 2:
        modes.append(("cfg", ParallelConfig(ulysses_size=1, cfg_parallel=True)))
    if world >= 4 and world % 2 == 0:
        modes.append(("ulysses+cfg", ParallelConfig(ulysses_size=world // 2, cfg_parallel=True)))
    return modes


def measure_modes(expert, modes, x, t, context, context_null, repeats, device, suffix=""):
    """Forward and guided-step time and peak memory of `expert` in each arrangement of `modes`."""
    rows = {}
    for name, config in modes:
        groups = init_groups(config, device)
        (ready,) = parallelize([expert], groups)
        row = {}
        if not config.cfg_parallel:
            row["forward_s"], row["forward_peak_gib"] = timed(lambda: ready(x, t, context), repeats, device)
            step = lambda: (ready(x, t, context), ready(x, t, context_null))  # noqa: E731
        else:
            step = lambda: ready.cond_and_uncond(x, t, context, context_null)  # noqa: E731
        row["step_s"], row["step_peak_gib"] = timed(step, repeats, device)
        for key in ("forward_peak_gib", "step_peak_gib"):
            if key in row:
                row[key] = peak_over_ranks(row[key], device)
        row["weights_gib_per_gpu"] = peak_over_ranks(weight_bytes(expert) / 2**30, device)
        enable_sequence_parallel(expert, None)
        rows[name + suffix] = row
    return rows


def end_to_end(config, size, frames, steps, device, dtype, quant, world) -> dict:
    """The two-expert hand-off with CFG: `steps` steps on rank 0 alone, then on all ranks."""
    experts = [random_expert(config, device, dtype, seed, quant) for seed in (1, 2)]
    x, context, context_null, _ = inputs(config, size, frames, device, dtype)

    def run():
        return sample(tuple(experts), x, context, context_null, steps=steps, shift=TASK.sample_shift,
                      guide_scale=TASK.sample_guide_scale, boundary=TASK.boundary)

    out = {}
    alone = None
    start = time.perf_counter()
    if dist.get_rank() == 0:
        with torch.no_grad():
            alone = run()
    synchronize(device)  # the other ranks wait here
    out["one_gpu_s"] = time.perf_counter() - start
    groups = init_groups(ParallelConfig(ulysses_size=world), device)
    parallelize(experts, groups)
    start = time.perf_counter()
    with torch.no_grad():
        together = run()
    synchronize(device)
    out["n_gpus_s"] = time.perf_counter() - start
    out["speedup"] = out["one_gpu_s"] / out["n_gpus_s"]
    # FSDP with the hand-off: only the running expert's shards on the GPUs, the other's on the CPU
    mesh = groups.fsdp_mesh()
    for expert in experts:
        shard_dit(expert, mesh)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.no_grad():
        sharded = sample(tuple(experts), x, context, context_null, steps=steps, shift=TASK.sample_shift,
                         guide_scale=TASK.sample_guide_scale, boundary=TASK.boundary, offload_inactive_expert=True)
    synchronize(device)
    out["n_gpus_fsdp_offload_s"] = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    out["n_gpus_fsdp_offload_peak_gib"] = peak_over_ranks(peak, device)
    if alone is not None:
        for name, latent in (("", together), ("fsdp_offload_", sharded)):
            out[f"{name}latent_max_relative_difference"] = ((latent - alone).abs().max() / alone.abs().max()).item()
            out[f"{name}latent_relative_l2_difference"] = ((latent - alone).norm() / alone.norm()).item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1280*720,832*480", help="WIDTH*HEIGHT,... of the video")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--e2e_steps", type=int, default=4, help="steps of the end-to-end run (0: none)")
    parser.add_argument("--quant", default=None, choices=["fp8_e4m3fn", "fp8_e5m2"],
                        help="blocks' linear weights kept in fp8 (FP8Linear)")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu (gloo)")
    parser.add_argument("--tiny", action="store_true", help="a tiny fp32 model (the CPU test)")
    parser.add_argument("--json", type=Path, default=None, help="rank 0 also writes the numbers here")
    args = parser.parse_args()

    device, world = init_distributed(torch.device(args.device) if args.device else None)
    if not dist.is_initialized():
        raise SystemExit("run under torchrun with --nproc_per_node 2 or more")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    config = expert_config(args.tiny)
    rank0 = dist.get_rank() == 0
    rate = matmul_rate(device) if device.type == "cuda" else float("nan")
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "gpus": world, "frames": args.frames, "torch": torch.__version__, "dtype": str(dtype), "quant": args.quant,
               "layers": config.num_layers, "dim": config.dim, "matmul_tflops_per_gpu": rate / 1e12, "sizes": {}}
    t = torch.tensor([900.0], device=device)
    modes = arrangements(world)
    for size_text in args.sizes.split(","):
        size = parse_size(size_text)
        x, context, context_null, tokens = inputs(config, size, args.frames, device, dtype)
        flops = forward_flops(config, tokens, config.text_len)
        expert = random_expert(config, device, dtype, 1, args.quant)
        rows = {}
        if rank0:  # the path the parallel ones replace: one GPU alone
            forward, forward_peak = timed(lambda: expert(x, t, context), args.repeats, device, all_ranks=False)
            step, step_peak = timed(lambda: (expert(x, t, context), expert(x, t, context_null)), args.repeats,
                                    device, all_ranks=False)
            rows["1 GPU"] = {"forward_s": forward, "step_s": step, "forward_peak_gib": forward_peak,
                             "step_peak_gib": step_peak, "weights_gib_per_gpu": weight_bytes(expert) / 2**30}
        dist.barrier()
        rows.update(measure_modes(expert, modes, x, t, context, context_null, args.repeats, device))
        expert = None  # freed before the next set of weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
        expert = shard_dit(random_expert(config, device, dtype, 1, args.quant),
                           init_groups(ParallelConfig(ulysses_size=world), device).fsdp_mesh())
        rows.update(measure_modes(expert, modes, x, t, context, context_null, args.repeats, device, "+fsdp"))
        expert = None  # freed before the next set of weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result = {"tokens": tokens, "forward_tflop": flops / 1e12, "modes": rows}
        if args.e2e_steps:
            result["end_to_end"] = end_to_end(config, size, args.frames, args.e2e_steps, device, dtype, args.quant,
                                              world)
        summary["sizes"][size_text] = result
    if rank0:
        report(summary, rate, world)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
    dist.barrier()
    dist.destroy_process_group()


def report(summary: dict, rate: float, world: int) -> None:
    print(json.dumps(summary, indent=2))
    for size, result in summary["sizes"].items():
        rows = result["modes"]
        base = rows["1 GPU"]
        print(f"\n{summary['device']} x{world}, {size}x{summary['frames']}: "
              f"{result['tokens']} tokens, {summary['dtype']}{' ' + summary['quant'] if summary['quant'] else ''}")
        print(f"  {'mode':16s} {'forward':>9s} {'x1 GPU':>7s} {'step':>9s} {'x1 GPU':>7s} {'of floor':>8s} "
              f"{'peak/GPU':>9s} {'weights/GPU':>11s}")
        for name, row in rows.items():
            gpus = 1 if name == "1 GPU" else world
            forward = row.get("forward_s")
            floor = result["forward_tflop"] * 1e12 / (gpus * rate) * 2 / row["step_s"]
            print(f"  {name:16s} {forward or float('nan'):9.3f} {base['forward_s'] / forward if forward else float('nan'):7.2f} "
                  f"{row['step_s']:9.3f} {base['step_s'] / row['step_s']:7.2f} {floor:8.1%} "
                  f"{row['step_peak_gib']:8.2f}G {row['weights_gib_per_gpu']:10.2f}G")
        e2e = result.get("end_to_end")
        if e2e:
            print(f"  end to end ({summary['gpus']} GPUs, Ulysses): {e2e['one_gpu_s']:.1f} s -> {e2e['n_gpus_s']:.1f} s "
                  f"(x{e2e['speedup']:.2f}); latent difference max {e2e['latent_max_relative_difference']:.2e}, "
                  f"L2 {e2e['latent_relative_l2_difference']:.2e}")
            print(f"  end to end with FSDP, inactive expert's shards on the CPU: {e2e['n_gpus_fsdp_offload_s']:.1f} s, "
                  f"peak {e2e['n_gpus_fsdp_offload_peak_gib']:.2f} GiB per GPU; latent difference max "
                  f"{e2e['fsdp_offload_latent_max_relative_difference']:.2e}")


if __name__ == "__main__":
    main()
