"""Host RAM with two experts: only the expert in use keeps its weights resident.

A 1.1 GB synthetic DiT file (full-width layers would make the CPU forward slow; a narrow model
with a wide MLP gives the same gigabytes for little arithmetic) is loaded twice, as the
high-noise and the low-noise expert, in a fresh process that samples twice with the hand-off
(wan_core.testing.host_memory). Each load maps the file separately, so the resident set counts
the pages each expert touched: without releasing the inactive expert the peak would grow by two
file sizes, with it by one.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from wan_core.configs import T2V_A14B_DIT
from wan_core.testing import write_streamed_dit

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set from /proc (Linux)")
def test_the_inactive_expert_gives_its_host_ram_back(tmp_path):
    config = replace(T2V_A14B_DIT, dim=1024, num_heads=8, ffn_dim=65536, num_layers=4)
    path = write_streamed_dit(tmp_path / "expert.safetensors", config)
    size = path.stat().st_size
    assert size > 2 ** 30
    try:
        done = subprocess.run([sys.executable, "-m", "wan_core.testing.host_memory", str(path), str(path),
                               "--runs", "2"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    finally:
        path.unlink()
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["same_result"]  # the released expert was mapped again and gave the same latent
    growth = report["runs"][-1]["peak"] - report["baseline_peak"]
    assert 0.9 * size < growth < 1.25 * size  # one expert's pages at a time, not two
    first, second = (run["rss"] for run in report["runs"])
    assert abs(second - first) < 0.05 * size


TRIM_PROBE = """
import json, torch
from pathlib import Path
from wan_core.offload import return_freed_host_memory
def rss():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024
tensors = [torch.ones(16384) for _ in range(4000)]  # 64 KiB each, from the C heap
del tensors[::2]  # 125 MiB of holes between live tensors: free() alone keeps them resident
before = rss()
trimmed = return_freed_host_memory()
print(json.dumps({"trimmed": trimmed, "released": before - rss()}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set from /proc (Linux)")
def test_sampling_hands_freed_heap_pages_back():
    """What keeps a long-lived process's RSS flat from run to run: `sample` ends with
    return_freed_host_memory(), which gives the heap's free pages back (glibc)."""
    done = subprocess.run([sys.executable, "-c", TRIM_PROBE], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if not report["trimmed"] and report["released"] == 0:
        pytest.skip("this C library has no malloc_trim")
    assert report["released"] > 100 * 2 ** 20
