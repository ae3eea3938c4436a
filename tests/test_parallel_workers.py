"""The persistent worker group behind the multi-GPU sampler (issue 11, items 4 and 5), on CPU
workers with gloo: queued prompts through the nodes give the one-process latents from the same
processes, an interrupt stops within one step and leaves the group up, a killed worker is a
clear error and no process of the group survives it, nor the death of the caller."""
from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wan_core.parallel.workers import ExpertSource, GroupSpec, WorkerGroup, WorkerGroupError
from wan_core.pipeline import GenerationInterrupted
from wan_core.testing.dit import write_dit_checkpoint
from wan_core.testing.parallel import GRIDS, config, inputs
from siblings import sibling

RTOL = 1e-5
WAIT_S = 60  # every wait on the workers in these tests is bounded
WORKER_MODULE = "wan_core.parallel.workers"


def worker_processes() -> list[int]:
    """Pids of every live worker process on the machine started from this checkout's module
    whose parent is this test process (read from the process table)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        if WORKER_MODULE.encode() in cmdline and "State:\tZ" not in status:
            found.append(int(entry.name))
    return found


def gone(pids: list[int], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not set(pids) & set(worker_processes()):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> tuple[ExpertSource, ExpertSource]:
    folder = tmp_path_factory.mktemp("experts")
    paths = [write_dit_checkpoint(folder / f"expert{seed}", "t2v", "comfy", config=config("t2v"), seed=seed)
             for seed in (1, 2)]
    return tuple(ExpertSource(str(p), "float32") for p in paths)


def _job(seed: int = 0) -> dict:
    x, _, context, context_null = inputs("t2v", GRIDS["tokens15"], seed=seed)
    return {"experts": [0, 1], "sample": dict(noise=x[:1], context=context[:1], context_null=context_null[:1],
                                              steps=4, shift=5.0, guide_scale=(3.0, 4.0), boundary=0.9)}


@pytest.fixture
def group(experts):
    group = WorkerGroup(GroupSpec(("cpu", "cpu"), experts), ready_timeout=WAIT_S)
    yield group
    group.close()
    assert gone(group.pids, within=10)


def test_an_interrupt_stops_the_workers_within_one_step_and_the_group_stays(group):
    steps = []
    with pytest.raises(GenerationInterrupted, match=r"after step [12] of 4"):
        group.run(_job(), callback=lambda step, total: steps.append(step), should_stop=lambda: len(steps) >= 1,
                  step_timeout=WAIT_S)
    assert steps and steps[-1] <= 2  # asked during step 2 at the latest; at most that step finished
    pids = group.pids
    done = []
    group.run(_job(), callback=lambda step, total: done.append(step), step_timeout=WAIT_S)
    assert done == [1, 2, 3, 4] and group.pids == pids and not group.closed


def test_a_host_interrupt_raised_by_the_progress_callback_also_stops_the_workers(group):
    class Cancelled(Exception):
        pass

    def cancel(step, total):
        raise Cancelled

    with pytest.raises(Cancelled):
        group.run(_job(), callback=cancel, step_timeout=WAIT_S)
    assert group.run(_job(), step_timeout=WAIT_S).shape == (1, 16, *GRIDS["tokens15"])


def test_a_killed_worker_is_a_clear_error_and_leaves_no_process(group):
    pids = group.pids
    assert sorted(worker_processes()) == sorted(pids)

    def kill_rank_1(step, total):
        if step == 1:
            os.kill(pids[1], signal.SIGKILL)

    with pytest.raises(WorkerGroupError, match=r"worker 1 of 2 \(cpu, pid \d+\) ended with signal SIGKILL; "
                                               r"the worker group was stopped"):
        group.run(_job(), callback=kill_rank_1, step_timeout=WAIT_S)
    assert group.closed and gone(pids, within=10)
    with pytest.raises(WorkerGroupError, match="was stopped"):
        group.run(_job())


def test_workers_end_when_their_caller_dies(experts, tmp_path):
    """The caller is SIGKILLed (no clean-up runs): the workers see their channel close and leave."""
    script = (f"import sys; from wan_core.parallel.workers import *\n"
              f"g = WorkerGroup(GroupSpec(('cpu', 'cpu'), (ExpertSource({experts[0].path!r}, 'float32'),)))\n"
              f"print(*g.pids, flush=True)\nimport time; time.sleep(600)\n")
    root = str(Path(__file__).resolve().parents[1])
    caller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": root})
    try:
        line = caller.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2 and set(pids) <= set(worker_processes())
    finally:
        caller.kill()
        caller.wait(timeout=WAIT_S)
    assert gone(pids, within=15)


def test_a_worker_that_cannot_load_reports_why(tmp_path):
    spec = GroupSpec(("cpu", "cpu"), (ExpertSource(str(tmp_path / "missing.safetensors"), "float32"),))
    with pytest.raises(WorkerGroupError, match=r"worker \d \(cpu\) failed, so the worker group was stopped: "
                                               r"checkpoint not found: .*missing\.safetensors$"):
        WorkerGroup(spec, ready_timeout=WAIT_S)
    assert gone(worker_processes(), within=10)


# --- through the nodes ----------------------------------------------------------------------------

nodes_test = sibling("test_nodes")
parallel_nodes = importlib.import_module("comfyui_wan22_pack.nodes.parallel")
samplers = nodes_test.samplers


@pytest.fixture
def models(tmp_path_factory, monkeypatch):
    root = nodes_test.write_tiny_models(tmp_path_factory.mktemp("models"))
    monkeypatch.setattr(nodes_test.host, "_plain_folders", {})
    for kind in nodes_test.MODEL_FOLDERS:
        nodes_test.host.set_model_folders(kind, [root / kind])
    yield root
    parallel_nodes.workers.release()


def test_five_queued_prompts_run_on_one_persistent_group_like_one_process(models):
    high, _ = nodes_test._load("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors")
    low, _ = nodes_test._load("wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors")
    (conditioning,) = samplers.W22TextEncode().encode(nodes_test._encoder(), "a fox", "")
    (latent,) = samplers.W22VideoLatent().make(high, batch_size=1, **nodes_test.TINY)
    (parallel,) = parallel_nodes.W22MultiGPU().settings("cpu,cpu", cfg_parallel=True, dit_fsdp=False)
    pids = None
    for seed in range(5):
        serial = nodes_test._sample(high, conditioning, latent, low=low, seed=seed)["samples"]
        on_workers = nodes_test._sample(high, conditioning, latent, low=low, seed=seed, parallel=parallel)["samples"]
        assert ((on_workers - serial).abs().max() / serial.abs().max()).item() <= RTOL
        group = parallel_nodes.workers.group
        pids = pids or group.pids
        assert group.pids == pids  # the same processes, models loaded once
    parallel_nodes.workers.release()
    assert parallel_nodes.workers.group is None and gone(pids, within=10)


def test_the_sampler_refuses_a_split_the_heads_do_not_allow_before_starting_workers(models):
    high, _ = nodes_test._load("wan2.2_ti2v_5B_fp16.safetensors")  # the tiny models have 2 heads
    (conditioning,) = samplers.W22TextEncode().encode(nodes_test._encoder(), "a fox", "")
    (latent,) = samplers.W22VideoLatent().make(high, batch_size=1, **nodes_test.TINY)
    (parallel,) = parallel_nodes.W22MultiGPU().settings("cpu,cpu,cpu", cfg_parallel=False, dit_fsdp=False)
    with pytest.raises(ValueError, match="ulysses_size 3 does not divide the 2 attention heads"):
        nodes_test._sample(high, conditioning, latent, parallel=parallel)
    assert parallel_nodes.workers.group is None and not worker_processes()


@pytest.mark.parametrize("gpus, cfg_parallel, message", [
    ("", False, "gpus must list the GPUs to use"),
    ("0,cpu", False, "not a mix"),
    ("cpu", False, "names one device; for one GPU leave the parallel input unconnected"),
    ("cpu,cpu,cpu", True, "give an even number of gpus, got 3"),
    ("0,0", False, "names a GPU twice"),
    ("0,1", False, "GPU 0 does not exist" if not torch.cuda.is_available() else "does not exist"),
])
def test_multi_gpu_settings_are_checked_with_what_to_do(gpus, cfg_parallel, message):
    if gpus == "0,1" and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    with pytest.raises(ValueError, match=message):
        parallel_nodes.W22MultiGPU().settings(gpus, cfg_parallel=cfg_parallel, dit_fsdp=False)
