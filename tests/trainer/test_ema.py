import torch

from trainer.ema import PowerEMA, power_ema_beta


def test_beta_schedule_matches_closed_form():
    assert power_ema_beta(0, 7.0, 0) == 0.0
    assert power_ema_beta(5, 7.0, 10) == 0.0  # before start: follow the weights
    t = 20 + 1 - 10
    assert abs(power_ema_beta(20, 7.0, 10) - (1 - 1 / t) ** 8) < 1e-15


def test_update_equals_float64_recursion_and_applied_restores():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    ema = PowerEMA([p], gamma=7.0, start=2)
    ref = p.detach().double().clone()
    for step in range(12):
        with torch.no_grad():
            p.add_(torch.randn(5))
        beta = ema.update(step)
        ref = beta * ref + (1 - beta) * p.detach().double()
    assert torch.allclose(ema.shadow[0].double(), ref, atol=1e-6)
    live = p.detach().clone()
    with ema.applied():
        assert torch.allclose(p.detach().double(), ref, atol=1e-6)
    assert torch.equal(p.detach(), live)


def test_frozen_params_are_not_tracked_and_state_roundtrip():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    ema = PowerEMA([a, b], gamma=7.0, start=0)
    assert len(ema.shadow) == 1
    with torch.no_grad():
        a.mul_(3)
    ema.update(5)
    other = PowerEMA([a], gamma=1.0, start=99)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow[0], ema.shadow[0]) and other.start == 0 and other.gamma == 7.0
