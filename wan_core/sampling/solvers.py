"""Flow-matching ODE solvers: UniPC (the reference's default), DPM++ 2M and Euler.

The model predicts the flow v = noise - x0, so at noise level sigma the data prediction is
x0 = x - sigma * v. UniPC and DPM++ are multistep exponential integrators in the log-SNR
lambda(sigma) = log(alpha) - log(sigma), alpha = 1 - sigma; they step on x0 predictions and
keep the previous ones for their second-order terms. Euler steps on the flow directly.

A solver walks one sigma table (the reference's: float32, ending with 0) from start to end:
`solver.step(x, flow)` takes the latent at sigma_i and the model's (guided) flow there and
returns the latent at sigma_{i+1}. The coefficients are computed as 0-d tensors in the table's
dtype, the precision the reference steps in (it keeps its sigmas as float32).
"""
from __future__ import annotations

import torch

from wan_core.sampling.schedule import check_solver


class FlowSolver:
    """Common state: the sigma table and how many steps were taken."""

    def __init__(self, sigmas: torch.Tensor):
        if sigmas.ndim != 1 or len(sigmas) < 2 or sigmas[-1] != 0:
            raise ValueError(f"sigmas must be a 1-D table ending with 0, got shape {tuple(sigmas.shape)}")
        # On the CPU: the 0-d coefficients multiply latents on any device without a sync.
        self.sigmas = sigmas.detach().cpu()
        self.num_steps = len(sigmas) - 1
        self.index = 0  # the step the next call takes

    def step(self, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        if self.index >= self.num_steps:
            raise RuntimeError(f"the solver already took all {self.num_steps} steps of its table")
        x_next = self._step(self.index, x, flow)
        self.index += 1
        return x_next

    def _step(self, i: int, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _log_snr(self, i: int) -> torch.Tensor:
        """lambda_i = log(alpha_i) - log(sigma_i); +inf at sigma = 0, -inf at sigma = 1."""
        sigma = self.sigmas[i]
        return torch.log(1 - sigma) - torch.log(sigma)


class Euler(FlowSolver):
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i."""

    def _step(self, i: int, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return x + (self.sigmas[i + 1] - self.sigmas[i]) * flow


class DPMSolverPP2M(FlowSolver):
    """DPM-Solver++(2M) in data prediction, midpoint form (Lu et al. 2022, arXiv:2211.01095).

    From sigma_s to sigma_t with h = lambda_t - lambda_s and the x0 predictions m0 (now) and
    m1 (previous step):
        x_t = sigma_t / sigma_s * x_s - alpha_t (e^{-h} - 1) (m0 + 0.5 * (m0 - m1) / r),
    r = (lambda_s - lambda_prev) / h. The first step has no history and the last one (to
    sigma = 0, where lambda is infinite) is taken first order: the m1 term is dropped.
    """

    def __init__(self, sigmas: torch.Tensor):
        super().__init__(sigmas)
        self.previous_x0: torch.Tensor | None = None

    def _step(self, i: int, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        sigma_s, sigma_t = self.sigmas[i], self.sigmas[i + 1]
        alpha_t = 1 - sigma_t
        h = self._log_snr(i + 1) - self._log_snr(i)
        x0 = x - sigma_s * flow
        decay = alpha_t * (torch.exp(-h) - 1.0)

        x_next = (sigma_t / sigma_s) * x - decay * x0
        second_order = self.previous_x0 is not None and i + 1 < self.num_steps
        if second_order:
            r = (self._log_snr(i) - self._log_snr(i - 1)) / h
            slope = (1.0 / r) * (x0 - self.previous_x0)
            x_next = x_next - 0.5 * decay * slope
        self.previous_x0 = x0
        return x_next


class UniPC(FlowSolver):
    """UniPC (Zhao et al. 2023, arXiv:2302.04867), order 2, data (x0) prediction, B(h) = e^{-h} - 1
    ("bh2"), warm-up and last step at order 1 — the reference's defaults.

    Each step i first corrects x_i (UniC) with the x0 prediction the model just made there, then
    predicts x_{i+1} (UniP). Both are the same update from sigma_s to sigma_t:
        x_t = sigma_t / sigma_s * x_s - alpha_t * phi * m_s - alpha_t * B * sum_k rho_k * D_k,
    hh = -(lambda_t - lambda_s), phi = e^{hh} - 1, B = e^{hh} - 1, where the D_k are scaled
    differences of x0 predictions and the weights rho_k come from UniPC's order conditions.
    """

    order = 2

    def __init__(self, sigmas: torch.Tensor):
        super().__init__(sigmas)
        self.x0_history: list[tuple[int, torch.Tensor]] = []  # (step, x0 prediction), newest last
        self.last_start: tuple[torch.Tensor, int] | None = None  # (x_s, order) of the last predictor

    def _step(self, i: int, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        x0 = x - self.sigmas[i] * flow  # from the latent the model saw, before correcting it
        if self.last_start is not None:
            x = self._correct(i, x0)
        # order 1 while there is no history (warm-up) and on the last step (lower_order_final)
        order = min(self.order, len(self.x0_history) + 1, self.num_steps - i)
        self.x0_history = (self.x0_history + [(i, x0)])[-self.order:]
        self.last_start = (x, order)
        return self._predict(i, x, order)

    def _update_terms(self, s: int, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """h, hh = -h, phi = e^{hh} - 1 and B for the step from sigma index s to t."""
        h = self._log_snr(t) - self._log_snr(s)
        hh = -h  # data prediction integrates in -h
        phi = torch.expm1(hh)
        return h, hh, phi, torch.expm1(hh)

    def _first_order(self, s: int, t: int, x_s: torch.Tensor, m_s: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        sigma_t = self.sigmas[t]
        return sigma_t / self.sigmas[s] * x_s - (1 - sigma_t) * phi * m_s

    def _difference(self, s: int, h: torch.Tensor, earlier: tuple[int, torch.Tensor], m_s: torch.Tensor):
        """D = (m_earlier - m_s) / r with r = (lambda_earlier - lambda_s) / h; also returns r."""
        step, m_earlier = earlier
        r = (self._log_snr(step) - self._log_snr(s)) / h
        return (m_earlier - m_s) / r, r

    def _predict(self, i: int, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniP: x_{i+1} from x_i; at order 2 with rho = 1/2 on the single difference."""
        h, _, phi, b_h = self._update_terms(i, i + 1)
        (_, m_s) = self.x0_history[-1]
        x_next = self._first_order(i, i + 1, x, m_s, phi)
        if order == 2:
            d1, _ = self._difference(i, h, self.x0_history[-2], m_s)
            x_next = x_next - (1 - self.sigmas[i + 1]) * b_h * (0.5 * d1)
        return x_next

    def _correct(self, i: int, x0_new: torch.Tensor) -> torch.Tensor:
        """UniC: redo the last predictor step s = i-1 -> t = i with the new x0 prediction too."""
        x_s, order = self.last_start
        s = i - 1
        h, hh, phi, b_h = self._update_terms(s, i)
        (_, m_s) = self.x0_history[-1]
        x_corrected = self._first_order(s, i, x_s, m_s, phi)
        d_new = x0_new - m_s
        if order == 1:
            correction = 0.5 * d_new
        else:
            d1, r1 = self._difference(s, h, self.x0_history[-2], m_s)
            rho = self._corrector_weights(r1, hh, b_h).to(x_s.dtype)
            correction = rho[0] * d1 + rho[1] * d_new
        return x_corrected - (1 - self.sigmas[i]) * b_h * correction

    @staticmethod
    def _corrector_weights(r1: torch.Tensor, hh: torch.Tensor, b_h: torch.Tensor) -> torch.Tensor:
        """Solve the order conditions sum_k rho_k r_k^(p-1) = g_p p! / B(h), p = 1, 2, over the
        nodes r = (r1, 1), with g_1 = phi/hh - 1 and g_2 = g_1/hh - 1/2 (the phi-function
        recursion)."""
        g1 = torch.expm1(hh) / hh - 1
        g2 = g1 / hh - 1 / 2
        nodes = torch.stack([r1, torch.ones_like(r1)])
        vandermonde = torch.stack([torch.ones_like(nodes), nodes])
        rhs = torch.stack([g1 * 1 / b_h, g2 * 2 / b_h])
        return torch.linalg.solve(vandermonde, rhs)


_SOLVER_CLASSES = {"unipc": UniPC, "dpm++": DPMSolverPP2M, "euler": Euler}


def make_solver(name: str, sigmas: torch.Tensor) -> FlowSolver:
    """A fresh solver of kind `name` ("unipc", "dpm++" or "euler") over the sigma table."""
    check_solver(name)
    return _SOLVER_CLASSES[name](sigmas)
