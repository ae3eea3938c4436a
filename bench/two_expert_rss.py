"""Peak host RAM of MoE sampling with two full-width experts, with and without releasing the
inactive one (CPU).

Writes two synthetic T2V-A14B-shaped experts with `--layers` blocks each (bf16, 5 blocks ~ 3.7
GiB), then in fresh processes (wan_core.testing.host_memory) loads both and samples with the
hand-off: once keeping both experts' weights mapped (the behaviour before), once releasing the
inactive expert at each hand-off, `--runs` times in a row. Prints the peak resident set against
the file size and the resident set after each run.

    python bench/two_expert_rss.py [--layers 5] [--runs 10] [--dir /tmp] [--keep]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wan_core.configs import T2V_A14B_DIT  # noqa: E402
from wan_core.testing import write_streamed_dit  # noqa: E402

GIB = 2 ** 30


def measure(high: Path, low: Path, runs: int, keep_both: bool) -> dict:
    command = [sys.executable, "-m", "wan_core.testing.host_memory", str(high), str(low), "--runs", str(runs)]
    done = subprocess.run(command + (["--keep-both"] if keep_both else []), check=True, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic files")
    args = parser.parse_args()
    config = replace(T2V_A14B_DIT, num_layers=args.layers)
    files = [args.dir / f"wan_rss_{role}_{args.layers}.safetensors" for role in ("high", "low")]
    for seed, path in enumerate(files):
        if not path.exists():
            write_streamed_dit(path, config, seed=seed)
    size = files[0].stat().st_size
    try:
        results = {"keep both": measure(*files, runs=2, keep_both=True),
                   "release inactive": measure(*files, runs=args.runs, keep_both=False)}
    finally:
        if not args.keep:
            for path in files:
                path.unlink()
    print(f"two experts of {size / GIB:.2f} GiB each ({args.layers} blocks, bf16)")
    print("| mode | RSS after imports | peak RSS | peak - imports | (peak - imports) / file | RSS after each run |")
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        peak = max(run["peak"] for run in r["runs"])
        extra = peak - r["baseline_rss"]
        runs = ", ".join(f"{run['rss'] / GIB:.2f}" for run in r["runs"])
        print(f"| {mode} | {r['baseline_rss'] / GIB:.2f} GiB | {peak / GIB:.2f} GiB | {extra / GIB:.2f} GiB | "
              f"{extra / size:.2f} | {runs} GiB |")
        assert r["same_result"], f"{mode}: the runs gave different latents"
    rss = [run["rss"] for run in results["release inactive"]["runs"]]
    if len(rss) > 2:
        print(f"runs 3..{len(rss)} against run 2: RSS within {max(abs(x - rss[1]) for x in rss[2:]) / rss[1]:.2%}")


if __name__ == "__main__":
    main()
