"""Attention back-ends and fp8 linear layers at Wan's shapes on one GPU, in one process.

Attention: q, k, v [1, L, 40, 128] bf16 (random normal), L = 32760 (A14B at 832x480x81) and
75600 (1280x720x81). Each back-end's median time, TFLOP/s (4 L^2 d H FLOP, the two products),
and its output against bf16 SDPA (cuDNN) and against float32 (cosine, relative L2):
cuDNN SDPA and flash SDPA (torch), the package's int8_fp8_triton kernel in several tilings
(its quantisation pass timed apart too), and, where installed, cuDNN's fp8 SDPA through
nvidia-cudnn-frontend and comfy-kitchen's int8 attention. The kernel is also checked against
its plain-torch twin on the GPU.

Linear: x [L, K] bf16 times the stored e4m3 weight [N, K]: bf16 F.linear, torch._scaled_mm with
the activations already quantised, FP8Linear's fp8_linear eager and torch.compile'd, at the
14B model's (K, N) pairs.

    python bench/attention_kernels.py [--lengths 32760 75600] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.dit_vs_diffusers import timed  # noqa: E402
from wan_core.ops import int8_attention  # noqa: E402
from wan_core.ops.linear import fp8_linear, fp8_linear_reference, quantize_fp8, quantize_rows_fp8  # noqa: E402

# (block_m, block_n, num_warps, num_stages, warp_specialize) of the int8_fp8_triton kernel to time
TILINGS = ((128, 64, 4, 3, 0), (128, 64, 8, 3, 0), (128, 128, 8, 2, 0), (128, 128, 8, 3, 0))
HEADS, HEAD_DIM = 40, 128


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    return timed(fn, repeats, warmup=warmup)[0]


def compare(out: torch.Tensor, reference: torch.Tensor) -> dict:
    out, reference = out.float().flatten(), reference.float().flatten()
    return {"cosine": F.cosine_similarity(out, reference, dim=0).item(),
            "relative_l2": ((out - reference).norm() / reference.norm()).item()}


def sdpa_with(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return run


def triton_tiling(block_m: int, block_n: int, warps: int, stages: int, warp_specialize: int):
    """(the kernel with this tiling, a function timing its two passes apart)."""
    from wan_core.ops.kernels import int8_fp8_attention as kernels

    def run(q, k, v):
        quantized = kernels.quantize(q, k, v, block_m=block_m, block_n=block_n)
        return kernels.attention(quantized, q.dtype, num_warps=warps, num_stages=stages, warp_specialize=bool(warp_specialize))

    def parts(q, k, v, repeats):
        quantized = kernels.quantize(q, k, v, block_m=block_m, block_n=block_n)
        return {"quantize_s": median_seconds(lambda: kernels.quantize(q, k, v, block_m=block_m, block_n=block_n),
                                             repeats),
                "kernel_s": median_seconds(lambda: kernels.attention(quantized, q.dtype, num_warps=warps,
                                                                     num_stages=stages,
                                                                     warp_specialize=bool(warp_specialize)), repeats)}
    return run, parts


def cudnn_fp8_sdpa():
    """cuDNN's fp8 SDPA forward through the frontend's graph API: q, k (smoothed first), v in e4m3
    with one scale each, p in e4m3 times 448; the output in bf16 where cuDNN allows it, else e4m3
    with a scale from max |v| (|o| <= max |v|)."""
    import cudnn

    handle = cudnn.create_handle()
    graphs = {}

    def build(b, h, s, d, out_type):
        graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT, handle=handle)
        stride = [s * h * d, d, h * d, 1]  # [B, H, S, D] views of [B, S, H, D] tensors
        q, k, v = (graph.tensor(dim=[b, h, s, d], stride=stride, data_type=cudnn.data_type.FP8_E4M3, name=n)
                   for n in "qkv")
        scalars = [graph.tensor(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.FLOAT, name=n)
                   for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
        o, _, amax_s, amax_o = graph.sdpa_fp8(q=q, k=k, v=v, descale_q=scalars[0], descale_k=scalars[1],
                                              descale_v=scalars[2], descale_s=scalars[3], scale_s=scalars[4],
                                              scale_o=scalars[5], is_inference=True, attn_scale=d ** -0.5,
                                              use_causal_mask=False)
        o.set_output(True).set_dim([b, h, s, d]).set_stride(stride).set_data_type(out_type)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
        graph.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        return graph, (q, k, v), scalars, (o, amax_s, amax_o)

    def run(q_in, k_in, v_in):
        b, s, h, d = q_in.shape
        if (b, h, s, d) not in graphs:
            errors = []
            for out_type in (cudnn.data_type.BFLOAT16, cudnn.data_type.FP8_E4M3):
                try:
                    graphs[b, h, s, d] = build(b, h, s, d, out_type), out_type == cudnn.data_type.BFLOAT16
                    break
                except Exception as e:  # noqa: BLE001 - try the next output type
                    errors.append(f"{out_type}: {e}")
            else:
                raise RuntimeError("; ".join(errors))
        (graph, tensors, scalars, (o, amax_s, amax_o)), out_bf16 = graphs[b, h, s, d]
        data, scales = {}, []
        for tensor, value in zip(tensors, (q_in, k_in - k_in.mean(dim=1, keepdim=True), v_in)):
            scale = value.abs().amax().float().clamp(min=1e-12) / 448
            data[tensor] = (value.float() / scale).to(torch.float8_e4m3fn)
            scales.append(scale)
        one = torch.ones((), device=q_in.device)
        out_scale = one if out_bf16 else 448 / v_in.abs().amax().float()
        for tensor, value in zip(scalars, (*scales, one / 448, one * 448, out_scale)):
            data[tensor] = value.reshape(1, 1, 1, 1).float().contiguous()
        out = torch.empty(q_in.shape, device=q_in.device, dtype=torch.bfloat16 if out_bf16 else torch.float8_e4m3fn)
        data[o] = out
        data[amax_s] = torch.empty(1, 1, 1, 1, device=q_in.device)
        data[amax_o] = torch.empty(1, 1, 1, 1, device=q_in.device)
        graph.execute(data, torch.empty(graph.get_workspace_size(), device=q_in.device, dtype=torch.uint8),
                      handle=handle)
        return out if out_bf16 else (out.float() / out_scale).to(torch.bfloat16)
    return run


def kitchen_int8():
    import comfy_kitchen

    def run(q, k, v):
        return comfy_kitchen.int8_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return run


def attention_table(lengths, repeats: int, rows: list, on_row=None, tilings=TILINGS, others: bool = True) -> list[dict]:
    """Time every back-end at each length, appending to `rows` (`on_row` after each, so that a
    back-end that crashes the process leaves the others' numbers behind)."""
    from torch.nn.attention import SDPBackend

    candidates = {"sdpa_cudnn": (lambda: sdpa_with(SDPBackend.CUDNN_ATTENTION), None),
                  "sdpa_flash": (lambda: sdpa_with(SDPBackend.FLASH_ATTENTION), None)}
    for tiling in tilings:
        run, parts = triton_tiling(*tiling)
        candidates["int8_fp8_triton %d/%d w%d s%d ws%d" % tiling] = ((lambda run=run: run), parts)
    if others:
        candidates["cudnn_fp8 (frontend)"] = (cudnn_fp8_sdpa, None)
        candidates["comfy_kitchen int8"] = (kitchen_int8, None)
    made = {}
    for length in lengths:
        generator = torch.Generator(device="cuda").manual_seed(length)
        q, k, v = (torch.randn(1, length, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
                   for _ in range(3))
        flop = 4 * length * length * HEAD_DIM * HEADS
        reference = sdpa_with(SDPBackend.CUDNN_ATTENTION)(q, k, v)
        exact = sdpa_with(SDPBackend.EFFICIENT_ATTENTION)(q.float(), k.float(), v.float())
        for name, (factory, parts) in candidates.items():
            row = {"L": length, "backend": name}
            try:
                if name not in made:
                    made[name] = factory()
                fn = made[name]
                out = fn(q, k, v)
                seconds = median_seconds(lambda: fn(q, k, v), repeats)
                row.update(seconds=seconds, tflops=flop / seconds / 1e12, vs_bf16_sdpa=compare(out, reference),
                           vs_fp32=compare(out, exact))
                if parts is not None:
                    row.update(parts(q, k, v, repeats))
            except Exception as e:  # noqa: BLE001 - a back-end that cannot run here is reported, not fatal
                row["error"] = f"{type(e).__name__}: {e}"[:400]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if on_row:
                on_row()
        del q, k, v, reference, exact
        torch.cuda.empty_cache()
    return rows


def twin_check() -> dict:
    """The compiled kernel against its plain-torch twin on the GPU (same quantised inputs)."""
    from wan_core.ops.kernels import int8_fp8_attention as kernels

    generator = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(2, 3000, 8, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
               for _ in range(3))
    k = k + 2.0  # a shared offset, which the smoothing removes
    result = {}
    for name, (q_in, k_in, v_in) in {"self 3000": (q, k, v), "cross 3000x512": (q, k[:, :512], v[:, :512])}.items():
        quantized = kernels.quantize(q_in, k_in, v_in, block_m=int8_attention.BLOCK_M, block_n=int8_attention.BLOCK_N)
        twin = int8_attention.quantize_reference(q_in, k_in, v_in, block_m=int8_attention.BLOCK_M,
                                                 block_n=int8_attention.BLOCK_N)
        out = kernels.attention(twin, torch.float32)
        result[name] = {"quantized_int8_mismatch": (quantized.q != twin.q).float().mean().item(),
                        "quantized_v_mismatch": (quantized.v.float() != twin.v.float()).float().mean().item(),
                        "kernel_vs_twin": compare(out, int8_attention.attention_reference(twin)),
                        "vs_sdpa_fp32": compare(out, F.scaled_dot_product_attention(
                            q_in.float().transpose(1, 2), k_in.float().transpose(1, 2),
                            v_in.float().transpose(1, 2)).transpose(1, 2))}
    print(json.dumps({"twin_check": result}), flush=True)
    return result


def linear_table(lengths, repeats: int) -> list[dict]:
    rows = []
    compiled = torch.compile(fp8_linear)
    for length in lengths:
        for k_dim, n_dim in ((5120, 5120), (5120, 13824), (13824, 5120)):
            generator = torch.Generator(device="cuda").manual_seed(k_dim + n_dim)
            x = torch.randn(length, k_dim, device="cuda", dtype=torch.bfloat16, generator=generator)
            weight = torch.randn(n_dim, k_dim, device="cuda", generator=generator) / math.sqrt(k_dim)
            bias = torch.randn(n_dim, device="cuda", dtype=torch.bfloat16, generator=generator) * 0.1
            stored, scale = quantize_fp8(weight)
            dequantized = (stored.float() * scale).to(torch.bfloat16)
            flop = 2 * length * k_dim * n_dim
            row = {"M": length, "K": k_dim, "N": n_dim}
            try:
                exact = F.linear(x, dequantized, bias)
                row["bf16_s"] = median_seconds(lambda: F.linear(x, dequantized, bias), repeats)
                xq, x_scale = quantize_rows_fp8(x)
                row_scale = scale.reshape(1, 1).expand(1, n_dim).contiguous()
                row["scaled_mm_only_s"] = median_seconds(lambda: torch._scaled_mm(
                    xq, stored.t(), scale_a=x_scale, scale_b=row_scale, bias=bias, out_dtype=torch.bfloat16), repeats)
                row["fp8_linear_eager_s"] = median_seconds(lambda: fp8_linear(x, stored, scale, bias), repeats)
                out = compiled(x, stored, scale, bias)
                row["fp8_linear_compiled_s"] = median_seconds(lambda: compiled(x, stored, scale, bias), repeats)
                row["tflops"] = {key[:-2]: flop / row[key] / 1e12 for key in list(row) if key.endswith("_s")}
                row["vs_bf16"] = compare(out, exact)
                row["vs_twin"] = compare(out, fp8_linear_reference(x, stored, scale, bias))
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def best_tiling(rows) -> list[int] | None:
    """The int8_fp8_triton tiling (block_m, block_n, warps, stages, warp_specialize) with the least
    total time over the lengths timed."""
    if not isinstance(rows, list):
        return None
    totals = {}
    for row in rows:
        if row["backend"].startswith("int8_fp8_triton") and "seconds" in row:
            totals.setdefault(row["backend"], []).append(row["seconds"])
    complete = {name: sum(t) for name, t in totals.items() if len(t) == max(map(len, totals.values()))}
    if not complete:
        return None
    name = min(complete, key=complete.get).split()[1:]
    block_m, block_n = name[0].split("/")
    return [int(block_m), int(block_n), int(name[1][1:]), int(name[2][1:]), int(name[3][2:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32760, 75600])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tilings", nargs="+", default=None, metavar="BM,BN,WARPS,STAGES,WS",
                        help="time these int8_fp8_triton tilings instead of the default set")
    parser.add_argument("--no-others", action="store_true", help="skip cudnn_fp8, comfy_kitchen and the linear table")
    args = parser.parse_args()
    tilings = TILINGS if args.tilings is None else [tuple(int(x) for x in t.split(",")) for t in args.tilings]
    started = time.perf_counter()
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    def save():
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1))

    summary["attention"] = []
    for name, section in (("twin_check", twin_check),
                          ("attention", lambda: attention_table(args.lengths, args.repeats, summary["attention"], save,
                                                                tilings, not args.no_others)),
                          ("linear", lambda: [] if args.no_others else linear_table(args.lengths, args.repeats))):
        try:
            summary[name] = section()
        except Exception:  # noqa: BLE001 - keep the other sections' numbers
            summary[name] = {"error": traceback.format_exc()[-1500:]}
            print(summary[name]["error"], flush=True)
        summary[f"{name}_elapsed_s"] = time.perf_counter() - started
        save()
    best = best_tiling(summary.get("attention"))
    print(f"\n{summary['device']}, {time.perf_counter() - started:.0f} s; fastest tiling (block_m, block_n, warps, "
          f"stages) over all lengths: {best}")
    for row in summary.get("attention", []) if isinstance(summary.get("attention"), list) else []:
        if "error" in row:
            print(f"  L={row['L']:6d} {row['backend']:32s} error: {row['error'][:90]}")
        else:
            extra = (f"  (quantise {row['quantize_s'] * 1e3:.1f} ms, kernel {row['kernel_s'] * 1e3:.1f} ms)"
                     if "kernel_s" in row else "")
            print(f"  L={row['L']:6d} {row['backend']:32s} {row['seconds'] * 1e3:8.2f} ms {row['tflops']:6.0f} TFLOP/s "
                  f"cos {row['vs_bf16_sdpa']['cosine']:.5f} rel {row['vs_bf16_sdpa']['relative_l2']:.4f} "
                  f"(fp32: cos {row['vs_fp32']['cosine']:.5f}){extra}")
    for row in summary.get("linear", []) if isinstance(summary.get("linear"), list) else []:
        if "error" in row:
            print(f"  M={row['M']} {row['K']}x{row['N']} error: {row['error'][:100]}")
        else:
            print(f"  M={row['M']} {row['K']}x{row['N']}: " + ", ".join(
                f"{k} {v:.0f}" for k, v in row["tflops"].items()) + f" TFLOP/s; cos {row['vs_bf16']['cosine']:.5f}")


if __name__ == "__main__":
    main()
