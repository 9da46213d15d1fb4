"""Step rules against their definitions (METHODS.md): SAM with ρ = 0 is SGD bit for bit; θ is
restored exactly before the base step; GCSAM's three cases and the β1 ≤ 0 rule."""
import math

import pytest
import torch

from gcs_tune.methods.steps import GCSAMStep, SAMStep, SGDStep


def problem(seed=0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    x, y = torch.randn(8, 4), torch.randn(8, 3)

    def closure():
        loss = ((torch.tanh(x @ params[0].t()) - y) ** 2).mean() + (params[1] ** 4).sum() * 0.1
        loss.backward()
        return loss.detach()
    return params, closure


def optimizer(params, lr=0.05):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def test_sam_with_rho_zero_equals_sgd_bit_for_bit():
    p_sgd, c_sgd = problem()
    p_sam, c_sam = problem()
    sgd, sam = SGDStep(p_sgd, optimizer(p_sgd)), SAMStep(p_sam, optimizer(p_sam), rho=0.0)
    for _ in range(5):
        assert torch.equal(sgd.step(c_sgd), sam.step(c_sam))
    for a, b in zip(p_sgd, p_sam):
        assert torch.equal(a, b)


def test_gcsam_with_rho_zero_equals_sgd():
    p_sgd, c_sgd = problem()
    p_gc, c_gc = problem()
    sgd, gc = SGDStep(p_sgd, optimizer(p_sgd)), GCSAMStep(p_gc, optimizer(p_gc), 0.0, 0.5, 0.8)
    for _ in range(3):
        sgd.step(c_sgd), gc.step(c_gc)
    assert all(torch.equal(a, b) for a, b in zip(p_sgd, p_gc))
    assert gc.pop_stats()["frac_gs"] == 1.0  # g_s == g: cos 1 >= beta2


def test_parameters_perturbed_by_rho_then_restored_exactly():
    params, closure = problem()
    start = [p.detach().clone() for p in params]
    seen = []

    def watching():
        seen.append([p.detach().clone() for p in params])
        return closure()

    rho = 0.3
    SAMStep(params, torch.optim.SGD(params, lr=0.0), rho=rho).step(watching)  # lr 0: step changes nothing
    first, second = seen
    assert all(torch.equal(a, b) for a, b in zip(first, start))
    eps = torch.cat([(b - a).reshape(-1) for a, b in zip(first, second)])
    assert math.isclose(float(eps.norm()), rho, rel_tol=1e-5)  # ‖ε‖ = ρ over all tensors together
    assert all(torch.equal(p, s) for p, s in zip(params, start))  # bit-for-bit restore


def test_sam_steps_with_the_perturbed_gradient():
    params, closure = problem()
    sam = SAMStep(params, torch.optim.SGD(params, lr=1.0), rho=0.5)
    _, g = sam._gradient(closure)
    norm = torch.cat([t.reshape(-1) for t in g]).norm()
    start = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(gi * 0.5 / norm)
    _, g_s = sam._gradient(closure)
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    sam.step(closure)
    for p, s, d in zip(params, start, g_s):
        torch.testing.assert_close(p, s - d, rtol=0, atol=1e-6)


def unit(angle_deg):
    a = math.radians(angle_deg)
    return torch.tensor([math.cos(a), math.sin(a)])


def rule(beta1, beta2):
    p = [torch.nn.Parameter(torch.zeros(2))]
    return GCSAMStep(p, torch.optim.SGD(p, lr=0.1), rho=0.1, beta1=beta1, beta2=beta2)


def test_gcsam_boundaries():
    gc = rule(0.5, 0.8)
    assert gc.choose(0.5) == "g" and gc.choose(0.5001) == "proj"
    assert gc.choose(0.7999) == "proj" and gc.choose(0.8) == "gs"


@pytest.mark.parametrize("angle, expected", [(120, "g"), (65, "g"), (45, "proj"), (20, "gs"), (0, "gs")])
def test_gcsam_cases_on_constructed_gradients(angle, expected):
    # β1 = 0.5 (cos 65° ≈ 0.42: g), cos 45° ≈ 0.71 (between: projection), cos 20° ≈ 0.94 >= β2 = 0.8
    gc = rule(0.5, 0.8)
    g, g_s = [torch.tensor([2.0, 0.0])], [3.0 * unit(angle)]
    d = gc.combine(g, g_s)[0]
    fg, fs = g[0], g_s[0]
    u = (fs + fg) / (fs + fg).norm()
    want = {"g": fg, "gs": fs, "proj": torch.dot(fs, u) * u}[expected]
    torch.testing.assert_close(d, want)
    assert gc.counts[expected] == 1


def test_gcsam_projection_lies_on_the_merged_direction():
    gc = rule(0.5, 0.8)
    g, g_s = torch.tensor([1.0, 0.0]), 2.0 * unit(40)
    d = gc.combine([g], [g_s])[0]
    merged = g + g_s
    assert abs(float(d[0] * merged[1] - d[1] * merged[0])) < 1e-6  # parallel to g + g_s
    assert math.isclose(float(d.norm()), float(torch.dot(g_s, merged / merged.norm())), rel_tol=1e-6)


@pytest.mark.parametrize("angle, expected", [(170, "proj"), (90, "proj"), (60, "proj"), (10, "gs")])
def test_beta1_not_positive_never_falls_back_to_g(angle, expected):
    gc = rule(0.0, 0.8)
    gc.combine([torch.tensor([1.0, 0.0])], [unit(angle)])
    assert gc.counts[expected] == 1 and gc.counts["g"] == 0


def test_gcsam_stats_are_fractions_per_epoch_and_reset():
    gc = rule(0.5, 0.8)
    for angle in (80, 45, 45, 0):
        gc.combine([torch.tensor([1.0, 0.0])], [unit(angle)])
    stats = gc.pop_stats()
    assert stats["frac_g"] == 0.25 and stats["frac_proj"] == 0.5 and stats["frac_gs"] == 0.25
    expected_cos = sum(math.cos(math.radians(a)) for a in (80, 45, 45, 0)) / 4
    assert math.isclose(stats["mean_cos"], expected_cos, rel_tol=1e-5)
    assert gc.pop_stats() == {}
