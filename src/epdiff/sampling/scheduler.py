"""Flow-matching sampler of HunyuanImage-3.0: Euler and the reference's higher-order solvers.

Mirrors the reference ``FlowMatchDiscreteScheduler(shift=flow_shift, reverse=True, solver=...)``
plus its classifier-free-guidance operator:

* sigmas = linspace(1, 0, N + 1) in fp32, then the SD3 shift s·σ / (1 + (s − 1)·σ);
* the model sees t = σ·1000 (a float, not rounded) for the first N sigmas;
* the model predicts velocity v = noise − x0, and one Euler step is x + v·(σ_next − σ).

Solvers (`SOLVERS`) are explicit Runge-Kutta methods: one step of `heun-2` or `midpoint-2` calls
the model twice, `kutta-4` four times, each at the point its name defines (Heun: σ and σ_next;
midpoint: σ and (σ + σ_next)/2; classical RK4: σ, the midpoint twice, σ_next), so N steps always
end at σ = 0. The reference's formulas are the same, but its loop feeds one model call per entry
of a plain N-step schedule, so its second-order solvers evaluate the model at the wrong noise level
from the second step on and stop halfway (8 steps: 4 updates, ending at σ_4), and its `kutta-4`
builds each stage on the previous stage's sample rather than on the step's start; epdiff does not
reproduce either (docs/architecture.md, 'Solvers').

Dtypes follow the reference: the step upcasts sample and velocity to fp32 and returns fp32 (the
reference's cast back to the model dtype is commented out), so the latents start in bf16 and are
fp32 from the first step on. Guidance is also done in fp32 (the reference casts the prediction to
fp32 before splitting it).
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shifted_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The N + 1 shifted sigmas, from 1 down to 0, in fp32."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if shift <= 0:
        raise ValueError(f"flow shift must be positive, got {shift!r}")
    sigmas = torch.linspace(1, 0, num_steps + 1, dtype=torch.float32)
    if shift != 1.0:  # the reference skips the formula for shift 1 (it is the identity)
        sigmas = (shift * sigmas) / (1 + (shift - 1) * sigmas)
    return sigmas


def guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance uncond + scale·(cond − uncond), in fp32."""
    cond = cond.to(torch.float32)
    uncond = uncond.to(torch.float32)
    return uncond + scale * (cond - uncond)


class Solver:
    """An explicit Runge-Kutta method as its Butcher tableau: stage s is evaluated at
    σ + nodes[s]·dt on x + dt·Σ_j coupling[s][j]·k_j; the step is x + dt·Σ_s weights[s]·k_s."""

    def __init__(self, name: str, nodes, coupling, weights):
        self.name, self.nodes, self.coupling, self.weights = name, tuple(nodes), tuple(coupling), tuple(weights)

    @property
    def stages(self) -> int:
        return len(self.nodes)


SOLVERS = {
    "euler": Solver("euler", [0.0], [()], [1.0]),
    "heun-2": Solver("heun-2", [0.0, 1.0], [(), (1.0,)], [0.5, 0.5]),
    "midpoint-2": Solver("midpoint-2", [0.0, 0.5], [(), (0.5,)], [0.0, 1.0]),
    "kutta-4": Solver("kutta-4", [0.0, 0.5, 0.5, 1.0], [(), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)],
                      [1 / 6, 1 / 3, 1 / 3, 1 / 6]),
}


def check_solver(name) -> str:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    return name


def _weighted(coefficients, derivatives):
    """Σ c_j·k_j over the non-zero coefficients (a lone weight of 1 is the derivative itself, so
    Euler stays x + v·dt bit for bit)."""
    terms = [k if c == 1.0 else c * k for c, k in zip(coefficients, derivatives) if c != 0.0]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


class FlowMatchScheduler:
    """N solver steps over the shifted sigmas. A model call is one stage of one step: len() is the
    number of calls, `timesteps[k]` what call k's timestep embedders receive, and `step(v, x, k)`
    takes call k's velocity to the sample of call k + 1 (the next stage's, or the next step's)."""

    guidance = staticmethod(guidance)

    def __init__(self, num_steps: int, shift: float = 3.0, solver: str = "euler"):
        self.num_steps, self.shift = num_steps, shift
        self.solver = SOLVERS[check_solver(solver)]
        self.sigmas = shifted_sigmas(num_steps, shift)
        stages = self.solver.stages
        self.calls = [(i, s) for i in range(num_steps) for s in range(stages)]
        self.calls_per_step = stages
        self.timesteps = torch.stack([self._stage_sigma(i, s) for i, s in self.calls]) * NUM_TRAIN_TIMESTEPS
        # Mean flow's second timestep: the end of the call's step (the reference's
        # timesteps_full[step_index + 1], the same for every stage of a step).
        self.timesteps_r = torch.stack([self.sigmas[i + 1] for i, _ in self.calls]) * NUM_TRAIN_TIMESTEPS
        self._start, self._derivatives = None, []

    def _stage_sigma(self, i: int, s: int) -> torch.Tensor:
        node = self.solver.nodes[s]
        if node == 0.0:
            return self.sigmas[i]
        if node == 1.0:
            return self.sigmas[i + 1]
        return self.sigmas[i] + node * (self.sigmas[i + 1] - self.sigmas[i])

    def __len__(self) -> int:
        return len(self.calls)

    def sigma(self, call: int) -> torch.Tensor:
        """The noise level model call ``call`` is evaluated at (0-dim fp32)."""
        return self.timestep(call) / NUM_TRAIN_TIMESTEPS

    def timestep(self, call: int) -> torch.Tensor:
        """Model timestep (0-dim fp32 tensor) of model call ``call``."""
        self._check_index(call)
        return self.timesteps[call]

    def step(self, velocity: torch.Tensor, sample: torch.Tensor, call: int) -> torch.Tensor:
        """Call `call`'s velocity -> the sample the next call sees (after a step's last stage: the
        step's result). fp32 like the reference: upcast both operands first (a 0-dim fp32 dt does not
        promote a bf16 velocity)."""
        self._check_index(call)
        i, s = self.calls[call]
        dt = self.sigmas[i + 1] - self.sigmas[i]
        sample, velocity = sample.to(torch.float32), velocity.to(torch.float32)
        if s == 0:
            self._start, self._derivatives = sample, []
        self._derivatives.append(velocity)
        if s + 1 < self.solver.stages:
            coupling = self.solver.coupling[s + 1]
            if not any(coupling):
                return self._start
            return self._start + _weighted(coupling, self._derivatives) * dt
        out = self._start + _weighted(self.solver.weights, self._derivatives) * dt
        self._start, self._derivatives = None, []
        return out

    def _check_index(self, call: int) -> None:
        if not 0 <= call < len(self.calls):
            raise IndexError(f"model call {call} out of range for {self.num_steps} steps of {self.solver.name} "
                             f"({len(self.calls)} calls)")
