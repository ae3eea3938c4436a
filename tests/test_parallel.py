"""Ulysses sequence parallelism, CFG-parallel and FSDP2 on 2, 3 and 4 gloo processes against one
process (issue 11, item 5): the same DiT outputs and sampled latents, fp32, <= 1e-5 relative.

Each world size is launched once with torchrun (wan_core.testing.parallel) and computes every
case there in each arrangement; the reference is computed here, in this one
process, from the same seeds. The tiny DiTs have 6 heads of size 128 (2 and 3 ranks split
them); 15 tokens do not divide by 2, 20 not by 3, so padding is exercised on both sizes.
"""
from __future__ import annotations

import pytest
import torch

from wan_core.parallel import ParallelConfig
from wan_core.sampling import handoff_index, schedule
from wan_core.testing.parallel import (BOUNDARY, GRIDS, SHIFT, STEPS, dit_cases, inputs, model, sample_cases,
                                      torchrun)

RTOL = 1e-5  # fp32: max |parallel - one process| / max |one process|
LAUNCHES = {2: ["2", "1xcfg"], 3: ["3+fsdp"]}  # 2 x CFG with FSDP: the CLI test below


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {**dit_cases(lambda models: models), **sample_cases(lambda models: models)}


@pytest.fixture(scope="module", params=sorted(LAUNCHES), ids=lambda n: f"{n}procs")
def launched(request, tmp_path_factory) -> tuple[list[str], dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("parallel") / "results.pt"
    arrangements = LAUNCHES[request.param]
    done = torchrun(request.param, ["-m", "wan_core.testing.parallel", str(out), *arrangements], timeout=240)
    assert done.returncode == 0, done.stdout[-4000:]
    return arrangements, torch.load(out, weights_only=True)


def test_every_arrangement_matches_one_process(launched, reference):
    arrangements, results = launched
    expected_cases = {(a, case) for a in arrangements for case in reference
                      if "cfg" not in a or case.startswith("sample")}
    assert {tuple(key.split("/")) for key in results} == expected_cases
    for key, value in results.items():
        expected = reference[key.split("/")[1]]
        assert value.shape == expected.shape, key
        assert relative_error(value, expected) <= RTOL, key


def test_the_sampling_case_hands_off_between_the_experts():
    _, timesteps = schedule("unipc", STEPS, SHIFT)
    assert 0 < handoff_index(timesteps, BOUNDARY) < STEPS


def test_cases_would_notice_a_wrong_split(reference):
    """The comparison can fail: attention over one shard's tokens only (what a missing
    all-to-all computes) differs from the whole sequence by far more than the tolerance."""
    dit = model("t2v", seed=3)
    x, _, context, _ = inputs("t2v", GRIDS["tokens20"])
    half = x[..., :4]  # 8 of the 20 tokens, each attending only to these
    with torch.no_grad():
        alone = dit(half, torch.tensor([999, 437]), context)
    assert relative_error(alone, reference["dit_t2v_tokens20"][..., :4]) > 1e-3


@pytest.mark.parametrize("settings, world, heads, message", [
    (dict(ulysses_size=2), 4, 40, "4 process(es) were started but ulysses_size 2 needs 2"),
    (dict(ulysses_size=2, cfg_parallel=True), 2, 40, "ulysses_size 2 x 2 (cfg_parallel) needs 4"),
    (dict(ulysses_size=3), 3, 40, "ulysses_size 3 does not divide the 40 attention heads"),
    (dict(ulysses_size=1, dit_fsdp=True), 1, 40, "with one process leave them off"),
    (dict(ulysses_size=0), 1, 40, "ulysses_size must be a whole number >= 1"),
])
def test_impossible_arrangements_are_refused_with_what_to_do(settings, world, heads, message):
    with pytest.raises(ValueError) as error:
        ParallelConfig(**settings).check(world, heads)
    assert message in str(error.value)


def test_valid_arrangements_pass_the_check():
    ParallelConfig(ulysses_size=8).check(8, 40)
    ParallelConfig(ulysses_size=4, cfg_parallel=True, dit_fsdp=True).check(8, 40)
    ParallelConfig(ulysses_size=3).check(3, 24)  # TI2V-5B's 24 heads


# --- the CLI under torchrun ------------------------------------------------------------------------

CLI_TINY = ["--task", "t2v-A14B", "--prompt", "a fox in the snow", "--size", "64*32", "--frame_num", "5",
            "--sample_steps", "3", "--base_seed", "5", "--allow_any_size"]


def test_cli_on_four_processes_writes_the_one_process_latent_once(tiny_folders, tmp_path):
    """Ulysses over 2 x CFG-parallel, both FSDPs: the latent equals one process's; rank 0 alone
    writes the video and the latent."""
    from safetensors.torch import load_file

    from wan_core.cli import main

    args = [*CLI_TINY, "--ckpt_dir", str(tiny_folders["t2v-A14B"])]
    assert main(["generate", *args, "--save_file", str(tmp_path / "one.mp4"),
                 "--save_latent", str(tmp_path / "one.safetensors")]) == 0
    done = torchrun(4, ["-m", "wan_core", "generate", *args, "--save_file", str(tmp_path / "four.mp4"),
                        "--save_latent", str(tmp_path / "four.safetensors"), "--ulysses_size", "2", "--cfg_parallel",
                        "--dit_fsdp", "--t5_fsdp"], timeout=240)
    assert done.returncode == 0, done.stdout[-4000:]
    one, four = (load_file(tmp_path / f"{n}.safetensors") for n in ("one", "four"))
    assert list(four) == ["latent"] and four["latent"].dtype == torch.float32
    assert four["latent"].shape == one["latent"].shape == (1, 16, 2, 4, 8)
    assert relative_error(four["latent"], one["latent"]) <= RTOL
    assert done.stdout.count("saved the latent") == 1 and done.stdout.count("saved 5 frames") == 1
    assert (tmp_path / "four.mp4").stat().st_size > 0


@pytest.mark.parametrize("flags, message", [
    (["--ulysses_size", "2"], "1 process(es) were started but ulysses_size 2 needs 2"),
    (["--ulysses_size", "3"], "1 process(es) were started but ulysses_size 3 needs 3"),
    (["--dit_fsdp"], "--dit_fsdp/--t5_fsdp shard weights over several processes"),
])
def test_cli_refuses_an_impossible_arrangement_before_loading(flags, message, tmp_path, capsys):
    from wan_core.cli import main

    # the checkpoint folder does not exist: the arrangement is checked before anything loads
    assert main(["generate", *CLI_TINY, "--ckpt_dir", str(tmp_path / "absent"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_refuses_heads_that_do_not_split(monkeypatch, tmp_path, capsys):
    from wan_core.cli import main

    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["generate", *CLI_TINY, "--ckpt_dir", str(tmp_path / "absent"), "--ulysses_size", "3"]) == 2
    assert "ulysses_size 3 does not divide the 40 attention heads of t2v-A14B" in capsys.readouterr().err


# --- the GPU benchmark, on CPU with a tiny model ----------------------------------------------------

def test_benchmark_script_runs_every_mode_and_the_end_to_end_latents_agree(tmp_path):
    """bench/parallel_dit.py as the GPU run (issue 12) uses it, on 2 gloo processes: every
    arrangement is measured, FSDP halves the weights per process, and the two-expert run on
    2 processes ends at the latent of 1 (fp32 here)."""
    import json

    out = tmp_path / "bench.json"
    done = torchrun(2, ["bench/parallel_dit.py", "--device", "cpu", "--tiny", "--sizes", "48*32", "--frames", "5",
                        "--repeats", "1", "--e2e_steps", "2", "--json", str(out)], timeout=240)
    assert done.returncode == 0, done.stdout[-4000:]
    result = json.loads(out.read_text())["sizes"]["48*32"]
    rows = result["modes"]
    assert set(rows) == {"1 GPU", "ulysses", "cfg", "ulysses+fsdp", "cfg+fsdp"}
    assert all(row["step_s"] > 0 for row in rows.values())
    assert rows["ulysses+fsdp"]["weights_gib_per_gpu"] <= 0.55 * rows["1 GPU"]["weights_gib_per_gpu"]
    assert rows["ulysses"]["weights_gib_per_gpu"] == rows["1 GPU"]["weights_gib_per_gpu"]
    assert result["end_to_end"]["latent_max_relative_difference"] <= RTOL
    assert result["end_to_end"]["fsdp_offload_latent_max_relative_difference"] <= RTOL
    assert "end to end (2 GPUs, Ulysses)" in done.stdout
