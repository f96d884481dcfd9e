import pytest
import torch

from epdiff.sampling.scheduler import FlowMatchEulerScheduler, guidance


def test_four_step_timesteps_with_shift_3():
    sched = FlowMatchEulerScheduler(num_steps=4, shift=3.0)
    assert sched.timesteps.dtype == torch.float32
    assert sched.timesteps.tolist() == pytest.approx([1000.0, 900.0, 750.0, 500.0], abs=1e-3)
    assert sched.sigmas.dtype == torch.float32
    assert sched.sigmas[0].item() == 1.0 and sched.sigmas[-1].item() == 0.0
    assert sched.timestep(1).item() == pytest.approx(900.0, abs=1e-3)


def test_shift_formula_matches_fp32_reference_expression():
    sched = FlowMatchEulerScheduler(num_steps=50, shift=3.0)
    sigma = torch.linspace(1, 0, 51, dtype=torch.float32)
    assert torch.equal(sched.sigmas, (3.0 * sigma) / (1 + 2.0 * sigma))
    assert torch.equal(FlowMatchEulerScheduler(8, shift=1.0).sigmas, torch.linspace(1, 0, 9))


def test_step_is_fp32_euler_and_returns_fp32():
    sched = FlowMatchEulerScheduler(4, 3.0)
    x = torch.randn(2, 4, 3, 3).to(torch.bfloat16)
    v = torch.randn(2, 4, 3, 3).to(torch.bfloat16)
    out = sched.step(v, x, 1)
    assert out.dtype == torch.float32
    dt = sched.sigmas[2] - sched.sigmas[1]
    assert torch.equal(out, x.float() + v.float() * dt)


def test_exact_velocity_recovers_the_clean_sample():
    # x_sigma = (1 - sigma) x0 + sigma noise and v = noise - x0: Euler is exact for a straight path.
    torch.manual_seed(0)
    x0, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    sched = FlowMatchEulerScheduler(6, 3.0)
    x = noise.clone()
    for i in range(len(sched)):
        x = sched.step(noise - x0, x, i)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_guidance():
    cond, uncond = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0])
    assert guidance(cond, uncond, 5.0).tolist() == [6.0, 1.0]
    assert torch.equal(guidance(cond, uncond, 1.0), cond)
    assert FlowMatchEulerScheduler.guidance(cond.bfloat16(), uncond.bfloat16(), 2.0).dtype == torch.float32


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        FlowMatchEulerScheduler(0, 3.0)
    with pytest.raises(IndexError, match="4 steps"):
        FlowMatchEulerScheduler(4, 3.0).step(torch.zeros(1), torch.zeros(1), 4)
