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
    assert_finite_differences(g, P, X, [k for k in P if k.startswith(("W_hh", "b_h"))] + ["X"],
                              lambda Pm, Xm: objective(Pm, Xm, h0, dHs, dh_T, cell))


def assert_finite_differences(g, P, X, keys, f, eps=1e-6):
    """g[key] equals the central differences of f(P, X) in P[key] (or in X for "X")"""
    for key in keys:
        base = X if key == "X" else P[key]
        num = np.zeros_like(base)
        for i in np.ndindex(base.shape):
            vals = []
            for s in (eps, -eps):
                moved = base.copy()
                moved[i] += s
                vals.append(f(P, moved) if key == "X" else f({**P, key: moved}, X))
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


# ------------------------------------------------------------ dCs: the LSTM's c_t at every step
def cell_case(rng, L, T=5, B=3, D=4, H=18, dense=True, dtype=np.float64):
    import reference
    P = {k: v.astype(dtype) for k, v in reference.init_stack(rng, "lstm", L, D, H, 6).items()}
    X = rng.normal(0, 1, (T, B, D)).astype(dtype) if dense else rng.integers(0, D, (T, B))
    h0 = (rng.normal(0, 0.5, (L, B, H)), rng.normal(0, 0.5, (L, B, H)))
    return P, X, h0, rng.normal(0, 1, (T, B, H)), rng.normal(0, 1, (T, B, H))


@pytest.mark.parametrize("truncation", [None, fastbptt.Truncated(1), fastbptt.Truncated(2),
                                        fastbptt.Randomized(0.5, seed=3)], ids=str)
@pytest.mark.parametrize("dense", [False, True], ids=["ids", "dense"])
@pytest.mark.parametrize("L", [1, 2, 3])
def test_cell_state_terms_match_the_reference(L, dense, truncation, rng):
    """dCs (∂L/∂c_t of the top layer at every step) beside dHs, from rnn_backward and from a
    kept forward, against the reference's plain per-step sweep (dCs_t joins step t's term)"""
    import reference
    from helpers import assert_close
    P, X, h0, dHs, dCs = cell_case(rng, L, dense=dense)
    k = truncation.k if isinstance(truncation, fastbptt.Truncated) else None
    xi = truncation.draw(5, np.float64) if isinstance(truncation, fastbptt.Randomized) else None
    want = reference.stack_backward(P, "lstm", X, dHs, *h0, k=k, xi=xi, dCs=dCs)
    Hs, _, kept = fastbptt.rnn_forward(P, X, tuple(h0), keep=True)
    _, _, _, Cs, _, _ = reference.stack_forward(P, "lstm", X, *h0)
    assert_close(fastbptt.api.kept_cell_states(kept), Cs[:, -1], np.float64, "Cs")
    for got in (fastbptt.rnn_backward(P, X, Hs, dHs, tuple(h0), truncation=truncation, dCs=dCs, input_grad=True),
                fastbptt.api.kept_backward(kept, dHs, truncation=truncation, dCs=dCs, input_grad=True)):
        assert set(got) == set(want)
        for key in want:
            assert_close(got[key], want[key], np.float64, key)
    without = fastbptt.rnn_backward(P, X, Hs, dHs, tuple(h0), truncation=truncation)
    assert np.abs(without["W_hh"] - want["W_hh"]).max() > 1e-3          # the terms count


def test_cell_state_terms_against_finite_differences(rng):
    """the gradient of Σ dHs ⊙ Hs + Σ dCs ⊙ Cs (the reference's forward), float64"""
    import reference
    P, X, h0, dHs, dCs = cell_case(rng, 2, T=4, B=2, H=3)

    def objective(Pm, Xm):
        _, _, Hr, Cr, _, _ = reference.stack_forward(Pm, "lstm", Xm, *h0)
        return float((Hr[:, -1] * dHs).sum() + (Cr[:, -1] * dCs).sum())
    g = fastbptt.rnn_backward(P, X, fastbptt.rnn_forward(P, X, tuple(h0)), dHs, tuple(h0), dCs=dCs, input_grad=True)
    assert_finite_differences(g, P, X, ["W_hh", "b_h", "W_hh_l1", "b_h_l1", "X"], objective)


@pytest.mark.parametrize("lanes", [2, 3, -2, -3])
def test_cell_state_terms_on_any_lanes(lanes, rng, monkeypatch):
    """the sweep's lanes split the units (2, 3: one of H = 40's lanes empty) or the rows (-2, -3):
    each lane reads its own part of dCs"""
    import reference
    from helpers import assert_close
    from fastbptt._cpu import plan
    blk = np.array([64, 64], np.int64)
    monkeypatch.setattr(plan.Plan, "sweep", lambda self, cell, dtype, B, H: (lanes, blk))
    P, X, h0, dHs, dCs = cell_case(rng, 2, B=13, H=40)
    want = reference.stack_backward(P, "lstm", X, dHs, *h0, dCs=dCs)
    got = fastbptt.rnn_backward(P, X, fastbptt.rnn_forward(P, X, tuple(h0)), dHs, tuple(h0), dCs=dCs)
    for key in got:
        assert_close(got[key], want[key], np.float64, key)


def test_cell_state_terms_float32(rng):
    import reference
    from helpers import assert_close
    P, X, h0, dHs, dCs = cell_case(rng, 2, dtype=np.float32)
    want = reference.stack_backward(P, "lstm", X, dHs, *h0, dCs=dCs)
    h0f = tuple(s.astype(np.float32) for s in h0)
    got = fastbptt.rnn_backward(P, X, fastbptt.rnn_forward(P, X, h0f), dHs, h0f, dCs=dCs)
    for key in got:
        assert got[key].dtype == np.float32
        assert_close(got[key], want[key], np.float32, key)


def test_bad_cell_state_terms_name_them(rng):
    P, X, h0, dHs, dCs = cell_case(rng, 2)
    Hs, _, kept = fastbptt.rnn_forward(P, X, tuple(h0), keep=True)
    before = dCs.copy()
    fastbptt.rnn_backward(P, X, Hs, dHs, tuple(h0), dCs=dCs)
    np.testing.assert_array_equal(dCs, before)                        # read, never written
    with pytest.raises(ValueError, match="dCs: expected shape"):
        fastbptt.rnn_backward(P, X, Hs, dHs, tuple(h0), dCs=dCs[:, :1])
    with pytest.raises(ValueError, match="dCs: non-finite"):
        fastbptt.api.kept_backward(kept, dHs, dCs=np.full_like(dCs, np.nan))
    with pytest.raises(ValueError, match="dCs: not with stored_states"):
        fastbptt.rnn_backward(P, X, Hs, dHs, tuple(h0), dCs=dCs, stored_states=2)
    G, Xg, h0g, dHg, _ = case(rng, "gru", 1)
    with pytest.raises(ValueError, match="dCs: the cell state's terms are the LSTM's"):
        fastbptt.rnn_backward(G, Xg, fastbptt.rnn_forward(G, Xg, h0g), dHg, h0g, dCs=dHg)
    _, _, kept_gru = fastbptt.rnn_forward(G, Xg, h0g, keep=True)
    with pytest.raises(ValueError, match="forward: cell states are the LSTM's"):
        fastbptt.api.kept_cell_states(kept_gru)
    with pytest.raises(ValueError, match="forward: expected"):
        fastbptt.api.kept_cell_states(None)
