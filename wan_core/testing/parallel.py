"""Cases for the parallel tests, run both in one process (the reference) and on 2, 3 and 4 gloo
ranks: tiny DiTs with 6 heads of the real size 128, so that 2 and 3 ranks split them, and token
counts that do and do not divide by the world size.

Under torchrun this module computes every case in each arrangement named on the command line
and rank 0 saves the results:

    torchrun --standalone --nproc_per_node N -m wan_core.testing.parallel OUT.pt ARRANGEMENT...

An arrangement is U[xcfg][+fsdp], e.g. "2", "1xcfg", "2xcfg+fsdp" (U: ulysses_size).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from wan_core.configs import task_for_model_type
from wan_core.dit import WanDiT
from wan_core.parallel import ParallelConfig, init_distributed, init_groups, parallelize
from wan_core.sampling import sample
from wan_core.testing.dit import dit_state_dict

GRIDS = {"tokens15": (3, 2, 10), "tokens20": (2, 4, 10)}  # 15 tokens: odd; 20: not a multiple of 3
STEPS, SHIFT, BOUNDARY, GUIDE = 4, 5.0, 0.9, (3.0, 4.0)


def config(variant: str):
    return task_for_model_type(variant).dit.tiny(dim=768, num_heads=6, ffn_dim=512, text_dim=24, freq_dim=16,
                                                  num_layers=2)


def model(variant: str, seed: int) -> WanDiT:
    dit = WanDiT(config(variant))
    dit.load_state_dict(dit_state_dict(dit.config, seed=seed))
    return dit.eval().requires_grad_(False)


def inputs(variant: str, grid, seed: int = 0):
    c = config(variant)
    g = torch.Generator().manual_seed(seed)
    y_channels = c.in_dim - 16 if variant == "i2v" else 0
    x = torch.randn(2, c.in_dim - y_channels, *grid, generator=g)
    y = torch.randn(2, y_channels, *grid, generator=g) if y_channels else None
    context = [torch.randn(n, c.text_dim, generator=g) for n in (7, 12)]
    context_null = [torch.randn(3, c.text_dim, generator=g)] * 2
    return x, y, context, context_null


def dit_cases(prepare) -> dict[str, torch.Tensor]:
    """DiT forwards: t2v on both grids, i2v (y), TI2V per-token timesteps (first frame t = 0).
    `prepare(models)` returns the models as this run uses them."""
    out = {}
    for variant, grid_name in (("t2v", "tokens15"), ("t2v", "tokens20"), ("i2v", "tokens15"), ("ti2v", "tokens20")):
        grid = GRIDS[grid_name]
        (dit,) = prepare([model(variant, seed=3)])
        x, y, context, _ = inputs(variant, grid)
        if variant == "ti2v":
            per_frame = grid[1] * grid[2] // 4
            t = torch.full((2, grid[0] * per_frame), 700)
            t[:, :per_frame] = 0
        else:
            t = torch.tensor([999, 437])
        with torch.no_grad():
            out[f"dit_{variant}_{grid_name}"] = dit(x, t, context, y=y)
    return out


def sample_cases(prepare) -> dict[str, torch.Tensor]:
    """Sampling: the T2V two-expert hand-off with CFG, and TI2V with a held first frame."""
    x, _, context, context_null = inputs("t2v", GRIDS["tokens15"], seed=1)
    experts = prepare([model("t2v", seed=4), model("t2v", seed=5)])
    # the inactive expert leaves the device (with FSDP: its shards), as on a GPU
    out = {"sample_t2v_moe": sample(tuple(experts), x[:1], context[:1], context_null[:1], steps=STEPS, shift=SHIFT,
                                    guide_scale=GUIDE, boundary=BOUNDARY, offload_inactive_expert=True)}
    x, _, context, context_null = inputs("ti2v", GRIDS["tokens20"], seed=2)
    (ti2v,) = prepare([model("ti2v", seed=6)])
    out["sample_ti2v_image"] = sample(ti2v, x[:1], context[:1], context_null[:1], steps=STEPS, shift=SHIFT,
                                      guide_scale=5.0, first_frame_latent=x[:1, :, :1] * 0.5)
    return out


def torchrun(nproc: int, argv: list[str], *, timeout: float, cwd=None) -> subprocess.CompletedProcess:
    """Run `torchrun --standalone` (a free port of its own) with `nproc` processes in a new
    session, importing this checkout's wan_core; on timeout the whole session is killed.
    Returns the CompletedProcess (stdout and stderr together)."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *argv]
    process = subprocess.Popen(command, cwd=cwd or root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"torchrun {' '.join(argv)} did not finish in {timeout} s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output, None)


def main(out_path: str, arrangements: list[str]) -> None:
    torch.set_num_threads(1)
    device, _ = init_distributed(torch.device("cpu"))
    results = {}
    for name in arrangements:
        layout, _, options = name.partition("+")
        ulysses, _, cfg = layout.partition("x")
        arrangement = ParallelConfig(ulysses_size=int(ulysses), cfg_parallel=cfg == "cfg", dit_fsdp=options == "fsdp")
        groups = init_groups(arrangement, device)

        def prepare(models):
            return parallelize(models, groups)

        cases = sample_cases(prepare) if arrangement.cfg_parallel else {**dit_cases(prepare), **sample_cases(prepare)}
        results.update({f"{name}/{case}": value for case, value in cases.items()})
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
