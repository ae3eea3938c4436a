"""Host RAM of MoE sampling runs with two experts, measured in a fresh process.

    python -m wan_core.testing.host_memory HIGH.safetensors LOW.safetensors [--runs 2]

loads both experts with `load_dit` (bf16, memory-mapped), runs `sample` with the expert
hand-off `--runs` times on a tiny latent, and prints one JSON line with the process's peak
resident set (VmHWM, which counts the memory-mapped pages it touched) and its resident set
(VmRSS) after the imports, after loading, and after each run, plus whether every run gave the
same latent. Used by the host-memory test and by bench/two_expert_rss.py.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def rss_bytes(field: str) -> int:
    """VmRSS or VmHWM of this process (Linux). VmHWM is this process image's own peak; ru_maxrss
    would also carry the parent's RSS at fork time across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def measure(high: Path, low: Path, runs: int, release: bool) -> dict:
    import wan_core.offload
    from wan_core.loading import load_dit
    from wan_core.sampling import sample
    from wan_core.sampling.schedule import schedule

    report = {"baseline_rss": rss_bytes("VmRSS"), "baseline_peak": rss_bytes("VmHWM")}
    experts = (load_dit(high, dtype=torch.bfloat16), load_dit(low, dtype=torch.bfloat16))
    if not release:  # the behaviour before host weights could be released: keep both mapped
        wan_core.offload.release_host_weights = lambda model: False
        import wan_core.sampling.sampler as sampler
        sampler.release_host_weights = wan_core.offload.release_host_weights
    report.update(loaded_rss=rss_bytes("VmRSS"), loaded_peak=rss_bytes("VmHWM"))
    config = experts[0].config
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, 1, 2, 2, generator=generator)
    context = [torch.randn(8, config.text_dim, generator=generator)]
    _, timesteps = schedule("unipc", 2, 1.0)
    boundary = float(timesteps[0] + timesteps[1]) / 2000  # step 1: high-noise expert, step 2: low-noise
    latents, report["runs"] = [], []
    for _ in range(runs):
        latents.append(sample(experts, noise, context, None, steps=2, shift=1.0, guide_scale=1.0, boundary=boundary))
        report["runs"].append({"rss": rss_bytes("VmRSS"), "peak": rss_bytes("VmHWM")})
    report["same_result"] = all(torch.equal(latent, latents[0]) for latent in latents)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("high", type=Path)
    parser.add_argument("low", type=Path)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--keep-both", action="store_true", help="do not release the inactive expert (comparison)")
    args = parser.parse_args()
    print(json.dumps(measure(args.high, args.low, args.runs, release=not args.keep_both)))


if __name__ == "__main__":
    main()
