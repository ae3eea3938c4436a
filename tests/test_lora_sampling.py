"""Few-step sampling: the 4-step Lightning schedule at shift 5, the per-expert step split
(`sample(..., high_noise_steps=N)`) and the DiT forwards a video costs."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from wan_core.configs import TASKS
from wan_core.sampling import handoff_index, sample, schedule
from siblings import sibling


test_sampling = sibling("test_sampling")
RecordingExpert, text, calls = test_sampling.RecordingExpert, test_sampling.text, test_sampling.calls

# The Lightning LoRAs were distilled at t = 1000 * shift(s) for s = 1, 3/4, 1/2, 1/4 with shift 5:
# 1000, 937.5, 833.3, 625 (the LightX2V/Wan2.2-Lightning scheduler; ComfyUI's euler + simple).
LIGHTNING_TIMESTEPS = [1000.0, 937.5, 2500 / 3, 625.0]


@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
def test_four_steps_at_shift_5_are_the_lightning_timesteps_and_split_2_plus_2(solver):
    sigmas, timesteps = schedule(solver, 4, 5.0)
    if solver == "euler":  # the distillation's own schedule: exactly Lightning's timesteps
        np.testing.assert_allclose(timesteps.numpy(), LIGHTNING_TIMESTEPS, rtol=1e-15)
    elif solver == "dpm++":  # its table starts at sigma 1: Lightning's, truncated to integers
        assert timesteps.tolist() == [int(t) for t in LIGHTNING_TIMESTEPS] == [1000, 937, 833, 625]
    else:  # UniPC starts at the training table's top, sigma 0.999 (the reference's rule)
        assert timesteps.tolist() == [999, 937, 833, 624]
    assert all(abs(t - lightning) < 1 for t, lightning in zip((sigmas[:4] * 1000).tolist(), LIGHTNING_TIMESTEPS))
    for task in ("t2v-A14B", "i2v-A14B"):  # boundaries 0.875 and 0.9: the first two steps are high-noise
        assert handoff_index(timesteps, TASKS[task].boundary) == 2


def run_two_experts(steps: int, **options) -> list:
    log: list = []
    high, low = RecordingExpert("high", 1.0, log), RecordingExpert("low", 2.0, log)
    noise = torch.randn(1, 16, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    sample((high, low), noise, text(1.0), text(0.5), steps=steps, shift=5.0, **options)
    return log


@pytest.mark.parametrize("high_noise_steps", [0, 1, 2, 3, 5])
def test_steps_split_sends_the_first_n_steps_to_the_high_noise_expert(high_noise_steps):
    log = run_two_experts(5, guide_scale=1.0, solver="euler", high_noise_steps=high_noise_steps)
    experts = [entry.expert for entry in calls(log)]
    assert experts == ["high"] * high_noise_steps + ["low"] * (5 - high_noise_steps)
    # the boundary is not needed then, and one given anyway is ignored
    again = run_two_experts(5, guide_scale=1.0, solver="euler", high_noise_steps=high_noise_steps, boundary=0.5)
    assert [entry.expert for entry in calls(again)] == experts


def test_steps_split_counts_the_steps_that_run_when_refining():
    log = run_two_experts(4, guide_scale=1.0, high_noise_steps=1, denoise=0.5,
                          latent_image=torch.zeros(1, 16, 1, 2, 2))
    assert [entry.expert for entry in calls(log)] == ["high", "low", "low", "low"]
    _, timesteps = schedule("unipc", 4, 5.0, 0.5)
    assert [entry.t.item() for entry in calls(log)] == timesteps.tolist()


def test_forwards_per_video_lightning_recipe_against_the_reference_recipe():
    """The reference T2V-A14B recipe: 40 steps, CFG on every step (4.0 high, 3.0 low) -> 80 DiT
    forwards. Lightning: 4 steps, CFG 1 (no negative prompt) -> 4 forwards, 20x fewer."""
    config = TASKS["t2v-A14B"]
    reference = run_two_experts(config.sample_steps, guide_scale=config.sample_guide_scale, boundary=config.boundary)
    lightning = run_two_experts(4, guide_scale=(1.0, 1.0), boundary=config.boundary)
    assert len(calls(reference)) == 80 and len(calls(lightning)) == 4
    assert [entry.expert for entry in calls(lightning)] == ["high", "high", "low", "low"]
    assert {id(entry.context) for entry in calls(lightning)} == {id(calls(lightning)[0].context)}  # never uncond


@pytest.mark.parametrize("options, message", [
    (dict(high_noise_steps=5), r"high_noise_steps must be a whole number in 0\.\.steps \(4\)"),
    (dict(high_noise_steps=-1), r"high_noise_steps must be a whole number in 0\.\.steps"),
    (dict(high_noise_steps=1.5), r"high_noise_steps must be a whole number"),
    (dict(high_noise_steps=True), r"high_noise_steps must be a whole number"),
])
def test_bad_step_splits_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        run_two_experts(4, guide_scale=1.0, **options)
    with pytest.raises(ValueError, match="splits the steps between two experts .* but one model was given"):
        sample(RecordingExpert("only", 1.0, []), torch.zeros(1, 16, 1, 2, 2), text(1.0), None, steps=4, shift=5.0,
               guide_scale=1.0, high_noise_steps=2)


def test_graph_editor_hand_off_line_follows_the_step_split():
    """web/schedule.js's handoff() with split = steps gives the number of steps the sampler
    really runs on the high-noise expert (refining included)."""
    test_nodes_web = sibling("test_nodes_web")
    cases = [dict(steps=n, shift=5.0, boundary=0.875, highNoiseSteps=k, denoise=d)
             for n in (1, 4, 7) for k in (0, 1, 2, n) if k <= n for d in (1.0, 0.5)]
    plans = test_nodes_web.run_schedule_js(cases)["plans"]
    for case, plan in zip(cases, plans):
        options = dict(denoise=case["denoise"], latent_image=torch.zeros(1, 16, 1, 2, 2)) if case["denoise"] < 1 else {}
        log = run_two_experts(case["steps"], guide_scale=1.0, high_noise_steps=case["highNoiseSteps"], **options)
        assert plan["highSteps"] == len(calls(log, "high")) == case["highNoiseSteps"], case
