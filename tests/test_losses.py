"""L2H losses: the trained rejector's decisions match the Bayes rule on synthetic data."""
import numpy as np
import pytest
import torch

from clients.device import Rejector
from sim.core.training import train_minibatch
from strategies.l2h_losses import (binary_alpha, binary_rejector_loss, l01_cost, l2h_weights,
                                   multiclass_rejector_loss)

pytestmark = pytest.mark.numeric  # trained rejectors: their decisions depend on the CPU kernels' rounding

C_E, C_1 = 0.1, 0.5


def p_m_wrong(x: np.ndarray) -> np.ndarray:
    """P(legacy wrong | x): high on the right of the square."""
    return 0.05 + 0.85 / (1 + np.exp(-8 * (x[:, 0] - 0.5)))


def p_e_wrong(x: np.ndarray) -> np.ndarray:
    """P(server wrong | x): high at the top of the square."""
    return 0.05 + 0.9 * x[:, 1] ** 2


def bayes_defer(x: np.ndarray) -> np.ndarray:
    """Bayes rule (docs/methods.md §1): defer iff P(m wrong|x) > c_e + c_1 * P(e wrong|x)."""
    return p_m_wrong(x) > C_E + C_1 * p_e_wrong(x)


def train_rejector(variant: str, n: int = 20000, seed: int = 0) -> Rejector:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 2))
    m_wrong = (rng.random(n) < p_m_wrong(x)).astype(np.float32)
    e_wrong = (rng.random(n) < p_e_wrong(x)).astype(np.float32)
    torch.manual_seed(seed)
    rej = Rejector(2, hidden=32)
    w0, w1 = l2h_weights(torch.from_numpy(m_wrong), torch.from_numpy(e_wrong), C_E, C_1, variant)
    train_minibatch(rej.parameters(), (torch.from_numpy(x).float(), w0, w1),
                    lambda f, a, b: multiclass_rejector_loss(rej(f), a, b),
                    epochs=30, batch_size=256, lr=3e-3, seed=seed)
    return rej


def agreement(rej: Rejector, seed: int = 1) -> float:
    x = np.random.default_rng(seed).random((5000, 2))
    with torch.no_grad():
        defer = (rej(torch.from_numpy(x).float()).argmax(1) == 1).numpy()
    return float((defer == bayes_defer(x)).mean())


def test_bayes_rule_is_non_trivial():
    x = np.random.default_rng(3).random((5000, 2))
    assert 0.2 < bayes_defer(x).mean() < 0.8


def test_shifted_surrogate_minimiser_matches_bayes_rule():
    assert agreement(train_rejector("shifted")) >= 0.95


def test_repo_weights_are_not_bayes_consistent():
    """The public code's weights defer more when the server is wrong: far from the Bayes rule."""
    assert agreement(train_rejector("repo")) < 0.9


def test_shifted_weights_nonnegative_and_difference_is_cost_gap():
    m = torch.tensor([0.0, 1.0, 0.0, 1.0])
    e = torch.tensor([0.0, 0.0, 1.0, 1.0])
    for c_e, c_1 in [(0.0, 1.0), (0.3, 2.0), (1.5, 0.0)]:
        w0, w1 = l2h_weights(m, e, c_e, c_1, "shifted")
        assert (w0 >= 0).all() and (w1 >= 0).all()
        torch.testing.assert_close(w1 - w0, m - (c_e + c_1 * e))
    with pytest.raises(ValueError, match="unknown L2H weight variant"):
        l2h_weights(m, e, 0.1, 1.0, "nope")


def test_l01_cost():
    defer = torch.tensor([0, 0, 1, 1])
    m = torch.tensor([0.0, 1.0, 1.0, 1.0])
    e = torch.tensor([1.0, 1.0, 0.0, 1.0])
    torch.testing.assert_close(l01_cost(defer, m, e, 0.2, 0.5), torch.tensor([0.0, 1.0, 0.2, 0.7]))


def test_binary_alpha_domain_and_value():
    # authors' notebook: beta = 2, p = 0.18
    a = binary_alpha(0.1, 1.0, 2.0, 0.18)
    assert a == pytest.approx((0.1 + 2 * np.sqrt(0.08 * 0.92)) / 0.18)
    with pytest.raises(ValueError, match="c_e < p < c_1 \\+ c_e"):
        binary_alpha(0.3, 1.0, 2.0, 0.18)


@pytest.mark.parametrize("m_wrong,expect_defer", [(1.0, True), (0.0, False)])
def test_binary_surrogate_defers_iff_legacy_wrong_and_server_right(m_wrong, expect_defer):
    alpha = binary_alpha(0.1, 1.0, 2.0, 0.18)
    logits = torch.zeros(1, 2, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=0.05)
    for _ in range(300):
        loss = binary_rejector_loss(logits, torch.tensor([m_wrong]), torch.tensor([0.9]), 0.1, 1.0, 2.0, alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert bool(logits[0, 1] > logits[0, 0]) == expect_defer
