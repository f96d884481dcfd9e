"""Flow-matching Euler sampler of HunyuanImage-3.0.

Mirrors the reference ``FlowMatchDiscreteScheduler(shift=flow_shift, reverse=True, solver="euler")``
plus its classifier-free-guidance operator:

* sigmas = linspace(1, 0, N + 1) in fp32, then the SD3 shift s·σ / (1 + (s − 1)·σ);
* the model sees t = σ·1000 (a float, not rounded) for the first N sigmas;
* the model predicts velocity v = noise − x0, and one step is x + v·(σ_next − σ).

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


class FlowMatchEulerScheduler:
    guidance = staticmethod(guidance)

    def __init__(self, num_steps: int, shift: float = 3.0):
        self.num_steps = num_steps
        self.shift = shift
        self.sigmas = shifted_sigmas(num_steps, shift)
        # What the model's timestep embedders receive, one per step, fp32.
        self.timesteps = self.sigmas[:-1] * NUM_TRAIN_TIMESTEPS

    def __len__(self) -> int:
        return self.num_steps

    def timestep(self, step_index: int) -> torch.Tensor:
        """Model timestep (0-dim fp32 tensor) for step ``step_index``."""
        self._check_index(step_index)
        return self.timesteps[step_index]

    def step(self, velocity: torch.Tensor, sample: torch.Tensor, step_index: int) -> torch.Tensor:
        """One Euler step from sigma[i] to sigma[i + 1]; returns fp32 like the reference."""
        self._check_index(step_index)
        # dt is a 0-dim fp32 CPU tensor (usable with any device). 0-dim tensors do not promote a bf16
        # velocity, so the product would stay bf16: upcast both operands first, as the reference does.
        dt = self.sigmas[step_index + 1] - self.sigmas[step_index]
        return sample.to(torch.float32) + velocity.to(torch.float32) * dt

    def _check_index(self, step_index: int) -> None:
        if not 0 <= step_index < self.num_steps:
            raise IndexError(f"step index {step_index} out of range for {self.num_steps} steps")
