"""fastbptt's public API against the independent float64 reference (tests/reference.py)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastbptt
import reference
from helpers import assert_close, make_case

ACTS = ["tanh", "relu", "identity"]
DTYPES = [np.float64, np.float32]
GRAD_KEYS = ("W_xh", "W_hh", "b_h", "W_hq", "b_q", "h0")


def cast(params, dtype):
    return {k: v.astype(dtype) for k, v in params.items()}


def check_against_reference(params, X, Y, h0, act="tanh", truncation=None, k=None, xi=None,
                            reduction="mean"):
    dtype = params["W_hh"].dtype
    want = reference.loss_and_grad(params, X, Y, h0, act, k=k, xi=xi, reduction=reduction)
    loss, grads, h_T = fastbptt.loss_and_grad(params, X, Y, h0, activation=act,
                                              truncation=truncation, reduction=reduction)
    assert isinstance(loss, float)
    assert_close(loss, want.loss, dtype, "loss")
    assert_close(h_T, want.h_T, dtype, "h_T")
    assert set(grads) == set(GRAD_KEYS)
    for name in GRAD_KEYS:
        assert grads[name].dtype == dtype, name
        assert_close(grads[name], want.grads[name], dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
def test_full_gradient_matches_reference(dtype, act, dense, with_h0, rng):
    params, X, Y, h0 = make_case(rng, T=6, B=3, D=11, H=7, Q=13, dense=dense, h0=with_h0)
    check_against_reference(cast(params, dtype), X, Y, h0, act)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("k", [1, 2, 3, 6, 9])
@pytest.mark.parametrize("dense", [False, True])
def test_truncated_matches_per_term_reference(dtype, act, k, dense, rng):
    params, X, Y, h0 = make_case(rng, T=6, B=2, D=5, H=7, Q=4, dense=dense)
    check_against_reference(cast(params, dtype), X, Y, h0, act, fastbptt.Truncated(k), k=min(k, 6))


# T·B = 2200 rows: five K slices in ∂W_hh; H = 130: three row panels and masked tile
# columns; Q = 67 and D = 66: the head and the dense input in several tile columns.
# B = 1 and 2 with B·H² over CPU_SERIAL_MACS: steps split over threads with fewer rows
# than one 4-row tile; B = 20, H = 70: one-thread steps too large for the BLAS step.
# (The other tests' small shapes take the one-thread BLAS step.)
BLOCKED_SHAPES = [dict(T=40, B=55, D=66, H=130, Q=67), dict(T=5, B=2, D=5, H=370, Q=7),
                  dict(T=4, B=1, D=70, H=520, Q=3), dict(T=7, B=20, D=9, H=70, Q=5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("truncation,k", [(None, None), (fastbptt.Truncated(3), 3)])
@pytest.mark.parametrize("shape", BLOCKED_SHAPES)
def test_matches_reference_at_shapes_that_reach_every_blocked_path(shape, dtype, dense, truncation,
                                                                   k, rng):
    # W_hh's spectral radius ≈ 0.8: float32 rounding is not amplified along 40 steps
    params, X, Y, h0 = make_case(rng, **shape, dense=dense, scale=0.8 / np.sqrt(shape["H"]))
    check_against_reference(cast(params, dtype), X, Y, h0, "tanh", truncation, k=k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_randomized_matches_reference_with_same_xi(dtype, act, rng):
    params, X, Y, h0 = make_case(rng, T=8, B=2, D=5, H=6, Q=5)
    tr = fastbptt.Randomized(0.4, seed=123)
    xi = tr.draw(8, np.float64)
    assert 0 < np.count_nonzero(xi) < 8          # the case exercises both branches
    check_against_reference(cast(params, dtype), X, Y, h0, act, tr, xi=xi)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduction(reduction, rng):
    params, X, Y, h0 = make_case(rng, T=4, B=3)
    check_against_reference(params, X, Y, h0, reduction=reduction)


def test_sum_is_T_times_B_times_mean(rng):
    params, X, Y, h0 = make_case(rng, T=4, B=3)
    lm, gm, _ = fastbptt.loss_and_grad(params, X, Y, h0)
    ls, gs, _ = fastbptt.loss_and_grad(params, X, Y, h0, reduction="sum")
    assert ls == pytest.approx(12 * lm, rel=1e-12)
    for name in GRAD_KEYS:
        np.testing.assert_allclose(gs[name], 12 * gm[name], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (1, 3, 4, 5, 6), (5, 1, 4, 5, 6),
                                   (4, 3, 4, 1, 6), (4, 3, 1, 5, 1)])
@pytest.mark.parametrize("truncation", [None, 1, 2])
def test_degenerate_shapes(dtype, shape, truncation, rng):
    T, B, D, H, Q = shape
    params, X, Y, h0 = make_case(rng, T=T, B=B, D=D, H=H, Q=Q)
    k = None if truncation is None or truncation >= T else truncation
    tr = None if truncation is None else fastbptt.Truncated(truncation)
    check_against_reference(cast(params, dtype), X, Y, h0, truncation=tr, k=k)


def test_truncated_k_ge_T_equals_full_exactly(rng):
    params, X, Y, h0 = make_case(rng, T=5)
    _, full, _ = fastbptt.loss_and_grad(params, X, Y, h0)
    for k in (5, 6, 100):
        _, trunc, _ = fastbptt.loss_and_grad(params, X, Y, h0, truncation=fastbptt.Truncated(k))
        for name in GRAD_KEYS:
            np.testing.assert_array_equal(trunc[name], full[name])


def test_full_string_equals_none(rng):
    params, X, Y, h0 = make_case(rng)
    _, a, _ = fastbptt.loss_and_grad(params, X, Y, h0, truncation="full")
    _, b, _ = fastbptt.loss_and_grad(params, X, Y, h0)
    for name in GRAD_KEYS:
        np.testing.assert_array_equal(a[name], b[name])


def test_truncated_1_drops_every_crossing(rng):
    """k = 1: ∂W_hh is Σ_t h_{t-1}ᵀ (dH_t ⊙ φ'), no W_hh product anywhere in dz."""
    params, X, Y, h0 = make_case(rng, T=5, B=2, D=4, H=3, Q=4)
    _, got, _ = fastbptt.loss_and_grad(params, X, Y, h0, truncation=fastbptt.Truncated(1))
    x, Z, Hs = reference.forward(params, X, h0, "tanh")
    _, dH, _, _ = reference.head(params, Hs, Y, 1 / 10)
    dZ = dH * (1 - Hs ** 2)
    hprev = np.concatenate([h0[None], Hs[:-1]])
    np.testing.assert_allclose(got["W_hh"], np.einsum("tbi,tbj->ij", hprev, dZ), rtol=1e-10)
    np.testing.assert_allclose(got["h0"], dZ[0] @ params["W_hh"].T, rtol=1e-10)


# --------------------------------------------------------------- finite differences
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dense", [False, True])
def test_gradient_matches_central_differences(act, dense, rng):
    params, X, Y, h0 = make_case(rng, T=5, B=2, D=4, H=5, Q=3, dense=dense)
    _, grads, _ = fastbptt.loss_and_grad(params, X, Y, h0, activation=act)
    arrays = dict(params, h0=h0)
    eps = 1e-6
    for name, arr in arrays.items():
        for _ in range(3):
            idx = tuple(rng.integers(0, n) for n in arr.shape)
            old = arr[idx]
            arr[idx] = old + eps
            up = fastbptt.loss_and_grad(params, X, Y, h0, activation=act)[0]
            arr[idx] = old - eps
            down = fastbptt.loss_and_grad(params, X, Y, h0, activation=act)[0]
            arr[idx] = old
            num = (up - down) / (2 * eps)
            assert abs(grads[name][idx] - num) <= 1e-7 + 1e-5 * abs(num), (name, idx)


# ----------------------------------------------------------------- rnn_forward/backward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("k", [None, 1, 3])
def test_rnn_forward_backward_match_reference(dtype, act, dense, k, rng):
    params, X, _, h0 = make_case(rng, T=5, B=3, D=6, H=4, Q=2, dense=dense)
    rnn = {key: params[key].astype(dtype) for key in ("W_xh", "W_hh", "b_h")}
    Hs = fastbptt.rnn_forward(rnn, X, h0, activation=act)
    _, _, want_Hs = reference.forward(rnn, X, h0, act)
    assert Hs.dtype == dtype and Hs.shape == (5, 3, 4)
    assert_close(Hs, want_Hs, dtype, "Hs")
    dHs = rng.normal(size=Hs.shape)
    tr = None if k is None else fastbptt.Truncated(k)
    got = fastbptt.rnn_backward(rnn, X, Hs, dHs, h0, activation=act, truncation=tr)
    want = reference.rnn_backward(rnn, X, dHs, h0, act, k=k)
    assert set(got) == {"W_xh", "W_hh", "b_h", "h0"}
    for name in got:
        assert_close(got[name], want[name], dtype, name)


def test_rnn_functions_accept_full_params(rng):
    params, X, Y, h0 = make_case(rng)
    Hs = fastbptt.rnn_forward(params, X, h0)
    _, _, h_T = fastbptt.loss_and_grad(params, X, Y, h0)
    np.testing.assert_array_equal(Hs[-1], h_T)


def test_loss_forward_only_matches(rng):
    params, X, Y, h0 = make_case(rng, T=4, B=3)
    for reduction in ("mean", "sum"):
        got, h_T = fastbptt.loss(params, X, Y, h0, reduction=reduction)
        want = reference.loss_and_grad(params, X, Y, h0, reduction=reduction)
        assert got == pytest.approx(want.loss, rel=1e-10)
        np.testing.assert_allclose(h_T, want.h_T, rtol=1e-10)


# ------------------------------------------------------------------- chunking identity
def test_chunking_with_carried_state_is_full_minus_cross_boundary_terms(rng):
    """Split at T1, carry h_{T1} detached.  Exact identity (sum reduction):
    full = g(second half) + rnn_backward(first half, dHs with ∂L2/∂h_{T1} added at its last step),
    and the chunked gradient g1 + g2 misses exactly that added flow."""
    params, X, Y, h0 = make_case(rng, T=7, B=2, D=5, H=4, Q=5)
    T1 = 3
    _, full, _ = fastbptt.loss_and_grad(params, X, Y, h0, reduction="sum")
    _, g1, h_mid = fastbptt.loss_and_grad(params, X[:T1], Y[:T1], h0, reduction="sum")
    _, g2, _ = fastbptt.loss_and_grad(params, X[T1:], Y[T1:], h_mid, reduction="sum")
    # the head's direct terms of the first half, then the carried adjoint at its end
    x, Z, Hs = reference.forward(params, X[:T1], h0, "tanh")
    _, dH, _, _ = reference.head(params, Hs, Y[:T1], 1.0)
    dH[-1] += g2["h0"]
    Hs1 = fastbptt.rnn_forward(params, X[:T1], h0)
    g1_through = fastbptt.rnn_backward(params, X[:T1], Hs1, dH, h0)
    for name in ("W_xh", "W_hh", "b_h"):
        np.testing.assert_allclose(g1_through[name] + g2[name], full[name], rtol=1e-10, atol=1e-13)
        cross = full[name] - (g1[name] + g2[name])
        assert np.abs(cross).max() > 1e-6                  # the chunks do miss something
    np.testing.assert_allclose(g1_through["h0"], full["h0"], rtol=1e-10, atol=1e-13)
    for name in ("W_hq", "b_q"):
        np.testing.assert_allclose(g1[name] + g2[name], full[name], rtol=1e-10, atol=1e-13)


def test_length_one_chunks_equal_truncated_1(rng):
    """Windows of one step with the state carried and detached == Truncated(1) (sum reduction)."""
    params, X, Y, h0 = make_case(rng, T=5, B=2)
    _, want, _ = fastbptt.loss_and_grad(params, X, Y, h0, truncation=fastbptt.Truncated(1),
                                        reduction="sum")
    total = {k: 0.0 for k in ("W_xh", "W_hh", "b_h", "W_hq", "b_q")}
    h = h0
    for t in range(5):
        _, g, h = fastbptt.loss_and_grad(params, X[t:t + 1], Y[t:t + 1], h, reduction="sum")
        for k in total:
            total[k] = total[k] + g[k]
    for k in total:
        np.testing.assert_allclose(total[k], want[k], rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------- randomized
def test_randomized_same_seed_same_gradient_and_p1_exact(rng):
    params, X, Y, h0 = make_case(rng, T=10)
    _, a, _ = fastbptt.loss_and_grad(params, X, Y, h0, truncation=fastbptt.Randomized(0.3, seed=7))
    _, b, _ = fastbptt.loss_and_grad(params, X, Y, h0, truncation=fastbptt.Randomized(0.3, seed=7))
    _, full, _ = fastbptt.loss_and_grad(params, X, Y, h0)
    _, one, _ = fastbptt.loss_and_grad(params, X, Y, h0, truncation=fastbptt.Randomized(1.0))
    differs = False
    for name in GRAD_KEYS:
        np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(one[name], full[name])
        differs |= not np.allclose(a[name], full[name])
    assert differs


def test_randomized_is_unbiased(rng):
    """Mean over seeds → full gradient, within 5 standard errors per coordinate."""
    params, X, Y, h0 = make_case(rng, T=6, B=2, D=4, H=3, Q=4)
    _, full, _ = fastbptt.loss_and_grad(params, X, Y, h0)
    n = 3000
    samples = {k: [] for k in GRAD_KEYS}
    for s in range(n):
        _, g, _ = fastbptt.loss_and_grad(params, X, Y, h0, truncation=fastbptt.Randomized(0.5, seed=s))
        for k in GRAD_KEYS:
            samples[k].append(g[k])
    for k in GRAD_KEYS:
        S = np.array(samples[k])
        mean, se = S.mean(axis=0), S.std(axis=0, ddof=1) / np.sqrt(n)
        assert np.all(np.abs(mean - full[k]) <= 5 * se + 1e-12), k
        if k in ("W_hh", "h0"):
            assert se.max() > 0                       # the estimator is random here


# ------------------------------------------------------------------------- hypothesis
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 6), B=st.integers(1, 4), D=st.integers(1, 6), H=st.integers(1, 6),
       Q=st.integers(1, 6), act=st.sampled_from(ACTS), dense=st.booleans(), with_h0=st.booleans(),
       k=st.one_of(st.none(), st.integers(1, 7)), seed=st.integers(0, 2**31),
       scale=st.floats(0.01, 2.0))
def test_hypothesis_matches_reference(T, B, D, H, Q, act, dense, with_h0, k, seed, scale):
    rng = np.random.default_rng(seed)
    params, X, Y, h0 = make_case(rng, T=T, B=B, D=D, H=H, Q=Q, dense=dense, h0=with_h0, scale=scale)
    tr = None if k is None else fastbptt.Truncated(k)
    check_against_reference(params, X, Y, h0, act, tr, k=None if k is None or k >= T else k)


# ------------------------------------------------------------------- layouts, no writes
def test_inputs_unmodified_and_layouts_give_identical_results(rng):
    params, X, Y, h0 = make_case(rng, T=5, B=3, D=6, H=4, Q=5, dtype=np.float32)
    copies = {k: v.copy() for k, v in params.items()}
    X0, Y0, h00 = X.copy(), Y.copy(), h0.copy()
    loss, grads, h_T = fastbptt.loss_and_grad(params, X, Y, h0)
    for k in params:
        np.testing.assert_array_equal(params[k], copies[k])
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(Y, Y0)
    np.testing.assert_array_equal(h0, h00)

    def readonly(a):
        a = a.copy()
        a.flags.writeable = False
        return a

    variants = [
        ({k: np.asfortranarray(v) for k, v in params.items()}, np.asfortranarray(X), np.asfortranarray(Y),
         np.asfortranarray(h0)),
        ({k: readonly(v) for k, v in params.items()}, readonly(X), readonly(Y), readonly(h0)),
        ({k: np.repeat(v, 2, axis=-1)[..., ::2] for k, v in params.items()},
         np.repeat(X, 2, axis=0)[::2], np.repeat(Y, 2, axis=1)[:, ::2], np.repeat(h0, 2, axis=0)[::2]),
        (params, X.astype(np.int32), Y.astype(np.uint8), h0.astype(np.float64)),   # cast to float32
    ]
    for p, x, y, h in variants:
        l2, g2, hT2 = fastbptt.loss_and_grad(p, x, y, h)
        assert l2 == loss
        np.testing.assert_array_equal(hT2, h_T)
        for k in grads:
            assert g2[k].dtype == np.float32
            np.testing.assert_array_equal(g2[k], grads[k])


def test_dense_input_views_and_no_writes(rng):
    params, X, Y, h0 = make_case(rng, T=4, B=3, D=6, H=4, Q=5, dense=True)
    X0 = X.copy()
    _, grads, _ = fastbptt.loss_and_grad(params, X, Y, h0)
    np.testing.assert_array_equal(X, X0)
    _, g2, _ = fastbptt.loss_and_grad(params, np.asfortranarray(X), Y, h0)
    for k in grads:
        np.testing.assert_array_equal(g2[k], grads[k])
    Hs = fastbptt.rnn_forward(params, X, h0)
    dHs = rng.normal(size=Hs.shape)
    keep = (Hs.copy(), dHs.copy())
    fastbptt.rnn_backward(params, X, Hs, dHs, h0)
    np.testing.assert_array_equal(Hs, keep[0])
    np.testing.assert_array_equal(dHs, keep[1])


def test_results_are_not_the_next_calls_buffers(rng):
    # the direct terms are copied into a buffer kept for the next call: nothing handed out
    # lives there, so a second call of the same shapes leaves the first one's results as they were
    params, X, Y, h0 = make_case(rng, T=5, B=3, D=6, H=4, Q=5)
    Hs = fastbptt.rnn_forward(params, X, h0)
    first = [fastbptt.rnn_backward(params, X, Hs, rng.normal(size=Hs.shape), h0),
             fastbptt.rnn_adjoints(params, X, Hs, rng.normal(size=Hs.shape), h0)]
    kept = [{k: v.copy() for k, v in first[0].items()}, first[1].copy()]
    fastbptt.rnn_backward(params, X, Hs, rng.normal(size=Hs.shape), h0)
    fastbptt.rnn_adjoints(params, X, Hs, rng.normal(size=Hs.shape), h0)
    assert all(np.array_equal(first[0][k], kept[0][k]) for k in kept[0])
    np.testing.assert_array_equal(first[1], kept[1])


def test_mixed_param_dtypes_promote(rng):
    params, X, Y, h0 = make_case(rng, dtype=np.float32)
    params["b_q"] = params["b_q"].astype(np.float64)
    _, grads, h_T = fastbptt.loss_and_grad(params, X, Y, h0)
    assert all(g.dtype == np.float64 for g in grads.values()) and h_T.dtype == np.float64


# ------------------------------------------------------------------------- init_params
def test_init_params_shapes_scale_and_seed():
    p = fastbptt.init_params(28, 512, 30, seed=3)
    assert {k: v.shape for k, v in p.items()} == {
        "W_xh": (28, 512), "W_hh": (512, 512), "b_h": (512,), "W_hq": (512, 30), "b_q": (30,)}
    assert all(v.dtype == np.float32 for v in p.values())
    assert 0.009 < p["W_hh"].std() < 0.011 and not p["b_h"].any()
    q = fastbptt.init_params(28, 512, 30, seed=3)
    r = fastbptt.init_params(28, 512, 30, seed=4)
    assert all(np.array_equal(p[k], q[k]) for k in p)
    assert not np.array_equal(p["W_hh"], r["W_hh"])
    assert fastbptt.init_params(2, 3, 4, dtype=np.float64)["W_xh"].dtype == np.float64


def test_init_params_uniform_is_pytorchs_and_the_gated_cells_default():
    H = 400
    s = 1 / np.sqrt(H)
    for cell in ("rnn", "gru", "lstm"):
        p = fastbptt.init_params(28, H, 30, seed=1, cell=cell, num_layers=2, init="uniform")
        for k, v in p.items():
            if not k.startswith("b_h") or k.startswith("b_hn"):     # one U(-s, s) each
                assert np.abs(v).max() <= s, k
                if v.size >= 400:
                    assert np.abs(v).max() > 0.95 * s and abs(v.std() - s / np.sqrt(3)) < 0.15 * s / np.sqrt(3), k
        for l in ("", "_l1"):
            b = p[f"b_h{l}"].astype(np.float64)
            two = b if cell != "gru" else b[:2 * H]             # bias_ih + bias_hh: the sum of two
            assert np.abs(two).max() <= 2 * s and np.abs(two).max() > s
            assert abs(two.std() - s * np.sqrt(2 / 3)) < 0.15 * s * np.sqrt(2 / 3)
            if cell == "gru":                                   # the n block: bias_ih alone
                assert np.abs(b[2 * H:]).max() <= s
    for cell in ("gru", "lstm"):                                # the gated cells' default
        d = fastbptt.init_params(5, 6, 7, seed=2, cell=cell)
        u = fastbptt.init_params(5, 6, 7, seed=2, cell=cell, init="uniform")
        assert all(np.array_equal(d[k], u[k]) for k in d)
        n = fastbptt.init_params(5, 6, 7, seed=2, cell=cell, init="normal")
        assert not n["b_h"].any() and 0.005 < n["W_hh"].std() < 0.015
    r = fastbptt.init_params(5, 6, 7, seed=2)                  # rnn: normal, as it always was
    assert all(np.array_equal(r[k], v) for k, v in fastbptt.init_params(5, 6, 7, seed=2, init="normal").items())
    for bad in ("torch", "", 1):
        with pytest.raises(ValueError, match="init: expected one of 'normal', 'uniform'"):
            fastbptt.init_params(5, 6, 7, init=bad)


def test_rnn_adjoints_are_the_full_sweeps_adjoints(rng):
    params, X, _, h0 = make_case(rng, T=5, B=2, D=4, H=3, Q=2)
    Hs = fastbptt.rnn_forward(params, X, h0)
    dHs = rng.normal(size=Hs.shape)
    A = fastbptt.rnn_adjoints(params, X, Hs, dHs, h0)
    assert A.shape == (6, 2, 3)
    np.testing.assert_allclose(A[0], fastbptt.rnn_backward(params, X, Hs, dHs, h0)["h0"], rtol=1e-12)
    np.testing.assert_array_equal(A[5], dHs[4])
    # a_t = ∂L/∂h_t: perturb h_2 through its pre-activation and compare L = Σ dHs·h
    eps = 1e-6
    x, Z, _ = reference.forward(params, X, h0, "tanh")
    for b, i in ((0, 1), (1, 2)):
        Ls = []
        for sgn in (1, -1):
            h = np.asarray(Hs[1]).copy()
            h[b, i] += sgn * eps
            hs = [h]
            for t in range(2, 5):
                hs.append(np.tanh(params["W_xh"][X[t]] + hs[-1] @ params["W_hh"] + params["b_h"]))
            Ls.append(sum((dHs[t] * hs[t - 1]).sum() for t in range(1, 5)))
        assert A[2][b, i] == pytest.approx((Ls[0] - Ls[1]) / (2 * eps), rel=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_changes_only_rounding(threads, rng):
    import numba
    params, X, Y, h0 = make_case(rng, T=7, B=9, D=6, H=90, Q=70, scale=0.15)
    want = reference.loss_and_grad(params, X, Y, h0)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        loss, grads, _ = fastbptt.loss_and_grad(params, X, Y, h0, truncation=fastbptt.Truncated(2))
        loss_full, grads_full, _ = fastbptt.loss_and_grad(params, X, Y, h0)
    finally:
        numba.set_num_threads(before)
    assert_close(loss_full, want.loss, np.float64, "loss")
    for name in GRAD_KEYS:
        assert_close(grads_full[name], want.grads[name], np.float64, name)
    trunc = reference.loss_and_grad(params, X, Y, h0, k=2)
    for name in GRAD_KEYS:
        assert_close(grads[name], trunc.grads[name], np.float64, name)


def test_calls_from_several_python_threads_at_once(rng):
    # more threads than cores: each call's lanes wait for one another at every step
    # (spin barrier, yielding the core after a while) and must still give the same result
    import threading
    params, X, Y, h0 = make_case(rng, T=12, B=16, D=6, H=160, Q=9, scale=0.5 / np.sqrt(160))
    params = cast(params, np.float32)
    want_loss, want_grads, _ = fastbptt.loss_and_grad(params, X, Y, h0)
    results = [None] * 4

    def work(i):
        results[i] = [fastbptt.loss_and_grad(params, X, Y, h0) for _ in range(5)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for runs in results:
        for loss, grads, _ in runs:
            assert loss == want_loss
            for name in GRAD_KEYS:
                assert np.array_equal(grads[name], want_grads[name])
