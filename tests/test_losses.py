import math

import pytest
import torch

from dina_lrm.losses import pair_probability, preference_loss, thurstone_probability


def phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


CASES = [(1.3, 0.2, 0.1), (0.0, 0.5, 0.6), (2.0, -1.0, 0.9), (-0.4, 0.3, 0.3)]


@pytest.mark.parametrize("w,l,sigma", CASES)
def test_each_loss_matches_its_closed_form(w, l, sigma):
    d = w - l
    p_noise = phi(d / math.sqrt(2 * (2 * sigma**2 + 0.05)))
    expected = {
        "thurstone": 1 - math.sqrt(p_noise),
        "thurstone_nll": -math.log(p_noise),
        "thurstone_const": 1 - math.sqrt(phi(d / math.sqrt(2 * 0.5))),
        "bt": math.log1p(math.exp(-d)),
        "bt_margin": math.log1p(math.exp(-(d - 1.0))),
    }
    for name, value in expected.items():
        got = preference_loss(name, torch.tensor([w]), torch.tensor([l]), torch.tensor([sigma]))
        assert got.item() == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_thurstone_is_less_confident_at_high_noise():
    w, l = torch.tensor([1.0]), torch.tensor([0.0])
    probs = [thurstone_probability(w, l, torch.tensor([s])).item() for s in (0.05, 0.3, 0.6, 0.95)]
    assert all(a > b > 0.5 for a, b in zip(probs, probs[1:]))
    assert probs[0] == pytest.approx(phi(1 / math.sqrt(2 * (2 * 0.05**2 + 0.05))), rel=1e-6)


def test_soft_targets_use_the_general_fidelity_form():
    w, l, s, y = 0.8, 0.1, 0.4, 0.7
    p = phi((w - l) / math.sqrt(2 * (2 * s**2 + 0.05)))
    expected = 1 - math.sqrt(p * y) - math.sqrt((1 - p) * (1 - y))
    got = preference_loss("thurstone", torch.tensor([w]), torch.tensor([l]), torch.tensor([s]), torch.tensor([y]))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_gradients_are_finite_for_extreme_gaps():
    for name in ("thurstone", "thurstone_nll", "bt"):
        chosen = torch.tensor([-60.0, 60.0, -1.0], requires_grad=True)
        preference_loss(name, chosen, torch.zeros(3), torch.tensor([0.01, 0.01, 0.5])).backward()
        assert torch.isfinite(chosen.grad).all() and chosen.grad[2] < 0, name


def test_nan_scores_and_unknown_loss_raise():
    with pytest.raises(FloatingPointError, match="not finite"):
        preference_loss("thurstone", torch.tensor([float("nan")]), torch.tensor([0.0]), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="unknown loss"):
        preference_loss("hinge", torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.5]))


def test_pair_probability_matches_each_link():
    w, l, s = torch.tensor([0.7]), torch.tensor([0.2]), torch.tensor([0.5])
    assert pair_probability("bt", w, l, s).item() == pytest.approx(1 / (1 + math.exp(-0.5)), rel=1e-6)
    assert pair_probability("thurstone", w, l, s).item() == pytest.approx(phi(0.5 / math.sqrt(2 * 0.55)), rel=1e-6)
