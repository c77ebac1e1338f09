"""L2D surrogates: each minimiser's decision is the Bayes rule; masked experts are never chosen."""
import numpy as np
import pytest
import torch

from strategies.l2d_losses import ce_cost_loss, ce_loss, decide, l2d_costs, ova_loss

K = 3


def synthetic(p_y, p_ok, n_per_bin=400, seed=0):
    """Bins b with class distribution p_y[b] (K,) and expert-correct probabilities p_ok[b] (S,).

    Exact frequencies, not draws: in bin b, class k occurs exactly ``p_y[b][k] * n`` times and
    expert j is right on exactly ``p_ok[b][j] * n`` samples (independently placed), so the
    empirical loss is the expected loss of each bin with no sampling noise. Every surrogate here
    depends on a bin only through these marginals (alpha = 1)."""
    rng = np.random.default_rng(seed)
    bins, ys, oks = [], [], []
    for b, (py, pok) in enumerate(zip(p_y, p_ok)):
        counts = [p * n_per_bin for p in py] + [p * n_per_bin for p in pok]
        assert all(abs(c - round(c)) < 1e-9 for c in counts), "choose n_per_bin so every frequency is a count"
        bins.append(np.full(n_per_bin, b))
        ys.append(rng.permutation(np.repeat(np.arange(K), [round(p * n_per_bin) for p in py])))
        oks.append(np.stack([rng.permutation(np.arange(n_per_bin) < round(p * n_per_bin)) for p in pok], 1)
                   .astype(np.float32))
    return (torch.from_numpy(np.concatenate(bins)), torch.from_numpy(np.concatenate(ys)),
            torch.from_numpy(np.concatenate(oks)))


def minimise(loss_of_logits, num_bins, width, steps=1500):
    """A free logit vector per bin (the unconstrained minimiser of the expected surrogate)."""
    table = torch.zeros(num_bins, width, requires_grad=True)
    opt = torch.optim.Adam([table], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss_of_logits(table).backward()
        opt.step()
    return table.detach()


def bayes(p_y, p_ok, c_e, c_1, avail):
    """Least expected cost: keep (cost 1 - max_k P(k)) or defer to j (c_e[j] + c_1 (1 - P(M_j right)))."""
    out = []
    for py, pok in zip(p_y, p_ok):
        costs = [1 - max(py)] + [c_e[j] + c_1 * (1 - pok[j]) if avail[j] else np.inf for j in range(len(pok))]
        best = int(np.argmin(costs))
        out.append(best - 1)  # -1: keep local
    return out


# Bins chosen so every decision wins by a margin >= 0.1 in expected cost.
P_Y = [[0.9, 0.05, 0.05], [0.4, 0.3, 0.3], [0.5, 0.25, 0.25], [0.6, 0.2, 0.2], [0.34, 0.33, 0.33]]
P_OK_1 = [[0.5], [0.9], [0.65], [0.4], [0.5]]
P_OK_2 = [[0.5, 0.3], [0.9, 0.6], [0.55, 0.95], [0.4, 0.3], [0.5, 0.95]]


def fitted_choice(loss_name, p_y, p_ok, c_e, c_1, alpha=1.0, avail=None):
    s = len(p_ok[0])
    avail = torch.ones(s, dtype=torch.bool) if avail is None else avail
    b, y, ok = synthetic(p_y, p_ok)
    if loss_name == "ce":
        fn = lambda t: ce_loss(t[b], y, ok, avail, alpha)  # noqa: E731
    elif loss_name == "ova":
        fn = lambda t: ova_loss(t[b], y, ok, avail)  # noqa: E731
    else:
        costs = l2d_costs(y, ok, K, c_e, c_1)
        fn = lambda t: ce_cost_loss(t[b], costs, avail)  # noqa: E731
    table = minimise(fn, len(p_y), K + s)
    _, expert, score = decide(table, avail, loss_name, c_e, c_1)
    return [int(e) if sc > 0 else -1 for e, sc in zip(expert, score)]


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", ["ce", "ova", "ce_cost"])
def test_one_expert_minimiser_is_bayes_rule_without_price(loss_name):
    # Mozannar-Sontag's setting: no deferral price (c_e = 0, c_1 = 1), alpha = 1.
    got = fitted_choice(loss_name, P_Y, P_OK_1, [0.0], 1.0)
    assert got == bayes(P_Y, P_OK_1, [0.0], 1.0, [True])


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", ["ova", "ce_cost"])
def test_one_expert_minimiser_is_bayes_rule_with_price(loss_name):
    # c_e = 0.3 moves bins 2 and 4 from "defer" to "keep": the cost-aware forms follow it.
    want = bayes(P_Y, P_OK_1, [0.3], 1.0, [True])
    assert want != bayes(P_Y, P_OK_1, [0.0], 1.0, [True])
    assert fitted_choice(loss_name, P_Y, P_OK_1, [0.3], 1.0) == want


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", ["ce", "ova", "ce_cost"])
def test_two_experts_minimiser_picks_the_best_expert(loss_name):
    got = fitted_choice(loss_name, P_Y, P_OK_2, [0.0, 0.0], 1.0)
    want = bayes(P_Y, P_OK_2, [0.0, 0.0], 1.0, [True, True])
    assert got == want and {0, 1} <= set(want)


@pytest.mark.slow
def test_two_experts_with_different_prices():
    c_e = [0.0, 0.3]  # expert 1 is better in bins 2 and 4 but costs 0.3 more
    want = bayes(P_Y, P_OK_2, c_e, 1.0, [True, True])
    assert fitted_choice("ce_cost", P_Y, P_OK_2, c_e, 1.0) == want
    assert fitted_choice("ova", P_Y, P_OK_2, c_e, 1.0) == want


def test_unavailable_expert_is_never_chosen_and_gets_no_gradient():
    torch.manual_seed(0)
    logits = torch.randn(5000, K + 3) * 3
    logits[:, K + 1] += 10  # expert 1 would win almost everywhere ...
    avail = torch.tensor([True, False, True])  # ... but it is down
    for name in ("ce", "ce_cost", "ova"):
        _, expert, score = decide(logits, avail, name, [0.1, 0.1, 0.1], 1.0)
        assert not (expert == 1).any()
        assert (score > 0).any()  # it still defers, to the experts that are up
    none = decide(logits, torch.zeros(3, dtype=torch.bool), "ce", [0.1] * 3, 1.0)
    assert (none[2] <= 0).all() and (none[1] == -1).all()
    y = torch.randint(0, K, (64,))
    ok = torch.ones(64, 3)
    lg = torch.randn(64, K + 3, requires_grad=True)
    for loss in (ce_loss(lg, y, ok, avail), ova_loss(lg, y, ok, avail),
                 ce_cost_loss(lg, l2d_costs(y, ok, K, [0.1] * 3, 1.0), avail)):
        (g,) = torch.autograd.grad(loss, lg)
        assert torch.all(g[:, K + 1] == 0)


@pytest.mark.numeric
def test_cost_sensitive_form_reduces_to_mozannar_sontag():
    torch.manual_seed(1)
    lg = torch.randn(200, K + 1, dtype=torch.float64)
    y = torch.randint(0, K, (200,))
    ok = (torch.rand(200, 1) < 0.6).double()
    avail = torch.ones(1, dtype=torch.bool)
    a = ce_loss(lg, y, ok, avail, alpha=1.0)
    b = ce_cost_loss(lg, l2d_costs(y, ok, K, [0.0], 1.0), avail)
    # float64 means over 200 samples of terms below 2^4 (|log softmax| of randn logits, costs 0/1):
    # two orders are within 2 * 2^8 * 2^-53 * 2^4 = 2^-40 of each other
    assert a.dtype == b.dtype == torch.float64 and torch.allclose(a, b, rtol=0, atol=2.0 ** -40)
