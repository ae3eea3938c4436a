"""The speed and memory work together on one GPU: block swap under the fast path (GPU).

The block-swap and fast-path benchmarks (bench/block_swap.py, bench/dit_speed.py) each ran
on their own branch; this one runs the merged code on a full-size T2V-A14B expert (random
weights made on the GPU, as bench/block_swap.py makes them) at 832x480x81 (32760 tokens):

1. the 8-bit attention kernel against its plain-torch twin on the GPU (bench/attention_kernels.py's
   twin_check, never run on the GPU before its layout fix);
2. bf16 eager with sdpa, resident and with all 40 blocks swapped: time, peak VRAM, bit-identity;
3. the fast path (fp8 matmuls `fp8_e4m3fn_fast`, attention "auto", `compile_blocks`), resident and
   with all 40 blocks swapped: time, peak VRAM, bit-identity, and its output against bf16
   (cosine, relative L2);
4. if time is left, the fast path at 1280x720x81 with all blocks swapped (peak VRAM).

Each step is skipped once `--deadline` seconds have passed. Prints one JSON line per result
and a table last.

    python bench/merged_paths.py [--deadline 330] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from attention_kernels import twin_check  # noqa: E402
from block_swap import random_expert  # noqa: E402

from wan_core.configs import T2V_A14B_DIT  # noqa: E402
from wan_core.dit import WanDiT  # noqa: E402
from wan_core.ops.attention import auto_reason, resolve_backend  # noqa: E402
from wan_core.ops.linear import enable_fp8_matmul  # noqa: E402

GIB = 2 ** 30
SIZES = {"480p": (480, 832), "720p": (720, 1280)}


def expert(fast: bool, device: torch.device, config=T2V_A14B_DIT) -> WanDiT:
    """A T2V-A14B expert with the same random weights either way: bf16, or its block linears
    quantised to e4m3 with per-tensor scales and multiplied in fp8 (`fp8_e4m3fn_fast`)."""
    model = random_expert(config, device, fp8=fast)
    if fast:
        enable_fp8_matmul(model.blocks)
        model.set_attention_backend("auto")
        if device.type == "cuda":
            model.compile_blocks()
    else:
        model.set_attention_backend("sdpa")
    return model


def inputs(size: str, device: torch.device, config=T2V_A14B_DIT) -> tuple:
    height, width = SIZES[size] if device.type == "cuda" else (32, 48)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 21, height // 8, width // 8, generator=generator)
    context = torch.randn(512, config.text_dim, generator=generator) * 0.5
    return x.to(device, torch.bfloat16), torch.tensor([900.0], device=device), [context.to(device, torch.bfloat16)]


def compare(out: torch.Tensor, reference: torch.Tensor) -> dict:
    out, reference = out.float().flatten(), reference.float().flatten()
    return {"cosine": F.cosine_similarity(out, reference, dim=0).item(),
            "relative_l2": ((out - reference).norm() / reference.norm()).item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deadline", type=float, default=330, help="start no step after this many seconds")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU (checks the script)")
    args = parser.parse_args()
    start = time.perf_counter()
    device = torch.device("cpu" if args.dry_run else "cuda")
    config = T2V_A14B_DIT.tiny(num_layers=40, text_dim=64) if args.dry_run else T2V_A14B_DIT
    cuda = device.type == "cuda"
    report: dict = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
                    "results": [], "skipped": []}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    report["twin_check"] = twin_check() if cuda else {}
    models, outputs, medians = {}, {}, {}
    plan = [("bf16", "480p", 0), ("bf16", "480p", 40), ("fast", "480p", 0), ("fast", "480p", 40),
            ("fast", "720p", 40)]
    for kind, size, swapped in plan:
        label = f"{kind} {size} swap {swapped}"
        if time.perf_counter() - start > args.deadline:
            report["skipped"].append(label)
            continue
        if kind not in models:
            models[kind] = expert(kind == "fast", device, config)
        model = models[kind]
        if swapped and cuda:
            model.enable_block_swap(swapped, device=device, host_memory="pinned")
        elif swapped:  # the swap machinery with the CPU as its device
            model.placement.enable_swap(range(0, config.num_layers), "cpu", prefetch=1, pinned=False)
        else:
            model.disable_block_swap()
            model.to(device)
        x, t, context = inputs(size, device, config)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            begin = time.perf_counter()
            out = model(x, t, context)
            sync()
            first = time.perf_counter() - begin
            times = []
            for _ in range(args.repeats if size == "480p" else 1):
                begin = time.perf_counter()
                again = model(x, t, context)
                sync()
                times.append(time.perf_counter() - begin)
        medians[(kind, size, swapped)] = statistics.median(times)
        record = {"run": label, "first_call_s": first, "median_s": medians[(kind, size, swapped)], "times_s": times,
                  "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB if cuda else 0.0,
                  "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB if cuda else 0.0,
                  "repeat_bit_identical": torch.equal(out, again)}
        if kind == "fast":
            record["attention"] = resolve_backend("auto", device, torch.bfloat16)
            record["attention_reason"] = auto_reason(device, torch.bfloat16)
        if swapped and (kind, size, 0) in outputs:
            record["bit_identical_to_resident"] = torch.equal(out, outputs[(kind, size, 0)])
            record["ratio_to_resident"] = medians[(kind, size, swapped)] / medians[(kind, size, 0)]
        if kind == "fast" and ("bf16", size, 0) in outputs:
            record["vs_bf16"] = compare(out, outputs[("bf16", size, 0)])
        outputs[(kind, size, swapped)] = out
        report["results"].append(record)
        print(json.dumps(record), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(f"\n{'run':24} {'median s':>9} {'x resident':>10} {'peak GiB':>9} {'bit-ident':>9}  vs bf16")
    for r in report["results"]:
        vs = r.get("vs_bf16", {})
        print(f"{r['run']:24} {r['median_s']:9.3f} {r.get('ratio_to_resident', 1.0):10.3f} "
              f"{r['peak_allocated_gib']:9.2f} {str(r.get('bit_identical_to_resident', '-')):>9}  "
              f"{vs.get('cosine', float('nan')):.4f}")
    print("skipped:", report["skipped"], "| twin check:", json.dumps(report["twin_check"]))


if __name__ == "__main__":
    main()
