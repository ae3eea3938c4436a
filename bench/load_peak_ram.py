"""Peak host RAM of `load_dit` against the size of the checkpoint it reads.

Writes (once) a synthetic safetensors file shaped like the t2v-A14B DiT but with fewer blocks,
then loads it in a fresh subprocess and reports that process's peak resident set size
(VmHWM, which counts the memory-mapped file pages it touched) right after the imports, after
`load_dit`, and after every weight has been read once (as the first forward pass does), next
to the file size. A loader that streams tensors straight into the model ends near
baseline + 1x the model; one that makes a full extra copy near baseline + 2x.

    python bench/load_peak_ram.py [--layers 5] [--dtype bf16] [--load-dtype bf16] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wan_core.configs import T2V_A14B_DIT  # noqa: E402
from wan_core.testing.host_memory import rss_bytes as _rss_bytes  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def measure(path: Path, dtype: torch.dtype) -> dict:
    """Run in a fresh process: import, load, then read every parameter once (as a forward pass
    would), and report the peak RSS after each step."""
    import wan_core.dit  # noqa: F401  (import cost belongs to the baseline)
    from wan_core.loading import load_dit

    baseline = _rss_bytes("VmHWM")
    start = time.perf_counter()
    model = load_dit(path, dtype=dtype, device="cpu")
    seconds = time.perf_counter() - start
    after_load = _rss_bytes("VmHWM")
    rss_after_load = _rss_bytes("VmRSS")
    checksum = sum(float(p.max()) for p in model.parameters())  # touches every page, no copy
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"baseline_rss": baseline, "peak_rss_load": after_load, "rss_after_load": rss_after_load,
            "peak_rss_used": _rss_bytes("VmHWM"),
            "param_bytes": params, "load_s": seconds, "checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=5, help="transformer blocks (t2v-A14B has 40)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the file")
    parser.add_argument("--load-dtype", choices=sorted(DTYPES), default=None, help="model dtype (default: --dtype)")
    parser.add_argument("--file", type=Path, default=Path("/tmp/wan_peak_ram.safetensors"))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic file afterwards")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    args.load_dtype = args.load_dtype or args.dtype
    if args.measure:
        print(json.dumps(measure(args.file, DTYPES[args.load_dtype])))
        return

    if not args.file.exists():
        from wan_core.testing import write_streamed_dit

        write_streamed_dit(args.file, replace(T2V_A14B_DIT, num_layers=args.layers), dtype=dtype)
    size = args.file.stat().st_size
    out = subprocess.run([sys.executable, __file__, "--measure", "--file", str(args.file), "--dtype", args.dtype,
                          "--load-dtype", args.load_dtype],
                         check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 2 ** 30

    def over_baseline(key: str) -> str:
        extra = r[key] - r["baseline_rss"]
        return f"{r[key] / gib:.2f} GiB (+{extra / gib:.2f} GiB = {extra / size:.2f}x the file)"

    print(f"file {args.file} ({args.dtype}): {size / gib:.2f} GiB; loaded as {args.load_dtype}: "
          f"parameters {r['param_bytes'] / gib:.2f} GiB; load_dit took {r['load_s']:.1f} s")
    print(f"RSS after imports {r['baseline_rss'] / gib:.2f} GiB")
    print(f"peak RSS after load_dit            {over_baseline('peak_rss_load')}")
    print(f"RSS when load_dit has returned     {over_baseline('rss_after_load')}")
    print(f"peak RSS after reading every weight {over_baseline('peak_rss_used')}")
    if not args.keep:
        os.remove(args.file)


if __name__ == "__main__":
    main()
