"""The fused elementwise kernels (wan_core.ops.fused) on a GPU at the full-size expert's width.

For each of the block's elementwise sites, at the token counts of 832x480x81 and 1280x720x81
(one batch, D = 5120, 40 heads): the exact torch path, the kernels without the residual
fusion ("norm" and "rope" kinds) and with it (all kinds); median time, the bytes the fused
pass must move (each input read once, each output written once) over that time, against the
device-to-device copy bandwidth measured in the same run; and the kernels' output against the
exact path (bf16: largest difference in units of the last place and fraction of values that
differ; float32 output and the residual sums: max relative error). Then a sweep of the
kernels' warps per row, and the sum over one block (norm1, the two residual sites, q and k)
times 40 blocks: what the kernels should save per forward.

    python bench/fused_elementwise.py [--tokens 32760 75600] [--json FILE] [--dry-run]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: its decorators read it

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.dit_vs_diffusers import timed  # noqa: E402
from wan_core.dit.model import LayerNorm, rope_angles  # noqa: E402
from wan_core.ops import fused  # noqa: E402
from wan_core.testing.compare import bf16_agreement, max_relative_error  # noqa: E402

BF16 = torch.bfloat16
EPS = 1e-6
MODES = {"exact": (), "norm_rope": ("norm", "rope"), "all": fused.KINDS}


def median_ms(fn, device, repeats: int = 30) -> float:
    return timed(fn, repeats, device, warmup=3)[0] * 1e3


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    source = torch.empty(2 ** 28, dtype=torch.float32, device=device).normal_()
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / (median_ms(lambda: target.copy_(source), device, 10) / 1e3)


def sites(tokens: int, dim: int, heads: int, device) -> dict:
    """name -> (run(), minimal bytes of the fused pass, the result to compare)."""
    generator = torch.Generator(device).manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, device=device, generator=generator)  # noqa: E731
    x = randn(1, tokens, dim) * 3 + 1
    y = randn(1, tokens, dim).to(BF16)
    shift, scale, gate = (v.contiguous() for v in (randn(1, 1, 3, dim) * 0.2).unbind(2))
    plain = LayerNorm(dim, EPS, elementwise_affine=False).to(device)
    affine = LayerNorm(dim, EPS, elementwise_affine=True).to(device)
    with torch.no_grad():
        affine.weight.normal_(1, 0.2, generator=generator)
        affine.bias.normal_(0, 0.2, generator=generator)
    affine = affine.to(BF16)
    grid = (21, 30, 52) if tokens == 32760 else (21, 45, 80) if tokens == 75600 else (1, 1, tokens)
    angles = rope_angles(grid, dim // heads, device)
    rotation = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)[:, None]
    q = randn(1, tokens, dim).to(BF16)
    q_weight = (1 + randn(dim) * 0.2).to(BF16)
    summed = torch.empty_like(x)
    in_place = x.clone()
    row = tokens * dim
    return {
        "norm1 + modulate": (lambda: fused.norm_modulate(x, shift, scale, norm=plain, dtype=BF16), row * (4 + 2)),
        "residual (gated) + norm3": (lambda: fused.residual_norm_modulate(summed, x, y, gate, None, None, norm=affine,
                                                                          dtype=BF16), row * (4 + 2 + 4 + 2)),
        "residual + norm2 + modulate": (lambda: fused.residual_norm_modulate(in_place, in_place, y, None, shift, scale,
                                                                             norm=plain, dtype=BF16),
                                        row * (4 + 2 + 4 + 2)),
        "q: RMSNorm + RoPE": (lambda: fused.rms_norm_rope(q, q_weight, EPS, rotation, heads), row * (2 + 2)),
        "MLP gated residual (one torch pass, no kernel)": (lambda: summed.addcmul_(y, gate), row * (4 + 2 + 4)),
    }, dict(x=x, y=y, shift=shift, scale=scale, gate=gate, plain=plain, affine=affine, rotation=rotation, q=q,
            q_weight=q_weight)


def agreement(t: dict, heads: int) -> dict:
    """The kernels against the exact path on the same inputs."""
    from wan_core.ops.kernels import fused_elementwise as kernels

    def outputs() -> dict:
        result = {"norm1": fused.norm_modulate(t["x"], t["shift"], t["scale"], norm=t["plain"], dtype=BF16),
                  "norm3_sum": torch.empty_like(t["x"]), "norm2_sum": t["x"].clone(),
                  "q": fused.rms_norm_rope(t["q"], t["q_weight"], EPS, t["rotation"], heads)}
        result["norm3"] = fused.residual_norm_modulate(result["norm3_sum"], t["x"], t["y"], t["gate"], None, None,
                                                       norm=t["affine"], dtype=BF16)
        result["norm2"] = fused.residual_norm_modulate(result["norm2_sum"], result["norm2_sum"], t["y"], None,
                                                       t["shift"], t["scale"], norm=t["plain"], dtype=BF16)
        return result

    with fused.only_fused(()):
        exact = outputs()
    with fused.only_fused(fused.KINDS):
        got = outputs()
    out = {}
    for name in ("norm1", "norm3", "norm2", "q"):
        out[f"{name}_bf16"] = bf16_agreement(got[name], exact[name])
    for name in ("norm3_sum", "norm2_sum"):
        out[name] = max_relative_error(got[name], exact[name])
    # the kernels' float32 arithmetic itself, against float32 torch
    reference = fused.modulate(F.layer_norm(t["x"], t["x"].shape[-1:], eps=EPS), t["shift"], t["scale"])
    out["norm1_fp32"] = max_relative_error(kernels.norm_modulate(t["x"], None, None, EPS, t["shift"], t["scale"],
                                                                 torch.float32), reference)
    q32, w32 = t["q"].float(), t["q_weight"].float()
    reference = fused.apply_rope(F.rms_norm(q32, w32.shape, w32, EPS).unflatten(-1, (heads, -1)), t["rotation"])
    out["q_fp32"] = max_relative_error(kernels.rms_norm_rope(q32, w32, EPS, t["rotation"], heads), reference)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[32760, 75600])
    parser.add_argument("--dim", type=int, default=5120)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--warps", type=int, nargs="*", default=[4, 8, 16], help="warps per row to sweep")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true",
                        help="small shapes on the CPU, the kernels in Triton's interpreter (checks the script)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        args.tokens, args.dim, args.heads = [24], 256, 2
    bandwidth = copy_bandwidth(device)
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
               "copy_bandwidth_gbs": bandwidth / 1e9, "dim": args.dim, "rows": []}
    print(json.dumps({"copy_bandwidth_gbs": bandwidth / 1e9}), flush=True)
    from wan_core.ops.kernels import fused_elementwise as kernels

    default_warps = kernels._warps
    for tokens in args.tokens:
        cases, tensors = sites(tokens, args.dim, args.heads, device)
        row = {"tokens": tokens, "sites": {}, "agreement": agreement(tensors, args.heads)}
        print(json.dumps({"tokens": tokens, "agreement": row["agreement"]}), flush=True)
        for name, (run, nbytes) in cases.items():
            times = {}
            for mode, kinds in MODES.items():
                with fused.only_fused(kinds):
                    times[mode] = median_ms(run, device)
            best = min(times.values())
            row["sites"][name] = {"ms": times, "fused_pass_bytes": nbytes,
                                  "fraction_of_copy_bandwidth": nbytes / (best / 1e3) / bandwidth}
            print(json.dumps({"tokens": tokens, "site": name, **row["sites"][name]}), flush=True)
        sweep = {}
        for warps in args.warps:
            kernels._warps = lambda block, warps=warps: warps
            with fused.only_fused(fused.KINDS):
                sweep[warps] = {name: median_ms(run, device) for name, (run, _) in cases.items() if "no kernel" not in name}
        kernels._warps = default_warps
        row["warps_sweep_ms"] = sweep
        print(json.dumps({"tokens": tokens, "warps_sweep_ms": sweep}), flush=True)
        block = {mode: sum(site["ms"][mode] * (2 if name.startswith("q:") else 1)  # q and k
                           for name, site in row["sites"].items() if "no kernel" not in name) for mode in MODES}
        row["per_block_ms"] = block
        row["per_forward_saving_ms"] = {mode: (block["exact"] - block[mode]) * args.blocks for mode in MODES}
        summary["rows"].append(row)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1))
        del cases, tensors
    print(f"\n{summary['device']}: copy {bandwidth / 1e9:.0f} GB/s (read + write)")
    for row in summary["rows"]:
        print(f"  {row['tokens']} tokens x {args.dim}:   exact ms   norm+rope ms   all ms   (fused pass: % of copy rate)")
        for name, site in row["sites"].items():
            ms = site["ms"]
            print(f"    {name:46s} {ms['exact']:8.3f}  {ms['norm_rope']:8.3f}  {ms['all']:8.3f}   "
                  f"({site['fraction_of_copy_bandwidth']:.0%})")
        print(f"    per block (q and k counted)                    {row['per_block_ms']['exact']:8.3f}  "
              f"{row['per_block_ms']['norm_rope']:8.3f}  {row['per_block_ms']['all']:8.3f}   -> saves "
              f"{row['per_forward_saving_ms']['all']:.0f} ms per {args.blocks}-block forward")
        print(f"    warps sweep (all kinds): {json.dumps(row['warps_sweep_ms'])}")
        print(f"    agreement: {json.dumps(row['agreement'])}")


if __name__ == "__main__":
    main()
