import pytest
import torch

from epdiff.sampling.scheduler import FlowMatchScheduler, guidance


def test_four_step_timesteps_with_shift_3():
    sched = FlowMatchScheduler(num_steps=4, shift=3.0)
    assert sched.timesteps.dtype == torch.float32
    assert sched.timesteps.tolist() == pytest.approx([1000.0, 900.0, 750.0, 500.0], abs=1e-3)
    assert sched.sigmas.dtype == torch.float32
    assert sched.sigmas[0].item() == 1.0 and sched.sigmas[-1].item() == 0.0
    assert sched.timestep(1).item() == pytest.approx(900.0, abs=1e-3)


def test_shift_formula_matches_fp32_reference_expression():
    sched = FlowMatchScheduler(num_steps=50, shift=3.0)
    sigma = torch.linspace(1, 0, 51, dtype=torch.float32)
    assert torch.equal(sched.sigmas, (3.0 * sigma) / (1 + 2.0 * sigma))
    assert torch.equal(FlowMatchScheduler(8, shift=1.0).sigmas, torch.linspace(1, 0, 9))


def test_step_is_fp32_euler_and_returns_fp32():
    sched = FlowMatchScheduler(4, 3.0)
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
    sched = FlowMatchScheduler(6, 3.0)
    x = noise.clone()
    for i in range(len(sched)):
        x = sched.step(noise - x0, x, i)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_guidance():
    cond, uncond = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0])
    assert guidance(cond, uncond, 5.0).tolist() == [6.0, 1.0]
    assert torch.equal(guidance(cond, uncond, 1.0), cond)
    assert FlowMatchScheduler.guidance(cond.bfloat16(), uncond.bfloat16(), 2.0).dtype == torch.float32


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        FlowMatchScheduler(0, 3.0)
    with pytest.raises(IndexError, match="4 steps of euler"):
        FlowMatchScheduler(4, 3.0).step(torch.zeros(1), torch.zeros(1), 4)


@pytest.mark.parametrize("solver, calls, exact_degree", [("euler", 1, 0), ("heun-2", 2, 1), ("midpoint-2", 2, 1),
                                                         ("kutta-4", 4, 3)])
def test_solvers_integrate_polynomials_of_their_order_exactly(solver, calls, exact_degree):
    # dx/dσ = p(σ) with p of degree `exact_degree`: the solver's quadrature is exact, so x(0) is
    # x(1) - ∫_0^1 p, in N steps of len() = N · stages model calls.
    coefficients = torch.tensor([0.7, -1.3, 2.1, 0.4], dtype=torch.float64)[:exact_degree + 1]
    sched = FlowMatchScheduler(5, 3.0, solver)
    assert len(sched) == 5 * calls
    x = torch.zeros(1, dtype=torch.float64)
    for k in range(len(sched)):
        sigma = sched.timestep(k).double() / 1000
        velocity = sum(c * sigma ** n for n, c in enumerate(coefficients)).reshape(1)
        x = sched.step(velocity, x, k).double()
    integral = sum(c / (n + 1) for n, c in enumerate(coefficients))
    assert abs(float(x) - float(-integral)) < 1e-6


def test_solver_evaluation_points_and_mean_flow_timesteps():
    sched = FlowMatchScheduler(2, 1.0, "midpoint-2")
    assert sched.timesteps.tolist() == pytest.approx([1000.0, 750.0, 500.0, 250.0])
    assert sched.timesteps_r.tolist() == pytest.approx([500.0, 500.0, 0.0, 0.0])
    assert FlowMatchScheduler(2, 1.0, "heun-2").timesteps.tolist() == pytest.approx([1000.0, 500.0, 500.0, 0.0])
    with pytest.raises(ValueError, match="unknown solver 'rk45'"):
        FlowMatchScheduler(2, 1.0, "rk45")
