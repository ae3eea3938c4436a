"""wan_core.sampling: the reference's schedule, the solvers against diffusers, the MoE hand-off,
guidance, expert offload, the TI2V first-frame hold, denoise, and clear errors.

The schedule is checked against the reference's formulas (issue 4 point 5), not diffusers'
flow schedule, which differs. The solvers' update rules are checked against diffusers'
UniPCMultistepScheduler / DPMSolverMultistepScheduler with our sigma table and timesteps
written into them. The experts are small real nn.Modules that record how they were called.
web/schedule.js is compared with schedule() / handoff_index() in tests/test_nodes_web.py.
"""
from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from wan_core.configs import TASKS
from wan_core.sampling import SIGMA_MAX, handoff_index, make_solver, sample, schedule

SOLVER_TOLERANCE = 1e-6  # max abs difference of latents (values of order 1) from diffusers
CHANNELS, TEXT_DIM = 4, 8


# --- the schedule -----------------------------------------------------------------------------

def reference_table(solver: str, steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Issue 4 point 5: sigma = linspace(top, 0, steps + 1)[:steps], shifted; t = int64(1000 sigma);
    a final sigma 0. top is the float32 top of the 1000-step training table for UniPC, 1 for DPM++."""
    training_sigmas = (1.0 - np.linspace(1, 1 / 1000, 1000)[::-1]).astype(np.float32)
    top = 1.0 if solver == "dpm++" else float(training_sigmas[0])
    sigmas = np.linspace(top, 0, steps + 1)[:steps]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return np.concatenate([sigmas, [0.0]]), (sigmas * 1000).astype(np.int64)


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
@pytest.mark.parametrize("steps, shift", [(40, 12.0), (40, 5.0), (50, 5.0)])
def test_schedule_tables_are_the_references(solver, steps, shift):
    expected_sigmas, expected_timesteps = reference_table(solver, steps, shift)
    sigmas, timesteps = schedule(solver, steps, shift)
    assert sigmas.dtype == torch.float64 and timesteps.dtype == torch.int64
    assert torch.equal(sigmas, torch.from_numpy(expected_sigmas))
    assert torch.equal(timesteps, torch.from_numpy(expected_timesteps))


@pytest.mark.parametrize("steps, shift", [(4, 5.0), (8, 5.0), (40, 12.0)])
def test_euler_is_the_few_step_distillations_schedule(steps, shift):
    """No Euler in the reference: ours is ComfyUI's euler + simple and Wan2.2-Lightning's
    (sigma from exactly 1, shifted, timestep 1000 * sigma not rounded)."""
    sigmas, timesteps = schedule("euler", steps, shift)
    unshifted = 1 - np.arange(steps) / steps
    expected = shift * unshifted / (1 + (shift - 1) * unshifted)
    assert timesteps.dtype == torch.float64 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    np.testing.assert_allclose(sigmas[:-1].numpy(), expected, rtol=1e-14)  # linspace vs arange rounding
    np.testing.assert_allclose(timesteps.numpy(), 1000 * expected, rtol=1e-14)


def test_unipc_starts_at_the_float32_top_of_the_training_table():
    assert SIGMA_MAX == float(np.float32(0.999)) != 0.999
    assert schedule("unipc", 10, 1.0)[0][0].item() == SIGMA_MAX
    assert schedule("dpm++", 10, 1.0)[0][0].item() == 1.0


@pytest.mark.parametrize("solver, steps, shift, denoise", [
    ("unipc", 10, 5.0, 0.5), ("dpm++", 7, 12.0, 0.3), ("euler", 20, 3.0, 0.75), ("unipc", 3, 5.0, 1.0)])
def test_denoise_runs_the_last_steps_of_a_longer_schedule(solver, steps, shift, denoise):
    total = math.floor(steps / denoise)
    full_sigmas, full_timesteps = schedule(solver, total, shift)
    sigmas, timesteps = schedule(solver, steps, shift, denoise)
    assert len(timesteps) == steps and len(sigmas) == steps + 1
    assert torch.equal(sigmas, full_sigmas[total - steps:])
    assert torch.equal(timesteps, full_timesteps[total - steps:])


# --- the solvers against diffusers -------------------------------------------------------------

def diffusers_scheduler(solver: str, sigmas: torch.Tensor, timesteps: torch.Tensor):
    """diffusers' scheduler with the reference's settings and our table written into it."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    common = dict(use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=2,
                  lower_order_final=True, final_sigmas_type="zero")
    if solver == "unipc":
        scheduler = UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, **common)
    else:
        scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **common)
    with warnings.catch_warnings():  # diffusers' own numpy deprecation notices
        warnings.simplefilter("ignore")
        scheduler.set_timesteps(len(timesteps))
    # float32 like the reference's own table (it casts its sigmas to float32 after computing them)
    scheduler.sigmas = sigmas.to(torch.float32)
    scheduler.timesteps = timesteps.clone()
    scheduler.set_begin_index(0)
    return scheduler


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
@pytest.mark.parametrize("steps, shift, denoise", [(40, 12.0, 1.0), (50, 5.0, 1.0), (3, 5.0, 1.0),
                                                   (1, 5.0, 1.0), (8, 5.0, 0.6)])
def test_solver_steps_match_diffusers(solver, steps, shift, denoise):
    sigmas, timesteps = schedule(solver, steps, shift, denoise)
    theirs = diffusers_scheduler(solver, sigmas, timesteps)
    ours = make_solver(solver, sigmas.to(torch.float32))
    generator = torch.Generator().manual_seed(steps)
    x = torch.randn(2, CHANNELS, 3, 4, 4, generator=generator)
    x_theirs = x.clone()
    for t in timesteps:
        flow = torch.randn(x.shape, generator=generator)
        x = ours.step(x, flow)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x_theirs = theirs.step(flow, t, x_theirs).prev_sample
        assert (x - x_theirs).abs().max().item() <= SOLVER_TOLERANCE, f"step at t={int(t)}"
    with pytest.raises(RuntimeError, match="already took all"):
        ours.step(x, flow)


def test_euler_is_its_closed_form():
    sigmas, _ = schedule("euler", 12, 5.0)
    table = sigmas.to(torch.float32).double()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, CHANNELS, 2, 4, 4, generator=generator)
    expected = x.double()
    solver = make_solver("euler", sigmas.to(torch.float32))
    for i in range(12):
        flow = torch.randn(x.shape, generator=generator)
        x = solver.step(x, flow)
        expected = expected + (table[i + 1] - table[i]) * flow.double()
    assert (x.double() - expected).abs().max().item() <= SOLVER_TOLERANCE


# --- small real experts -------------------------------------------------------------------------

class TinyFlowModel(nn.Module):
    """A real flow model in miniature: a 1x1x1 convolution scaled by the timestep, plus the mean
    of the text embedding, so its output depends on x, t and the context."""

    def __init__(self, seed: int):
        super().__init__()
        self.proj = nn.Conv3d(CHANNELS, CHANNELS, 1)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in self.proj.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)

    def forward(self, x, t, context, y=None):
        time_scale = 1 + t.to(x.dtype).view(-1, 1, 1, 1, 1) / 1000
        text = torch.stack([c.mean() for c in context]).view(-1, 1, 1, 1, 1)
        return self.proj(x) * time_scale + text


class RecordingExpert(nn.Module):
    """Returns weight * mean(context) everywhere (no dependence on x) and records each call and
    each .to() move, in a log shared by both experts."""

    def __init__(self, name: str, weight: float, log: list, patch_size=None):
        super().__init__()
        self.name = name
        self.weight = nn.Parameter(torch.tensor(weight))
        self.log = log
        if patch_size is not None:
            self.config = SimpleNamespace(patch_size=patch_size)

    def forward(self, x, t, context, y=None):
        self.log.append(SimpleNamespace(kind="call", expert=self.name, x=x.clone(), t=t.clone(),
                                        context=context, y=y))
        level = torch.stack([c.mean() for c in context]).view(-1, 1, 1, 1, 1)
        return (self.weight * level).expand_as(x).clone()

    def to(self, *args, **kwargs):
        self.log.append(SimpleNamespace(kind="move", expert=self.name, args=args))
        return super().to(*args, **kwargs)


def text(level: float, batch: int = 1, length: int = 3) -> list[torch.Tensor]:
    return [torch.full((length, TEXT_DIM), level) for _ in range(batch)]


COND, UNCOND = 1.0, 0.5  # context means, so cond and uncond outputs differ


def calls(log, expert=None):
    return [entry for entry in log if entry.kind == "call" and expert in (None, entry.expert)]


def test_sample_matches_a_loop_over_diffusers_schedulers():
    """The whole loop (expert choice, timesteps, CFG, steps) against the same loop written with
    diffusers' schedulers and the reference's rule t >= boundary * 1000."""
    high, low = TinyFlowModel(1), TinyFlowModel(2)
    noise = torch.randn(1, CHANNELS, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    context, context_null = [torch.randn(5, TEXT_DIM)], [torch.randn(4, TEXT_DIM)]
    for solver in ("unipc", "dpm++"):
        ours = sample((high, low), noise, context, context_null, steps=12, shift=12.0,
                      guide_scale=(3.0, 4.0), boundary=0.875, solver=solver)
        sigmas, timesteps = schedule(solver, 12, 12.0)
        scheduler = diffusers_scheduler(solver, sigmas, timesteps)
        x = noise.clone()
        with torch.no_grad():
            for t in timesteps:
                model, scale = (high, 4.0) if t.item() >= 875 else (low, 3.0)
                t_batch = t.reshape(1)
                cond, uncond = model(x, t_batch, context), model(x, t_batch, context_null)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    x = scheduler.step(uncond + scale * (cond - uncond), t, x).prev_sample
        assert (ours - x).abs().max().item() <= SOLVER_TOLERANCE, solver


# --- the MoE hand-off and guidance -----------------------------------------------------------------

@pytest.mark.parametrize("task, first_low_noise_step", [("t2v-A14B", 26), ("i2v-A14B", 15)])
def test_reference_defaults_hand_off_at_the_measured_step(task, first_low_noise_step):
    config = TASKS[task]
    _, timesteps = schedule("unipc", config.sample_steps, config.sample_shift)
    assert handoff_index(timesteps, config.boundary) == first_low_noise_step


def test_timestep_exactly_at_the_boundary_runs_the_high_noise_expert():
    _, timesteps = schedule("unipc", 40, 12.0)
    # a step whose timestep is exactly boundary * 1000 in floating point, followed by a lower one
    k = next(i for i in range(1, 39) if timesteps[i] / 1000 * 1000 == timesteps[i] > timesteps[i + 1])
    boundary = timesteps[k].item() / 1000
    assert handoff_index(timesteps, boundary) == k + 1

    log = []
    high, low = RecordingExpert("high", 1.0, log), RecordingExpert("low", 2.0, log)
    sample((high, low), torch.zeros(1, CHANNELS, 1, 2, 2), text(COND), None, steps=40, shift=12.0,
           guide_scale=1.0, boundary=boundary, solver="unipc")
    assert [c.t.item() for c in calls(log, "high")] == timesteps[:k + 1].tolist()
    assert [c.t.item() for c in calls(log, "low")] == timesteps[k + 1:].tolist()


def test_each_step_runs_the_right_expert_with_its_own_guidance_scale():
    """Euler makes each step's guided flow visible: x_{i+1} - x_i = (sigma_{i+1} - sigma_i) * flow."""
    log, latents = [], []
    weights = {"high": 1.5, "low": -2.0}
    experts = (RecordingExpert("high", weights["high"], log), RecordingExpert("low", weights["low"], log))
    scales = {"high": 4.0, "low": 3.0}
    noise = torch.randn(1, CHANNELS, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    context, context_null = text(COND), text(UNCOND)
    sample(experts, noise, context, context_null, steps=10, shift=12.0, guide_scale=(scales["low"], scales["high"]),
           boundary=0.95, solver="euler", callback=lambda step, total, x: latents.append((step, total, x.clone())))

    sigmas, timesteps = schedule("euler", 10, 12.0)
    table = sigmas.to(torch.float32)
    assert [(step, total) for step, total, _ in latents] == [(i + 1, 10) for i in range(10)]
    previous = noise
    for i, t in enumerate(timesteps.tolist()):
        name = "high" if t >= 950 else "low"
        step_calls = calls(log)[2 * i: 2 * i + 2]
        assert [c.expert for c in step_calls] == [name, name]
        assert step_calls[0].context is context and step_calls[1].context is context_null
        assert all(c.t.tolist() == [t] for c in step_calls)
        flow = weights[name] * (UNCOND + scales[name] * (COND - UNCOND))
        expected = previous + (table[i + 1] - table[i]) * flow
        assert (latents[i][2] - expected).abs().max().item() <= SOLVER_TOLERANCE
        previous = latents[i][2]
    assert 0 < handoff_index(timesteps, 0.95) < 10  # both experts ran


def test_scale_one_skips_the_unconditional_pass():
    log = []
    experts = (RecordingExpert("high", 1.0, log), RecordingExpert("low", 1.0, log))
    context, context_null = text(COND), text(UNCOND)
    sample(experts, torch.zeros(1, CHANNELS, 1, 2, 2), context, context_null, steps=8, shift=5.0,
           guide_scale=(1.0, 2.0), boundary=0.9)
    _, timesteps = schedule("unipc", 8, 5.0)
    high_steps = handoff_index(timesteps, 0.9)
    assert [c.context is context for c in calls(log, "high")] == [True, False] * high_steps
    assert [c.context is context for c in calls(log, "low")] == [True] * (8 - high_steps)

    single = RecordingExpert("one", 1.0, log := [])
    sample(single, torch.zeros(1, CHANNELS, 1, 2, 2), context, None, steps=3, shift=5.0, guide_scale=1.0)
    assert len(calls(log)) == 3


def test_offload_keeps_only_the_active_expert_on_the_latent_device():
    log = []
    high, low = RecordingExpert("high", 1.0, log), RecordingExpert("low", 1.0, log)
    noise = torch.zeros(1, CHANNELS, 1, 2, 2)
    sample((high, low), noise, text(COND), None, steps=10, shift=5.0, guide_scale=1.0, boundary=0.9,
           offload_inactive_expert=True)
    handoff = handoff_index(schedule("unipc", 10, 5.0)[1], 0.9)
    events = [(e.kind, e.expert, torch.device(*e.args) if e.kind == "move" else None) for e in log]
    cpu, latent_device = torch.device("cpu"), noise.device
    # the inactive expert leaves first, then the active one comes to the latent's device
    expected = ([("move", "low", cpu), ("move", "high", latent_device)] + [("call", "high", None)] * handoff
                + [("move", "high", cpu), ("move", "low", latent_device)] + [("call", "low", None)] * (10 - handoff))
    assert events == expected

    log.clear()
    sample((high, low), noise, text(COND), None, steps=10, shift=5.0, guide_scale=1.0, boundary=0.9)
    assert [e for e in log if e.kind == "move"] == []


# --- TI2V first frame, denoise, reproducibility, interrupts -------------------------------------

@pytest.mark.parametrize("patch_size", [None, (1, 1, 1)])
def test_first_frame_latent_is_held_and_its_tokens_get_timestep_zero(patch_size):
    log, latents = [], []
    expert = RecordingExpert("ti2v", 0.7, log, patch_size=patch_size)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, CHANNELS, 3, 4, 6, generator=generator)
    first_frame = torch.randn(1, CHANNELS, 1, 4, 6, generator=generator)
    out = sample(expert, noise, text(COND), text(UNCOND), steps=5, shift=5.0, guide_scale=5.0,
                 first_frame_latent=first_frame, callback=lambda s, n, x: latents.append(x.clone()))

    for x in [c.x for c in calls(log)] + latents + [out]:
        assert torch.equal(x[:, :, :1], first_frame)
    assert not torch.equal(out[:, :, 1:], noise[:, :, 1:])
    _, timesteps = schedule("unipc", 5, 5.0)
    for n, call in enumerate(calls(log)):
        t = timesteps[n // 2].item()  # cond and uncond per step
        if patch_size is None:  # the reference: (mask[0][:, ::2, ::2] * t).flatten(), mask 0 on frame 0
            mask = torch.ones(CHANNELS, 3, 4, 6)
            mask[:, 0] = 0
            expected = (mask[0][:, ::2, ::2] * t).flatten().unsqueeze(0)
        else:
            expected = torch.full((1, 3 * 4 * 6), t)
            expected[:, :4 * 6] = 0
        assert call.t.shape == expected.shape and torch.equal(call.t.to(expected.dtype), expected)


def test_denoise_starts_from_the_latent_image_noised_to_the_first_sigma():
    log, totals = [], []
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, CHANNELS, 2, 2, 2, generator=generator)
    latent_image = torch.randn(1, CHANNELS, 2, 2, 2, generator=generator)
    sample(RecordingExpert("one", 1.0, log), noise, text(COND), None, steps=6, shift=5.0, guide_scale=1.0,
           denoise=0.4, latent_image=latent_image, callback=lambda s, n, x: totals.append(n))
    sigmas, timesteps = schedule("unipc", 6, 5.0, 0.4)
    assert [c.t.item() for c in calls(log)] == timesteps.tolist() and totals == [6] * 6
    sigma = sigmas.to(torch.float32)[0]
    assert 0 < sigma < 0.99
    torch.testing.assert_close(calls(log)[0].x, sigma * noise + (1 - sigma) * latent_image, rtol=0, atol=1e-7)


@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
def test_same_inputs_give_bit_identical_latents(solver):
    experts = (TinyFlowModel(1), TinyFlowModel(2))
    noise = torch.randn(2, CHANNELS, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    context, context_null = [torch.randn(3, TEXT_DIM), torch.randn(6, TEXT_DIM)], text(0.0, batch=2)
    runs = [sample(experts, noise, context, context_null, steps=6, shift=5.0, guide_scale=(3.0, 3.5),
                   boundary=0.9, solver=solver, seed=42) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and torch.isfinite(runs[0]).all()


def test_an_exception_in_the_callback_stops_sampling():
    log = []

    def interrupt(step, total, latent):
        if step == 3:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt, match="cancelled"):
        sample(RecordingExpert("one", 1.0, log), torch.zeros(1, CHANNELS, 1, 2, 2), text(COND), None,
               steps=10, shift=5.0, guide_scale=1.0, callback=interrupt)
    assert len(calls(log)) == 3


# --- bad input ------------------------------------------------------------------------------------

def two_experts():
    return (TinyFlowModel(0), TinyFlowModel(1))


@pytest.mark.parametrize("experts, overrides, error, message", [
    (TinyFlowModel(0), dict(steps=0), ValueError, r"steps must be a whole number >= 1, got 0"),
    (TinyFlowModel(0), dict(steps=2.5), ValueError, r"steps must be a whole number"),
    (two_experts(), dict(boundary=0.0), ValueError, r"boundary must be a fraction in \(0, 1\)"),
    (two_experts(), dict(boundary=1.0), ValueError, r"boundary must be a fraction in \(0, 1\)"),
    (two_experts(), dict(boundary=875), ValueError, r"boundary must be a fraction in \(0, 1\)"),
    (TinyFlowModel(0), dict(solver="heun"), ValueError, r"unknown solver 'heun'; choose one of unipc, dpm\+\+, euler"),
    (two_experts(), dict(boundary=0.9, guide_scale=(3.0, 4.0, 5.0)), ValueError,
     r"guide_scale must be a finite number or a \(low_noise, high_noise\) pair, got \(3.0, 4.0, 5.0\)"),
    (TinyFlowModel(0), dict(guide_scale=(3.0, 4.0)), ValueError, r"guide_scale: one model runs every step"),
    (TinyFlowModel(0), dict(guide_scale="5"), ValueError, r"guide_scale must be one finite number, got '5'"),
    # non-finite numbers are refused here as in generate (a NaN scale would give a NaN video)
    (TinyFlowModel(0), dict(guide_scale=float("nan")), ValueError, r"guide_scale must be one finite number"),
    (two_experts(), dict(boundary=0.9, guide_scale=(3.0, float("inf"))), ValueError,
     r"guide_scale must be a finite number or a \(low_noise, high_noise\) pair"),
    (TinyFlowModel(0), dict(shift=float("inf")), ValueError, r"shift must be a finite number > 0"),
    (TinyFlowModel(0), dict(shift=float("nan")), ValueError, r"shift must be a finite number > 0"),
    (two_experts(), dict(boundary=float("nan")), ValueError, r"boundary must be a fraction in \(0, 1\)"),
    (TinyFlowModel(0), dict(denoise=float("nan")), ValueError, r"denoise must be in \(0, 1\]"),
    (TinyFlowModel(0), dict(boundary=0.9), ValueError, r"boundary=0.9 needs two experts"),
    (two_experts(), dict(), ValueError, r"two experts \(high_noise, low_noise\) need boundary"),
    ((TinyFlowModel(0),) * 3, dict(), ValueError, r"one model or \(high_noise_expert, low_noise_expert\), got 3"),
    (TinyFlowModel(0), dict(denoise=0.0), ValueError, r"denoise must be in \(0, 1\]"),
    (TinyFlowModel(0), dict(denoise=1.5), ValueError, r"denoise must be in \(0, 1\]"),
    (TinyFlowModel(0), dict(denoise=0.5), ValueError, r"denoise=0.5 refines an existing latent: pass latent_image"),
    (TinyFlowModel(0), dict(shift=0.0), ValueError, r"shift must be a finite number > 0"),
    (TinyFlowModel(0), dict(context_null=None), ValueError,
     r"context_null .* is needed for guidance scales other than 1"),
    (TinyFlowModel(0), dict(context=text(COND, batch=2)), ValueError, r"context has 2 entries but noise has batch 1"),
    (TinyFlowModel(0), dict(first_frame_latent=torch.zeros(1, CHANNELS, 2, 2, 2)), ValueError,
     r"first_frame_latent must have shape \[1, 4, 1, 2, 2\]"),
    (TinyFlowModel(0), dict(noise=torch.zeros(CHANNELS, 1, 2, 2)), ValueError, r"noise must be a tensor \[batch"),
])
def test_bad_input_raises_a_clear_error(experts, overrides, error, message):
    arguments = dict(noise=torch.zeros(1, CHANNELS, 1, 2, 2), context=text(COND), context_null=text(UNCOND),
                     steps=4, shift=5.0, guide_scale=5.0)
    arguments.update(overrides)
    with pytest.raises(error, match=message):
        sample(experts, **arguments)


def test_schedule_and_handoff_reject_bad_input():
    with pytest.raises(ValueError, match=r"unknown solver 'ddim'; choose one of unipc, dpm\+\+, euler"):
        schedule("ddim", 10, 5.0)
    with pytest.raises(ValueError, match=r"steps must be a whole number >= 1"):
        schedule("unipc", -1, 5.0)
    with pytest.raises(ValueError, match=r"boundary must be a fraction in \(0, 1\)"):
        handoff_index(schedule("unipc", 10, 5.0)[1], 1.2)
