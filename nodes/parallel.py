"""Several GPUs for one video inside ComfyUI: the Multi-GPU settings node and the sampler's hand-off
to a persistent group of worker processes (wan_core.parallel.workers).

The group is started by the first prompt that needs it (each worker loads the experts onto its
GPU, which takes as long as loading them once) and kept for the next prompts while the same
GPUs, models and settings are asked for; other settings stop it and start a new one. ComfyUI's
"Unload models" / "Free model and node cache" (and its need for room) stop it through
`host.MemoryClaim`; so does leaving ComfyUI.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

from wan_core.parallel import check_heads
from wan_core.parallel.workers import GroupSpec, WorkerGroup, WorkerGroupError
from wan_core.pipeline import GenerationInterrupted

from . import host

CPU = "cpu"


def parse_devices(gpus: str) -> tuple[str, ...]:
    """"0,1" -> ("cuda:0", "cuda:1"); "cpu,cpu" -> two CPU workers (gloo; for machines without GPUs)."""
    if not isinstance(gpus, str) or not gpus.strip():
        raise ValueError(f"gpus must list the GPUs to use, e.g. '0,1', got {gpus!r}")
    names = [part.strip().lower() for part in gpus.split(",")]
    if all(name == CPU for name in names):
        return tuple(CPU for _ in names)
    if not all(name.isdigit() for name in names):
        raise ValueError(f"gpus={gpus!r}: give CUDA device numbers separated by commas (e.g. '0,1,2,3'), or 'cpu' "
                         f"entries for CPU workers; not a mix")
    indices = [int(name) for name in names]
    if len(set(indices)) != len(indices):
        raise ValueError(f"gpus={gpus!r} names a GPU twice; each worker needs a GPU of its own")
    available = torch.cuda.device_count()
    missing = [i for i in indices if i >= available]
    if missing:
        raise ValueError(f"gpus={gpus!r}: GPU {missing[0]} does not exist; this machine has {available} "
                         f"({', '.join(map(str, range(available))) or 'none'})")
    return tuple(f"cuda:{i}" for i in indices)


class W22MultiGPU:
    DESCRIPTION = ("Runs the MoE sampler on several GPUs at once: the video's tokens are split over the GPUs "
                   "(Ulysses sequence parallelism), optionally with the two CFG passes on two halves of them and "
                   "the weights sharded (FSDP). One worker process per GPU loads the models on the first run and "
                   "keeps them for the next prompts; Unload models stops the workers.")
    CATEGORY = "Wan2.2/sampling"
    RETURN_TYPES = ("WANPARALLEL",)
    RETURN_NAMES = ("parallel",)
    OUTPUT_TOOLTIPS = ("Connect to the parallel input of Wan2.2 MoE Sampler.",)
    FUNCTION = "settings"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "gpus": ("STRING", {
                "default": "0,1",
                "tooltip": "The CUDA devices to use, comma-separated (one worker each). Their count must divide "
                           "the model's heads (40 for A14B: 2, 4, 5, 8; 24 for the 5B), doubled with cfg_parallel."}),
            "cfg_parallel": ("BOOLEAN", {
                "default": False,
                "tooltip": "Run the conditional and unconditional passes at the same time on two halves of the "
                           "GPUs (needs an even count)."}),
            "dit_fsdp": ("BOOLEAN", {
                "default": False,
                "tooltip": "Shard each expert's weights over the GPUs (each holds 1/N), for GPUs too small to hold "
                           "a whole 14B expert; costs some speed."}),
        }}

    def settings(self, gpus: str, cfg_parallel: bool, dit_fsdp: bool):
        for name, value in (("cfg_parallel", cfg_parallel), ("dit_fsdp", dit_fsdp)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be true or false, got {value!r}")
        devices = parse_devices(gpus)
        if cfg_parallel and len(devices) % 2:
            raise ValueError(f"cfg_parallel runs the two CFG passes on two halves of the GPUs: give an even number "
                             f"of gpus, got {len(devices)} ({gpus})")
        if len(devices) < 2:
            raise ValueError(f"gpus={gpus!r} names one device; for one GPU leave the parallel input unconnected")
        return ({"devices": devices, "cfg_parallel": cfg_parallel, "dit_fsdp": dit_fsdp},)


class _Workers:
    """The one running worker group (it holds the GPUs, so there is at most one)."""

    def __init__(self) -> None:
        self.group: Optional[WorkerGroup] = None
        self.claim: Optional[host.MemoryClaim] = None
        self.lock = threading.RLock()  # ComfyUI may free memory (release) while a group starts

    def for_spec(self, spec: GroupSpec) -> WorkerGroup:
        with self.lock:
            if self.group is not None and (self.group.spec != spec or self.group.closed):
                self._stop()
            if self.group is None:
                self.group = WorkerGroup(spec)
                self.claim = host.MemoryClaim(self.release)
            return self.group

    def release(self) -> None:
        """ComfyUI frees memory: stop the workers (they start again on the next multi-GPU run).
        ComfyUI calls this while it walks its list of loaded models and takes the claim off that
        list itself afterwards. The claim is kept until the next group replaces it: dropping it,
        or letting it be garbage collected (ComfyUI holds it weakly and forgets collected
        models), would shift that list under ComfyUI's walk and end its prompt worker."""
        with self.lock:
            if self.group is not None:
                self.group.close()
            self.group = None

    def stop(self) -> None:
        """Stop the workers and withdraw the claim (the group failed)."""
        with self.lock:
            self._stop()

    def _stop(self) -> None:
        if self.claim is not None:
            self.claim.drop()
        if self.group is not None:
            self.group.close()
        self.group = self.claim = None


workers = _Workers()


def sample_on_workers(parallel: dict, models: list, sample_kwargs: dict):
    """`wan_core.sampling.sample(**sample_kwargs)` with `models` (one, or high and low noise)
    run by the worker group `parallel` asks for; returns the latent on the CPU."""
    sources = []
    for model in models:
        if model.source is None:
            raise ValueError(f"{model.name} was not loaded by Wan2.2 Model Loader, so the workers cannot load it")
        if model.loras:
            raise ValueError(f"{model.name} has LoRAs applied; the multi-GPU workers load the base weights only: "
                             f"disconnect the parallel input or the LoRA")
        if model.source not in sources:
            sources.append(model.source)
    spec = GroupSpec(parallel["devices"], tuple(sources), parallel["cfg_parallel"], parallel["dit_fsdp"])
    check_heads(models[0].config.num_heads, spec.config.ulysses_size, models[0].name)
    job = {"experts": [sources.index(m.source) for m in models],
           "sample": {k: v.cpu() if isinstance(v, torch.Tensor) else [c.cpu() for c in v] if isinstance(v, list) else v
                      for k, v in sample_kwargs.items()}}
    group = workers.for_spec(spec)
    try:
        return group.run(job, callback=host.progress_callback(), should_stop=host.interrupt_requested)
    except GenerationInterrupted:
        host.check_interrupt()  # ComfyUI's own interrupt exception, which it expects
        raise
    except WorkerGroupError:
        workers.stop()
        raise


NODE_CLASS_MAPPINGS = {"W22MultiGPU": W22MultiGPU}
NODE_DISPLAY_NAME_MAPPINGS = {"W22MultiGPU": "Wan2.2 Multi-GPU"}
