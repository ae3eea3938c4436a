"""Flow-matching sampling as the Wan2.2 reference does it: its schedule (schedule.py), the
UniPC / DPM++ 2M / Euler solvers (solvers.py) and the loop with the MoE expert hand-off and
classifier-free guidance (sampler.py)."""
from wan_core.sampling.guidance import GuideScale, scales_by_expert
from wan_core.sampling.sampler import sample
from wan_core.sampling.schedule import SIGMA_MAX, SOLVERS, handoff_index, runs_high_noise_expert, schedule
from wan_core.sampling.solvers import DPMSolverPP2M, Euler, FlowSolver, UniPC, make_solver

__all__ = ["sample", "GuideScale", "scales_by_expert", "schedule", "handoff_index", "runs_high_noise_expert", "SOLVERS", "SIGMA_MAX",
           "make_solver", "FlowSolver", "UniPC", "DPMSolverPP2M", "Euler"]
