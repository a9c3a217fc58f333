"""rnn_backward(dh_T=...): gradients that flow in through the last state of every layer (h_T,
and the LSTM's c_T), against central finite differences and, for Truncated(k), against its
definition (the full gradient of a forward over the last k steps from a constant state)."""
import numpy as np
import pytest

import fastbptt

CELLS = ["rnn", "gru", "lstm"]


def case(rng, cell, L, T=5, B=2, D=3, H=3):
    P = fastbptt.init_params(D, H, 4, np.float64, seed=int(rng.integers(1 << 30)), cell=cell, num_layers=L)
    for k in P:
        P[k] = P[k] * 60 if k.startswith("W") else P[k] + rng.normal(0, 0.3, P[k].shape)
    X = rng.normal(0, 1, (T, B, D))
    shape = (L, B, H) if L > 1 else (B, H)
    pair = lambda: (rng.normal(0, 0.5, shape), rng.normal(0, 0.5, shape)) if cell == "lstm" \
        else rng.normal(0, 0.5, shape)                                       # noqa: E731
    return P, X, pair(), rng.normal(0, 1, (T, B, H)), pair()


def objective(P, X, h0, dHs, dh_T, cell):
    """Σ dHs ⊙ Hs + Σ dh_T ⊙ (the last states): its gradient is rnn_backward's with dh_T"""
    Hs, last = fastbptt.rnn_forward(P, X, h0, return_state=True)
    pairs = zip(last, dh_T) if cell == "lstm" else [(last, dh_T)]
    return float((Hs * dHs).sum()) + sum(float((a * g).sum()) for a, g in pairs)


@pytest.mark.parametrize("L", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_last_state_gradient_against_finite_differences(cell, L, rng):
    P, X, h0, dHs, dh_T = case(rng, cell, L)
    g = fastbptt.rnn_backward(P, X, fastbptt.rnn_forward(P, X, h0), dHs, h0, dh_T=dh_T, input_grad=True)
    eps = 1e-6
    for key in [k for k in P if k.startswith(("W_hh", "b_h"))] + ["X"]:
        base = X if key == "X" else P[key]
        num = np.zeros_like(base)
        for i in np.ndindex(base.shape):
            vals = []
            for s in (eps, -eps):
                moved = base.copy()
                moved[i] += s
                Pm, Xm = (P, moved) if key == "X" else ({**P, key: moved}, X)
                vals.append(objective(Pm, Xm, h0, dHs, dh_T, cell))
            num[i] = (vals[0] - vals[1]) / (2 * eps)
        assert np.abs(g[key] - num).max() <= 1e-6 * max(1.0, np.abs(num).max()), key


@pytest.mark.parametrize("cell", CELLS)
def test_truncated_last_state_term_by_definition(cell, rng):
    """with dHs = 0 the only term is the last state's: Truncated(k) gives the full gradient of a
    forward over steps T-k+1..T from the states at T-k held constant"""
    L, T, k = 2, 6, 2
    P, X, h0, _, dh_T = case(rng, cell, L, T=T)
    zero = np.zeros((T, 2, 3))
    got = fastbptt.rnn_backward(P, X, fastbptt.rnn_forward(P, X, h0), zero, h0, dh_T=dh_T,
                                truncation=fastbptt.Truncated(k), input_grad=True)
    _, mid = fastbptt.rnn_forward(P, X[:T - k], h0, return_state=True)
    want = fastbptt.rnn_backward(P, X[T - k:], fastbptt.rnn_forward(P, X[T - k:], mid), zero[T - k:], mid,
                                 dh_T=dh_T, input_grad=True)
    for key in P:
        if key in want:
            assert np.abs(got[key] - want[key]).max() <= 1e-12 * max(1.0, np.abs(want[key]).max()), key
    assert np.abs(got["X"][:T - k]).max() == 0
    assert np.abs(got["X"][T - k:] - want["X"]).max() <= 1e-12 * max(1.0, np.abs(want["X"]).max())
    for s in ("h0",) + (("c0",) if cell == "lstm" else ()):
        assert np.abs(got[s]).max() == 0                  # T - k > 0 steps away: beyond the truncation


@pytest.mark.parametrize("cell", CELLS)
def test_with_stored_states_and_randomized(cell, rng):
    P, X, h0, dHs, dh_T = case(rng, cell, 2, T=7)
    Hs = fastbptt.rnn_forward(P, X, h0)
    for tr in (None, fastbptt.Randomized(0.5, seed=4), fastbptt.Truncated(3)):
        want = fastbptt.rnn_backward(P, X, Hs, dHs, h0, dh_T=dh_T, truncation=tr)
        for n in ("sqrt", 1, 3):
            got = fastbptt.rnn_backward(P, X, Hs, dHs, h0, dh_T=dh_T, truncation=tr, stored_states=n)
            for key in want:
                assert np.abs(got[key] - want[key]).max() <= 1e-12 * max(1.0, np.abs(want[key]).max()), (tr, n, key)


def test_bad_last_state_gradient_names_it(rng):
    P, X, h0, dHs, dh_T = case(rng, "lstm", 2)
    Hs = fastbptt.rnn_forward(P, X, h0)
    with pytest.raises(ValueError, match="dh_T"):
        fastbptt.rnn_backward(P, X, Hs, dHs, h0, dh_T=(dh_T[0][:1], dh_T[1]))
    with pytest.raises(ValueError, match="dc_T"):
        fastbptt.rnn_backward(P, X, Hs, dHs, h0, dh_T=(dh_T[0], dh_T[1][:, :1]))
    with pytest.raises(TypeError, match="dh_T"):
        fastbptt.rnn_backward(P, X, Hs, dHs, h0, dh_T=dh_T[0])
