"""The float64 reference itself, checked with central finite differences."""
import numpy as np
import pytest

import reference
from helpers import make_case

EPS = 1e-6


def numeric_grad(f, arr, idx):
    old = arr[idx]
    arr[idx] = old + EPS
    up = f()
    arr[idx] = old - EPS
    down = f()
    arr[idx] = old
    return (up - down) / (2 * EPS)


@pytest.mark.parametrize("act", ["tanh", "relu", "identity"])
@pytest.mark.parametrize("dense", [False, True])
def test_reference_matches_finite_differences(act, dense, rng):
    params, X, Y, h0 = make_case(rng, T=4, B=3, D=5, H=4, Q=6, dense=dense)
    res = reference.loss_and_grad(params, X, Y, h0, act)
    arrays = dict(params, h0=h0)
    for name, arr in arrays.items():
        for _ in range(4):
            idx = tuple(rng.integers(0, n) for n in arr.shape)
            num = numeric_grad(lambda: reference.loss_only(params, X, Y, h0, act), arr, idx)
            assert abs(res.grads[name][idx] - num) <= 1e-7 + 1e-5 * abs(num), (name, idx)


def test_reference_truncated_k_ge_T_equals_full(rng):
    params, X, Y, h0 = make_case(rng, T=5)
    full = reference.loss_and_grad(params, X, Y, h0)
    trunc = reference.loss_and_grad(params, X, Y, h0, k=5)
    for name in full.grads:
        np.testing.assert_allclose(trunc.grads[name], full.grads[name], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# The stack reference (every cell, every depth)
# ---------------------------------------------------------------------------------------------

CELLS = ["rnn", "gru", "lstm"]


def stack_case(rng, cell, L, dense, T=4, B=3, D=5, H=4, Q=5):
    params = reference.init_stack(rng, cell, L, D, H, Q)
    X = rng.normal(0, 1, (T, B, D)) if dense else rng.integers(0, D, (T, B))
    Y = rng.integers(0, Q, (T, B))
    h0 = rng.normal(0, 0.5, (L, B, H))
    c0 = rng.normal(0, 0.5, (L, B, H)) if cell == "lstm" else None
    return params, X, Y, h0, c0


def assert_grads_equal(got, want, keys=None, rtol=1e-12, atol=1e-14):
    keys = want.keys() if keys is None else keys
    for name in keys:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("dense", [False, True])
def test_stack_reference_matches_finite_differences(cell, L, dense, rng):
    params, X, Y, h0, c0 = stack_case(rng, cell, L, dense)
    res = reference.stack_loss_and_grad(params, cell, X, Y, h0, c0)
    arrays = dict(params, h0=h0)
    if cell == "lstm":
        arrays["c0"] = c0
    if dense:
        arrays["X"] = X
    assert set(res.grads) == set(arrays)
    f = lambda: reference.stack_loss_only(params, cell, X, Y, h0, c0)[0]   # noqa: E731
    for name, arr in arrays.items():
        assert res.grads[name].shape == arr.shape, name
        for _ in range(3):
            idx = tuple(rng.integers(0, n) for n in arr.shape)
            num = numeric_grad(f, arr, idx)
            assert abs(res.grads[name][idx] - num) <= 1e-8 + 1e-6 * abs(num), (name, idx)
    loss, hT, cT = reference.stack_loss_only(params, cell, X, Y, h0, c0)
    assert loss == res.loss
    np.testing.assert_array_equal(hT, res.hT)
    assert (cT is None) == (cell != "lstm")


@pytest.mark.parametrize("act", ["relu", "identity"])
def test_stack_reference_rnn_activations_finite_differences(act, rng):
    params, X, Y, h0, _ = stack_case(rng, "rnn", 2, True)
    res = reference.stack_loss_and_grad(params, "rnn", X, Y, h0, act=act, reduction="sum")
    f = lambda: reference.stack_loss_only(params, "rnn", X, Y, h0, act=act, reduction="sum")[0]  # noqa
    for name, arr in dict(params, h0=h0, X=X).items():
        for _ in range(3):
            idx = tuple(rng.integers(0, n) for n in arr.shape)
            num = numeric_grad(f, arr, idx)
            assert abs(res.grads[name][idx] - num) <= 1e-8 + 1e-6 * abs(num), (name, idx)


@pytest.mark.parametrize("cell", CELLS)
def test_stack_truncated_k_ge_T_equals_full(cell, rng):
    params, X, Y, h0, c0 = stack_case(rng, cell, 2, True)
    full = reference.stack_loss_and_grad(params, cell, X, Y, h0, c0)
    for k in (4, 7):
        trunc = reference.stack_loss_and_grad(params, cell, X, Y, h0, c0, k=k)
        assert_grads_equal(trunc.grads, full.grads)


@pytest.mark.parametrize("cell", CELLS)
def test_stack_special_cases(cell, rng):
    params, X, Y, h0, c0 = stack_case(rng, cell, 2, True)
    full = reference.stack_loss_and_grad(params, cell, X, Y, h0, c0)
    # xi all ones = full
    ones = reference.stack_loss_and_grad(params, cell, X, Y, h0, c0, xi=np.ones(4))
    assert_grads_equal(ones.grads, full.grads)
    # xi all zeros = k=1, except the initial states: k=1 lets l_1 reach h0 (t <= k), xi_1 = 0 does not
    zeros = reference.stack_loss_and_grad(params, cell, X, Y, h0, c0, xi=np.zeros(4))
    k1 = reference.stack_loss_and_grad(params, cell, X, Y, h0, c0, k=1)
    states = {"h0", "c0"}
    assert_grads_equal(zeros.grads, k1.grads, keys=set(full.grads) - states)
    for name in states & set(full.grads):
        assert not zeros.grads[name].any()
        assert np.abs(k1.grads[name]).max() > 1e-6
    # k=1 for T=1: truncation is irrelevant
    one = reference.stack_loss_and_grad(params, cell, X[:1], Y[:1], h0, c0)
    one_k = reference.stack_loss_and_grad(params, cell, X[:1], Y[:1], h0, c0, k=1)
    assert_grads_equal(one_k.grads, one.grads)
    # k=1: nothing crosses a step, so the gradient is the sum over t of the T=1 gradients of l_t
    # from the (constant) states at t-1
    _, _, Hs, Cs, _, _ = reference.stack_forward(params, cell, X, h0, c0)
    want = {name: np.zeros_like(g) for name, g in full.grads.items()}
    for t in range(4):
        hp = h0 if t == 0 else Hs[t - 1]
        cp = (c0 if t == 0 else Cs[t - 1]) if cell == "lstm" else None
        g = reference.stack_loss_and_grad(params, cell, X[t:t + 1], Y[t:t + 1], hp, cp,
                                          reduction="sum").grads
        for name in want:
            if name == "X":
                want[name][t] += g[name][0] / 12
            elif name in states:
                want[name] += g[name] / 12 if t == 0 else 0.0
            else:
                want[name] += g[name] / 12
    assert_grads_equal(k1.grads, want)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_stack_truncated_is_sum_of_window_gradients(cell, k, rng):
    """Truncated(k) = sum over t of the full gradient of l_t alone, computed on the window
    t-k+1..t started from the forward's (constant) states at step t-k."""
    T = 4
    params, X, Y, h0, c0 = stack_case(rng, cell, 2, True, T=T)
    trunc = reference.stack_loss_and_grad(params, cell, X, Y, h0, c0, k=k)
    _, _, Hs, Cs, _, _ = reference.stack_forward(params, cell, X, h0, c0)
    _, dH, _, _ = reference.head(params, Hs[:, -1], Y, 1.0 / (T * 3))
    want = {name: np.zeros_like(g) for name, g in trunc.grads.items()}
    want["W_hq"], want["b_q"] = trunc.grads["W_hq"], trunc.grads["b_q"]     # the head is untruncated
    for t in range(T):
        s0 = max(0, t - k + 1)
        hp = h0 if s0 == 0 else Hs[s0 - 1]
        cp = (c0 if s0 == 0 else Cs[s0 - 1]) if cell == "lstm" else None
        d = np.zeros((t + 1 - s0,) + dH.shape[1:])
        d[-1] = dH[t]
        g = reference.stack_backward(params, cell, X[s0:t + 1], d, hp, cp)
        for name, v in g.items():
            if name == "X":
                want["X"][s0:t + 1] += v
            elif name in ("h0", "c0"):
                want[name] += v if s0 == 0 else 0.0
            else:
                want[name] += v
    assert_grads_equal(trunc.grads, want, atol=1e-13)


@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("dense", [False, True])
def test_stack_one_layer_rnn_equals_reference(act, dense, rng):
    params, X, Y, h0, _ = stack_case(rng, "rnn", 1, dense)
    xi = rng.uniform(0, 1, 4)
    for kw in (dict(), dict(k=2), dict(xi=xi), dict(reduction="sum")):
        want = reference.loss_and_grad(params, X, Y, h0[0], act, **kw)
        got = reference.stack_loss_and_grad(params, "rnn", X, Y, h0, act=act, **kw)
        got2 = reference.stack_loss_and_grad(params, "rnn", X, Y, h0[0], act=act, **kw)  # (B,H) h0
        assert got.loss == pytest.approx(want.loss, rel=1e-12)
        np.testing.assert_allclose(got.hT[0], want.h_T, rtol=1e-12, atol=1e-14)
        for name in want.grads:
            g = got.grads[name][0] if name == "h0" else got.grads[name]
            np.testing.assert_allclose(g, want.grads[name], rtol=1e-12, atol=1e-14, err_msg=name)
            np.testing.assert_array_equal(got2.grads[name], got.grads[name])
        dHs = rng.normal(0, 1, (4, 3, 4))
        want_b = reference.rnn_backward(params, X, dHs, h0[0], act, k=kw.get("k"), xi=kw.get("xi"))
        got_b = reference.stack_backward(params, "rnn", X, dHs, h0, act=act, k=kw.get("k"), xi=kw.get("xi"))
        for name in want_b:
            g = got_b[name][0] if name == "h0" else got_b[name]
            np.testing.assert_allclose(g, want_b[name], rtol=1e-12, atol=1e-14, err_msg=name)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_stack_matches_torch(cell, rng):
    """Forward (gate order, b_hn placement) and the full backward against torch.nn.GRU / LSTM."""
    torch = pytest.importorskip("torch")
    L, T, B, D, H = 2, 4, 3, 5, 4
    params, X, _, h0, c0 = stack_case(rng, cell, L, True, T=T, B=B, D=D, H=H)
    net = (torch.nn.GRU if cell == "gru" else torch.nn.LSTM)(D, H, num_layers=L).double()
    with torch.no_grad():
        for l in range(L):
            s = reference.suffix(l)
            b_hh = rng.normal(0, 0.5, net.__getattr__(f"bias_hh_l{l}").shape)
            if cell == "gru":
                b_hh[2 * H:] = params["b_hn" + s]
                b_ih = params["b_h" + s] - np.concatenate([b_hh[:2 * H], np.zeros(H)])
            else:
                b_ih = params["b_h" + s] - b_hh
            for name, v in ((f"weight_ih_l{l}", params["W_xh" + s].T), (f"weight_hh_l{l}", params["W_hh" + s].T),
                            (f"bias_ih_l{l}", b_ih), (f"bias_hh_l{l}", b_hh)):
                getattr(net, name).copy_(torch.from_numpy(np.ascontiguousarray(v)))
    tX = torch.tensor(X, requires_grad=True)
    th0 = torch.tensor(h0, requires_grad=True)
    tc0 = torch.tensor(c0, requires_grad=True) if cell == "lstm" else None
    out, state = net(tX, th0 if cell == "gru" else (th0, tc0))
    _, _, Hs, Cs, _, _ = reference.stack_forward(params, cell, X, h0, c0)
    np.testing.assert_allclose(out.detach().numpy(), Hs[:, -1], rtol=1e-12, atol=1e-14)
    hT = state if cell == "gru" else state[0]
    np.testing.assert_allclose(hT.detach().numpy(), Hs[-1], rtol=1e-12, atol=1e-14)
    if cell == "lstm":
        np.testing.assert_allclose(state[1].detach().numpy(), Cs[-1], rtol=1e-12, atol=1e-14)
    dHs = rng.normal(0, 1, (T, B, H))
    (out * torch.from_numpy(dHs)).sum().backward()
    got = reference.stack_backward(params, cell, X, dHs, h0, c0)
    close = lambda a, b, n: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=n)  # noqa
    close(got["X"], tX.grad.numpy(), "X")
    close(got["h0"], th0.grad.numpy(), "h0")
    if cell == "lstm":
        close(got["c0"], tc0.grad.numpy(), "c0")
    for l in range(L):
        s = reference.suffix(l)
        close(got["W_xh" + s], getattr(net, f"weight_ih_l{l}").grad.numpy().T, "W_xh" + s)
        close(got["W_hh" + s], getattr(net, f"weight_hh_l{l}").grad.numpy().T, "W_hh" + s)
        close(got["b_h" + s], getattr(net, f"bias_ih_l{l}").grad.numpy(), "b_h" + s)
        if cell == "gru":
            close(got["b_hn" + s], getattr(net, f"bias_hh_l{l}").grad.numpy()[2 * H:], "b_hn" + s)


@pytest.mark.parametrize("cell", CELLS)
def test_stack_randomized_zero_cuts_into_segments(cell, rng):
    """xi = (1, 1, 0, 1): the gradient is the full gradient of steps 1-2 from h0 plus the full
    gradient of steps 3-4 started from the forward's (constant) states at step 2."""
    params, X, Y, h0, c0 = stack_case(rng, cell, 2, True)
    got = reference.stack_loss_and_grad(params, cell, X, Y, h0, c0, xi=np.array([1.0, 1.0, 0.0, 1.0]))
    _, _, Hs, Cs, _, _ = reference.stack_forward(params, cell, X, h0, c0)
    first = reference.stack_loss_and_grad(params, cell, X[:2], Y[:2], h0, c0, reduction="sum").grads
    second = reference.stack_loss_and_grad(params, cell, X[2:], Y[2:], Hs[1],
                                           Cs[1] if cell == "lstm" else None, reduction="sum").grads
    want = {}
    for name in got.grads:
        if name == "X":
            want[name] = np.concatenate([first[name], second[name]]) / 12
        elif name in ("h0", "c0"):
            want[name] = first[name] / 12
        else:
            want[name] = (first[name] + second[name]) / 12
    assert_grads_equal(got.grads, want, atol=1e-13)


@pytest.mark.parametrize("cell", CELLS)
def test_stack_reference_with_input_masks_matches_finite_differences(cell, rng):
    # inter-layer dropout: layer l reads masks[l-1] ⊙ h^{(l-1)}_t, the backward carries the same masks
    params, X, _, h0, c0 = stack_case(rng, cell, 3, True)
    T, B = X.shape[:2]
    H = params["W_hh"].shape[0]
    masks = [rng.choice([0.0, 2.0], size=(T, B, H)) for _ in range(2)]
    dHs = rng.normal(0, 1, (T, B, H))
    got = reference.stack_backward(params, cell, X, dHs, h0, c0, masks=masks)
    arrays = {name: params[name] for name in got if name in params}
    arrays.update(X=X, h0=h0, **({"c0": c0} if cell == "lstm" else {}))
    assert set(got) == set(arrays)
    f = lambda: float((reference.stack_forward(params, cell, X, h0, c0, masks=masks)[2][:, -1] * dHs).sum())  # noqa
    for name, arr in arrays.items():
        for _ in range(3):
            idx = tuple(rng.integers(0, n) for n in arr.shape)
            num = numeric_grad(f, arr, idx)
            assert abs(got[name][idx] - num) <= 1e-8 + 1e-6 * abs(num), (name, idx)
    # the masks matter: without them, other gradients
    assert not np.allclose(reference.stack_backward(params, cell, X, dHs, h0, c0)["W_xh"], got["W_xh"])
