"""web/schedule.js (the graph editor's hand-off display) against wan_core.sampling (the backend).

The editor shows at which step the MoE sampler hands off to the low-noise expert; that number
must be the one the sampler uses. schedule.js is run under Node.js on a grid of steps, shifts,
boundaries, solvers and denoise values, and its timesteps and hand-off step are compared with
wan_core.sampling.schedule / handoff_index. Skips when `node` is not on PATH.
"""
from __future__ import annotations

import itertools
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from wan_core.configs import TASKS
from wan_core.sampling.schedule import SOLVERS, handoff_index, schedule

SCHEDULE_JS = Path(__file__).resolve().parent.parent / "web" / "schedule.js"

STEPS = (1, 2, 3, 4, 7, 10, 20, 30, 40, 50)
SHIFTS = (1.0, 3.0, 5.0, 8.0, 12.0, 16.7)
BOUNDARIES = (0.5, 0.875, 0.9, 0.95)
DENOISES = (1.0, 0.9, 0.6, 0.35)

# Runs schedule.js's handoff() for each case read from stdin; prints the answers as JSON.
RUNNER = """
import { handoff, sizeProblems } from %s;
let input = "";
process.stdin.on("data", (d) => (input += d));
process.stdin.on("end", () => {
  const { cases, sizes } = JSON.parse(input);
  const plans = cases.map((c) => handoff(c));
  const problems = sizes.map(([info, video]) => sizeProblems(info, video));
  process.stdout.write(JSON.stringify({ plans, problems }));
});
"""


def run_schedule_js(cases: list[dict], sizes: list = ()) -> dict:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not on PATH: install it to check web/schedule.js against the backend")
    script = RUNNER % json.dumps(SCHEDULE_JS.as_uri())
    run = subprocess.run([node, "--input-type=module", "-e", script], capture_output=True, text=True,
                         input=json.dumps({"cases": cases, "sizes": list(sizes)}), timeout=60)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_handoff_step_and_timesteps_match_the_backend_on_a_grid():
    cases = [dict(steps=n, shift=s, boundary=b, solver=solver, denoise=d)
             for n, s, b, solver, d in itertools.product(STEPS, SHIFTS, BOUNDARIES, SOLVERS, DENOISES)]
    plans = run_schedule_js(cases)["plans"]
    mismatches = []
    for case, plan in zip(cases, plans):
        _, timesteps = schedule(case["solver"], case["steps"], case["shift"], case["denoise"])
        expected = handoff_index(timesteps, case["boundary"])
        if plan["timesteps"] != timesteps.tolist() or plan["highSteps"] != expected:
            mismatches.append((case, plan["highSteps"], expected))
    assert len(cases) == 2880
    assert mismatches == [], f"{len(mismatches)} of {len(cases)} differ, first: {mismatches[:3]}"


def test_reference_defaults_hand_off_where_the_reference_does():
    """T2V-A14B: first low-noise step 26 of 40; I2V-A14B: 15 of 40 (UniPC, default shift)."""
    cases = [dict(steps=t.sample_steps, shift=t.sample_shift, boundary=t.boundary)
             for t in (TASKS["t2v-A14B"], TASKS["i2v-A14B"])]
    assert [p["highSteps"] for p in run_schedule_js(cases)["plans"]] == [26, 15]


def test_size_problems_flag_what_the_model_cannot_take():
    info = {"task": "ti2v-5B", "size_multiple": 32, "frame_stride": 4, "supported_sizes": [[1280, 704], [704, 1280]]}
    videos = [dict(width=1280, height=704, length=121), dict(width=1280, height=700, length=121),
              dict(width=1280, height=704, length=120), dict(width=640, height=352, length=9)]
    problems = run_schedule_js([], [[info, v] for v in videos])["problems"]
    assert problems[0] == []
    assert [level for level, _ in problems[1]] == ["error"] and "multiples of 32" in problems[1][0][1]
    assert [level for level, _ in problems[2]] == ["error"] and "4k+1" in problems[2][0][1]
    assert [level for level, _ in problems[3]] == ["warn"] and "1280x704" in problems[3][0][1]


def test_i2v_sizes_set_only_the_area_so_any_side_is_taken():
    info = {"task": "i2v-A14B", "size_multiple": 16, "size_is_area": True, "frame_stride": 4,
            "supported_sizes": [[832, 480], [480, 832]]}
    videos = [dict(width=1000, height=480, length=81), dict(width=832, height=480, length=80)]
    problems = run_schedule_js([], [[info, v] for v in videos])["problems"]
    assert [level for level, _ in problems[0]] == ["warn"]
    assert [level for level, _ in problems[1]] == ["error"] and "4k+1" in problems[1][0][1]
