"""Every cell and depth on the CPU against the independent float64 reference (tests/reference.py):
token and dense input, with and without an initial state, every truncation, float32 and
float64, degenerate sizes, lanes in any order; and the errors a wrong cell or state gets."""
import numpy as np
import pytest

import fastbptt
import reference
from fastbptt._cpu import plan
from helpers import assert_close

CELLS = ("rnn", "gru", "lstm")
TRUNCATIONS = (None, fastbptt.Truncated(1), fastbptt.Truncated(2), fastbptt.Randomized(0.5, seed=3))


def case(rng, cell, L, T=4, B=3, D=5, H=18, Q=6, dense=False, state=True, dtype=np.float64):
    """params in ``dtype``, inputs, targets and the state as the API takes it (or None), and
    the float64 h0, c0 the reference takes (None: zeros).  H = 18: a full group of 16 units
    and a narrower one."""
    params = {k: v.astype(dtype) for k, v in reference.init_stack(rng, cell, L, D, H, Q).items()}
    X = rng.normal(0, 1, (T, B, D)).astype(dtype) if dense else rng.integers(0, D, (T, B))
    Y = rng.integers(0, Q, (T, B))
    h0 = c0 = None
    if state:
        h0 = rng.normal(0, 0.5, (L, B, H))
        c0 = rng.normal(0, 0.5, (L, B, H)) if cell == "lstm" else None
    given = None if not state else ((h0.astype(dtype), c0.astype(dtype)) if cell == "lstm" else h0.astype(dtype))
    return params, X, Y, given, h0, c0


def reference_for(params, cell, X, Y, h0, c0, truncation, T):
    k = truncation.k if isinstance(truncation, fastbptt.Truncated) else None
    xi = truncation.draw(T, np.float64) if isinstance(truncation, fastbptt.Randomized) else None
    return reference.stack_loss_and_grad(params, cell, X, Y, h0, c0, k=k, xi=xi)


def stacked(a, want):
    """a one-layer state as the API gives it for a (B,H) or None h0: (B,H); the reference's (1,B,H)"""
    return a[None] if a.ndim == 2 and np.ndim(want) == 3 else a


def check(got_loss, got, got_state, want, cell, dtype):
    assert_close(got_loss, want.loss, dtype, "loss")
    for key, g in want.grads.items():
        if key == "X":
            continue
        assert got[key].dtype == np.dtype(dtype), key
        assert_close(stacked(got[key], g), g, dtype, key)
    assert set(got) == set(want.grads) - {"X"}
    states = got_state if cell == "lstm" else (got_state,)
    assert_close(stacked(states[0], want.hT), want.hT, dtype, "h_T")
    if cell == "lstm":
        assert_close(stacked(states[1], want.cT), want.cT, dtype, "c_T")


@pytest.mark.parametrize("truncation", TRUNCATIONS, ids=str)
@pytest.mark.parametrize("state", [True, False], ids=["state", "zeros"])
@pytest.mark.parametrize("dense", [False, True], ids=["ids", "dense"])
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_loss_and_grad_matches_the_reference(cell, L, dense, state, truncation, rng):
    params, X, Y, given, h0, c0 = case(rng, cell, L, dense=dense, state=state)
    want = reference_for(params, cell, X, Y, h0, c0, truncation, X.shape[0])
    loss, grads, last = fastbptt.loss_and_grad(params, X, Y, given, truncation=truncation)
    check(loss, grads, last, want, cell, np.float64)
    if L > 1:                                   # the state comes back stacked
        for a in (last if cell == "lstm" else (last,)):
            assert a.shape == (L, X.shape[1], 18)


@pytest.mark.parametrize("truncation", [None, fastbptt.Truncated(2)], ids=str)
@pytest.mark.parametrize("L", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_float32_matches_the_float64_reference(cell, L, truncation, rng):
    params, X, Y, given, h0, c0 = case(rng, cell, L, T=6, B=5, H=37, dtype=np.float32)
    want = reference_for(params, cell, X, Y, h0, c0, truncation, X.shape[0])
    loss, grads, last = fastbptt.loss_and_grad(params, X, Y, given, truncation=truncation)
    check(loss, grads, last, want, cell, np.float32)


@pytest.mark.parametrize("T,B,H", [(1, 1, 1), (1, 3, 2), (3, 1, 1), (2, 2, 17)])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_degenerate_sizes(cell, T, B, H, rng):
    params, X, Y, given, h0, c0 = case(rng, cell, 2, T=T, B=B, H=H, D=3, Q=2)
    for truncation in (None, fastbptt.Truncated(1)):
        want = reference_for(params, cell, X, Y, h0, c0, truncation, T)
        check(*fastbptt.loss_and_grad(params, X, Y, given, truncation=truncation), want, cell, np.float64)


@pytest.mark.parametrize("lanes", [2, 3, 5])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_sweeps_are_exact_on_any_lanes(cell, lanes, rng, monkeypatch):
    # more lanes than threads, narrow lanes and an empty one (H = 40 in chunks of 16 units)
    blk = np.array([64, 64], np.int64)
    monkeypatch.setattr(plan.Plan, "sweep", lambda self, cell, dtype, B, H: (lanes, blk))
    params, X, Y, given, h0, c0 = case(rng, cell, 2, T=5, B=3, H=40)
    for truncation in (None, fastbptt.Truncated(2)):         # the sweeps, and the chains
        want = reference_for(params, cell, X, Y, h0, c0, truncation, 5)
        check(*fastbptt.loss_and_grad(params, X, Y, given, truncation=truncation), want, cell, np.float64)


@pytest.mark.parametrize("lanes", [1, 2, -2])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_weights_given_as_their_transposes(cell, dense, lanes, rng, monkeypatch):
    # every weight matrix given as Wᵀ's transpose (torch's layout, as fastbptt.torch gives them):
    # packed from it as it is, and the same results to the bit as from W itself, in float32
    # on lanes that interleave the gates' columns, one lane and rows split
    blk = np.array([64, 64], np.int64)
    monkeypatch.setattr(plan.Plan, "sweep", lambda self, cell, dtype, B, H: (lanes, blk))
    params, X, Y, given, _, _ = case(rng, cell, 2, T=5, B=3, H=40, D=21, dense=dense, dtype=np.float32)
    views = {k: np.ascontiguousarray(v.T).T if v.ndim == 2 else v for k, v in params.items()}
    assert not views["W_hh"].flags.c_contiguous
    for truncation in (None, fastbptt.Truncated(2)):
        loss, grads, last = fastbptt.loss_and_grad(params, X, Y, given, truncation=truncation)
        loss2, grads2, last2 = fastbptt.loss_and_grad(views, X, Y, given, truncation=truncation)
        assert loss2 == loss
        assert all(np.array_equal(grads2[k], grads[k]) for k in grads)
        assert all(np.array_equal(a, b) for a, b in zip(np.atleast_1d(last2), np.atleast_1d(last)))
    if dense:
        Hs = fastbptt.rnn_forward(params, X, given)
        g = fastbptt.rnn_backward(params, X, Hs, np.ones_like(Hs), given, input_grad=True)
        g2 = fastbptt.rnn_backward(views, X, Hs, np.ones_like(Hs), given, input_grad=True)
        assert all(np.array_equal(g2[k], g[k]) for k in g)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_row_split_sweeps_sum_each_row_as_one_lane(cell, rng, monkeypatch):
    # the rows split in chunks (a plan's lanes = -r): every row summed as on one lane, for any
    # chunks and thread count (B = 13: chunks of 4-row tiles, a row left over, and with three
    # chunks an empty one), and exact against the reference.  The plan is fixed: each thread
    # count has a plan of its own, whose measured blocking may slice K otherwise
    import numba
    params, X, Y, given, h0, c0 = case(rng, cell, 2, T=5, B=13, H=40)
    blk = np.array([64, 64], np.int64)
    monkeypatch.setattr(plan.Plan, "blk", lambda self, kind, *shape: blk)
    before = numba.get_num_threads()
    got = {}
    try:
        for lanes in (1, -2, -3):
            monkeypatch.setattr(plan.Plan, "sweep", lambda self, cell, dtype, B, H, n=lanes: (n, blk))
            for threads in (1, 2):
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                for k in (None, 2):
                    truncation = None if k is None else fastbptt.Truncated(k)
                    got[lanes, threads, k] = fastbptt.loss_and_grad(params, X, Y, given, truncation=truncation)
    finally:
        numba.set_num_threads(before)
    for (lanes, threads, k), (loss, grads, last) in got.items():
        one = got[1, 1, k]
        assert loss == one[0], (lanes, threads, k)
        assert all(np.array_equal(grads[key], one[1][key]) for key in grads), (lanes, threads, k)
        assert all(np.array_equal(a, b) for a, b in zip(np.atleast_1d(last), np.atleast_1d(one[2])))
    for k in (None, 2):
        truncation = None if k is None else fastbptt.Truncated(k)
        check(*got[-2, 2, k], reference_for(params, cell, X, Y, h0, c0, truncation, 5), cell, np.float64)


def test_one_rnn_layer_is_todays_model(rng):
    # the (B,H) state, the keys and the results of a one-layer "rnn" stay as they were
    params, X, Y, _, h0, _ = case(rng, "rnn", 1, H=7)
    assert set(params) == set(fastbptt.init_params(5, 7, 6))
    loss, grads, h_T = fastbptt.loss_and_grad(params, X, Y, h0[0], truncation=fastbptt.Truncated(2))
    old = reference.loss_and_grad(params, X, Y, h0[0], k=2)
    assert h_T.shape == (3, 7) and grads["h0"].shape == (3, 7)
    assert_close(loss, old.loss, np.float64)
    for key in old.grads:
        assert_close(grads[key], old.grads[key], np.float64, key)


def test_randomized_truncation_is_unbiased_for_a_gated_stack(rng):
    params, X, Y, given, h0, c0 = case(rng, "lstm", 2, T=6, B=2, H=5)
    full = fastbptt.loss_and_grad(params, X, Y, given)[1]
    keys = sorted(full)
    draws = np.array([np.concatenate([fastbptt.loss_and_grad(
        params, X, Y, given, truncation=fastbptt.Randomized(0.5, seed=s))[1][k].ravel() for k in keys])
        for s in range(300)])
    want = np.concatenate([full[k].ravel() for k in keys])
    sem = draws.std(axis=0) / np.sqrt(len(draws))
    z = np.abs(draws.mean(axis=0) - want) / np.maximum(sem, 1e-12)
    assert np.all(z[sem > 0] < 5), z.max()       # every entry within 5 standard errors
    assert np.mean(z[sem > 0] < 2) > 0.85        # and most within 2, as a normal mean would be
    assert np.all(draws.std(axis=0)[sem == 0] == 0)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_rnn_forward_backward_and_adjoints_for_gated_cells(cell, rng):
    params, X, _, given, h0, c0 = case(rng, cell, 1, dense=True)
    T, B = X.shape[:2]
    Hs, last = fastbptt.rnn_forward(params, X, given, return_state=True)
    ref = reference.stack_loss_only(params, cell, X, np.zeros((T, B), int), h0, c0)
    assert_close(Hs[-1], ref[1][0], np.float64, "h_T")
    dHs = rng.normal(0, 1, Hs.shape)
    for truncation in (None, fastbptt.Truncated(2)):
        k = truncation.k if truncation else None
        want = reference.stack_backward(params, cell, X, dHs, h0, c0, k=k)
        got = fastbptt.rnn_backward(params, X, Hs, dHs, given, truncation=truncation, input_grad=True)
        for key in want:
            assert_close(got[key], want[key], np.float64, key)
    # the adjoints: with dHs at the last step only, A[0] is ∂l_T/∂h_0 (the reference's dh0)
    dHs = np.zeros_like(Hs)
    dHs[-1] = rng.normal(0, 1, (B, 18))
    A = fastbptt.rnn_adjoints(params, X, Hs, dHs, given)
    want = reference.stack_backward(params, cell, X, dHs, h0, c0)
    assert A.shape == (T + 1, B, 18)
    assert_close(A[0], want["h0"][0], np.float64, "A[0]")
    assert_close(A[-1], dHs[-1], np.float64, "A[T]")


@pytest.mark.parametrize("truncation", TRUNCATIONS, ids=str)
@pytest.mark.parametrize("dense", [False, True], ids=["ids", "dense"])
@pytest.mark.parametrize("L", [2, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_input_masks_match_the_reference(cell, L, dense, truncation, rng):
    # inter-layer dropout: layer l reads input_masks[l-1] ⊙ h^{(l-1)}_t, forward and backward,
    # every truncation's chains through the masks; kept (kept_backward) or recomputed alike
    params, X, _, given, h0, c0 = case(rng, cell, L, dense=dense)
    T, B, H = X.shape[0], X.shape[1], 18
    masks = [rng.choice([0.0, 1 / 0.6], size=(T, B, H), p=[0.4, 0.6]) for _ in range(L - 1)]
    k = truncation.k if isinstance(truncation, fastbptt.Truncated) else None
    xi = truncation.draw(T, np.float64) if isinstance(truncation, fastbptt.Randomized) else None
    Hs, _, kept = fastbptt.rnn_forward(params, X, given, keep=True, input_masks=masks)
    want_Hs = reference.stack_forward(params, cell, X, h0, c0, masks=masks)[2][:, -1]
    assert_close(Hs, want_Hs, np.float64, "Hs")
    dHs = rng.normal(0, 1, Hs.shape)
    want = reference.stack_backward(params, cell, X, dHs, h0, c0, k=k, xi=xi, masks=masks)
    for got in (fastbptt.rnn_backward(params, X, Hs, dHs, given, truncation=truncation, input_grad=True,
                                      input_masks=masks),
                fastbptt.api.kept_backward(kept, dHs, truncation=truncation, input_grad=True)):
        assert set(got) == set(want) - ({"X"} if not dense else set())
        for key in got:
            assert_close(got[key], want[key], np.float64, key)


def test_input_masks_errors(rng):
    params, X, _, given, _, _ = case(rng, "gru", 2)
    T, B = X.shape
    ones = np.ones((T, B, 18))
    with pytest.raises(ValueError, match=r"input_masks: expected None or a list of num_layers - 1 = 1 arrays"):
        fastbptt.rnn_forward(params, X, given, input_masks=[ones, ones])
    with pytest.raises(TypeError, match="input_masks: expected None or a list"):
        fastbptt.rnn_forward(params, X, given, input_masks=ones)
    with pytest.raises(ValueError, match=r"input_masks\[0\]: expected shape"):
        fastbptt.rnn_forward(params, X, given, input_masks=[ones[:, :1]])
    with pytest.raises(ValueError, match=r"input_masks\[0\]: non-finite"):
        fastbptt.rnn_forward(params, X, given, input_masks=[ones * np.nan])
    with pytest.raises(ValueError, match="input_masks: not with stored_states"):
        fastbptt.rnn_backward(params, X, np.zeros((T, B, 18)), np.ones((T, B, 18)), given, input_masks=[ones],
                              stored_states=2)
    Hs, _, kept = fastbptt.rnn_forward(params, X, given, keep=True, input_masks=[ones * 2])
    with pytest.raises(ValueError, match=r"for other values of input_masks\[0\]"):
        fastbptt.rnn_backward(params, X, Hs, Hs, given, forward=kept, input_masks=[ones])
    _, _, plain = fastbptt.rnn_forward(params, X, given, keep=True)
    with pytest.raises(ValueError, match="for other values of input_masks"):
        fastbptt.rnn_backward(params, X, Hs, Hs, given, forward=plain, input_masks=[ones])
    assert np.array_equal(ones, np.ones((T, B, 18)))                 # never modified


def test_init_params_for_every_cell_and_depth():
    for cell, G in (("rnn", 1), ("gru", 3), ("lstm", 4)):
        p = fastbptt.init_params(7, 5, 3, cell=cell, num_layers=3, seed=0)
        assert fastbptt.cell_of(p) == (cell, 3)
        assert p["W_xh"].shape == (7, G * 5) and p["W_xh_l2"].shape == (5, G * 5)
        assert p["W_hh_l1"].shape == (5, G * 5) and p["b_h_l1"].shape == (G * 5,)
        assert ("b_hn_l2" in p) == (cell == "gru")
    one = fastbptt.init_params(7, 5, 3, seed=0)
    np.testing.assert_array_equal(fastbptt.init_params(7, 5, 3, seed=0, cell="rnn", num_layers=1)["W_hh"],
                                  one["W_hh"])


def test_inputs_are_not_modified(rng):
    params, X, Y, given, _, _ = case(rng, "lstm", 2, dense=True)
    before = ({k: v.copy() for k, v in params.items()}, X.copy(), tuple(a.copy() for a in given))
    fastbptt.loss_and_grad(params, X, Y, given, truncation=fastbptt.Truncated(2))
    for k in params:
        np.testing.assert_array_equal(params[k], before[0][k])
    np.testing.assert_array_equal(X, before[1])
    for a, b in zip(given, before[2]):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------- bad input
def bad(params, X, Y, h0=None, **kw):
    return lambda: fastbptt.loss_and_grad(params, X, Y, h0, **kw)


def test_errors_name_the_parameter_and_the_expected_shape(rng):
    p, X, Y, _, _, _ = case(rng, "gru", 2)
    B, H = X.shape[1], 18
    with pytest.raises(ValueError,
                       match=r"params\['W_hh'\]: shape \(18, 54\) is a gru's; cell='lstm' expects \(18, 72\)"):
        bad(p, X, Y, cell="lstm")()
    with pytest.raises(ValueError, match=r"params\['W_hh'\]: expected shape \(H,H\).*got \(18, 36\)"):
        bad(dict(p, W_hh=np.zeros((H, 2 * H))), X, Y)()
    with pytest.raises(ValueError, match=r"params\['W_hh_l1'\]: expected shape \(18, 54\)"):
        bad(dict(p, W_hh_l1=np.zeros((H, 4 * H))), X, Y)()
    with pytest.raises(KeyError, match="b_hn_l1"):
        bad({k: v for k, v in p.items() if k != "b_hn_l1"}, X, Y)()
    with pytest.raises(ValueError, match=r"h0: expected shape \(2, 3, 18\)"):
        bad(p, X, Y, np.zeros((3, B, H)))()
    with pytest.raises(ValueError, match=r"h0: expected shape \(2, 3, 18\)"):
        bad(p, X, Y, np.zeros((B, H)))()                 # a (B,H) state is for one layer
    with pytest.raises(ValueError, match="activation: 'relu' applies to the 'rnn' cell only"):
        bad(p, X, Y, activation="relu")()
    with pytest.raises(ValueError, match="cell: expected one of"):
        bad(p, X, Y, cell="transformer")()
    q, X, Y, _, _, _ = case(rng, "lstm", 2)
    with pytest.raises(TypeError, match=r"h0: an LSTM's state is a tuple \(h0, c0\)"):
        bad(q, X, Y, np.zeros((2, B, H)))()                  # c0 missing
    with pytest.raises(ValueError, match=r"c0: expected shape \(2, 3, 18\)"):
        bad(q, X, Y, (np.zeros((2, B, H)), np.zeros((1, B, H))))()
    with pytest.raises(ValueError, match="num_layers"):
        fastbptt.init_params(3, 4, 5, num_layers=0)


@pytest.mark.parametrize("cell", CELLS)
def test_a_kept_forward_gives_the_recomputed_gradients(cell, rng):
    # rnn_forward(keep=True) keeps every layer's gates in buffers of its own: a later call of the
    # same shapes does not touch them, and rnn_backward(forward=) gives the recomputed result
    params, X, _, given, _, _ = case(rng, cell, 2, dense=True)
    Hs, _, kept = fastbptt.rnn_forward(params, X, given, keep=True)
    fastbptt.rnn_forward(params, X[::-1].copy(), given, keep=True)
    fastbptt.loss_and_grad(params, X, np.zeros(X.shape[:2], int))
    dHs = rng.normal(0, 1, Hs.shape)
    want = fastbptt.rnn_backward(params, X, Hs, dHs, given, input_grad=True)
    got = fastbptt.rnn_backward(params, X, Hs, dHs, given, input_grad=True, forward=kept)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    with pytest.raises(ValueError, match="forward: expected what rnn_forward"):
        fastbptt.rnn_backward(params, X[:2], Hs[:2], dHs[:2], given, forward=kept)
    # ... and of the same values: other params, X or h0 of the same shapes are refused
    for other, name in (({**params, "W_hh": params["W_hh"] * 0.5}, "params\\['W_hh'\\]"), (X + 1, "X"),
                        (tuple(s + 1 for s in given) if cell == "lstm" else given + 1, "h0")):
        args = [params, X, given]
        args[{"X": 1, "h0": 2}.get(name, 0)] = other
        with pytest.raises(ValueError, match=f"forward: kept .* for other values of {name}"):
            fastbptt.rnn_backward(args[0], args[1], Hs, dHs, args[2], forward=kept)
    copies = ({k: v.copy() for k, v in params.items()}, X.copy())    # equal values: accepted
    got = fastbptt.rnn_backward(*copies, Hs, dHs, given, input_grad=True, forward=kept)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # with forward=, Hs is not read: only its dtype and shape are checked
    unread = np.full_like(Hs, np.nan)
    got = fastbptt.rnn_backward(params, X, unread, dHs, given, input_grad=True, forward=kept)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    with pytest.raises(ValueError, match="Hs: expected shape"):
        fastbptt.rnn_backward(params, X, Hs[:, :1], dHs, given, forward=kept)
    with pytest.raises(TypeError, match="Hs: expected a float array"):
        fastbptt.rnn_backward(params, X, Hs.astype(int), dHs, given, forward=kept)
    with pytest.raises(ValueError, match="Hs: non-finite"):                 # read without forward=
        fastbptt.rnn_backward(params, X, unread, dHs, given)
    # kept_backward (the PyTorch bridge's): the same, from the forward's validated inputs
    got = fastbptt.api.kept_backward(kept, dHs, input_grad=True)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    with pytest.raises(ValueError, match="dHs: expected shape"):
        fastbptt.api.kept_backward(kept, dHs[:, :1])
    with pytest.raises(ValueError, match="forward: expected what rnn_forward"):
        fastbptt.api.kept_backward(None, dHs)


@pytest.mark.parametrize("cell", CELLS)
def test_a_kept_forward_owns_inputs_made_contiguous_in_reused_buffers(cell, rng):
    # a (B,H) h0 in Fortran order and a read-only weight given as its transpose are made
    # contiguous in buffers that the next call of the same shapes reuses: the kept forward
    # holds copies, so another call between it and the backward changes nothing, and a
    # backward given other values of them is refused
    params, X, _, given, _, _ = case(rng, cell, 1, dense=True)
    fortran = tuple(np.asfortranarray(s[0]) for s in given) if cell == "lstm" else np.asfortranarray(given[0])
    other = tuple(np.asfortranarray(s[0] + 1) for s in given) if cell == "lstm" else np.asfortranarray(given[0] + 1)
    W_hh = np.ascontiguousarray(params["W_hh"].T).T
    W_hh.flags.writeable = False
    ro = dict(params, W_hh=W_hh)
    Hs, _, kept = fastbptt.rnn_forward(ro, X, fortran, keep=True)
    W_other = np.ascontiguousarray(-3 * params["W_hh"].T).T
    W_other.flags.writeable = False
    fastbptt.rnn_forward(dict(params, W_hh=W_other), X, other)           # overwrites those buffers
    dHs = rng.normal(0, 1, Hs.shape)
    want = fastbptt.rnn_backward(params, X, Hs, dHs, fortran)
    for got in (fastbptt.rnn_backward(ro, X, Hs, dHs, fortran, forward=kept), fastbptt.api.kept_backward(kept, dHs)):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    with pytest.raises(ValueError, match="for other values of h0"):
        fastbptt.rnn_backward(ro, X, Hs, dHs, other, forward=kept)
    with pytest.raises(ValueError, match=r"for other values of params\['W_hh'\]"):
        fastbptt.rnn_backward(dict(params, W_hh=W_other), X, Hs, dHs, fortran, forward=kept)


def test_a_kept_forward_with_nan_that_check_finite_lets_through_is_the_same_input(rng):
    params = fastbptt.init_params(3, 2, 3, dtype=np.float64, seed=0)
    X, h0 = np.zeros((2, 1), int), np.array([[np.nan, 0.5]])
    Hs, _, kept = fastbptt.rnn_forward(params, X, h0, keep=True, check_finite=False)
    got = fastbptt.rnn_backward(params, X, Hs, np.ones_like(Hs), h0.copy(), forward=kept, check_finite=False)
    assert np.isnan(got["W_hh"]).any()
    with pytest.raises(ValueError, match="for other values of h0"):
        fastbptt.rnn_backward(params, X, Hs, np.ones_like(Hs), np.array([[np.nan, 0.25]]), forward=kept,
                              check_finite=False)


@pytest.mark.parametrize("cell", CELLS)
def test_backward_without_state_gradients(cell, rng):
    """state_grads=False: the same parameter gradients (and ∂X), no "h0" nor "c0" """
    params, X, _, given, _, _ = case(rng, cell, 2, dense=True)
    Hs, _, kept = fastbptt.rnn_forward(params, X, given, keep=True)
    dHs = rng.normal(0, 1, Hs.shape)
    want = fastbptt.api.kept_backward(kept, dHs, input_grad=True)
    for got in (fastbptt.api.kept_backward(kept, dHs, input_grad=True, state_grads=False),
                fastbptt.rnn_backward(params, X, Hs, dHs, given, input_grad=True, state_grads=False)):
        assert set(got) == set(want) - {"h0", "c0"}
        for key in got:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_kept_records_are_taken_again_once_released(rng):
    """a framework's loop keeps one forward at a time: the buffers of a released one serve the
    next (no fresh pages every step), never those of one still held"""
    params, X, _, given, _, _ = case(rng, "lstm", 2, dense=True)
    gates = lambda kept: {id(lay.Z) for lay in kept.lays}             # noqa: E731
    _, _, first = fastbptt.rnn_forward(params, X, given, keep=True)
    held = gates(first)
    _, _, second = fastbptt.rnn_forward(params, X, given, keep=True)
    assert not gates(second) & held
    del first
    X2 = X[::-1].copy()
    Hs, _, third = fastbptt.rnn_forward(params, X2, given, keep=True)
    assert gates(third) == held
    dHs = rng.normal(0, 1, Hs.shape)
    want = fastbptt.rnn_backward(params, X2, Hs, dHs, given, input_grad=True)
    got = fastbptt.rnn_backward(params, X2, Hs, dHs, given, input_grad=True, forward=third)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize("cell", ("gru", "lstm"))
def test_a_closed_gate_closes_in_float32_as_in_float64(cell):
    """σ(-50) ≈ 2e-22: the GRU's z·h and the LSTM's f·c of a huge state vanish in float32 as in
    float64 (the float32 sigmoid is accurate relative to itself, not only to 2.5e-7)"""
    G = {"gru": 3, "lstm": 4}[cell]
    W_xh = np.zeros((1, G))
    W_xh[0, {"gru": 1, "lstm": 1}[cell]] = -50.0          # the GRU's z, the LSTM's f: closed
    got = {}
    for dt in (np.float32, np.float64):
        p = {"W_xh": W_xh, "W_hh": np.zeros((1, G)), "b_h": np.zeros(G), "W_hq": [[1.0, -1.0]], "b_q": np.zeros(2)}
        p = {k: np.asarray(v, dt) for k, v in (dict(p, b_hn=np.zeros(1)) if cell == "gru" else p).items()}
        big = np.full((1, 1), 1e6, dt)
        h0 = (big, big) if cell == "lstm" else big
        _, _, last = fastbptt.loss_and_grad(p, np.zeros((1, 1), int), np.zeros((1, 1), int), h0)
        got[dt] = np.abs(np.asarray(last[1] if cell == "lstm" else last, np.float64)).max()
    assert got[np.float64] < 1e-10 and got[np.float32] < 1e-10


@pytest.mark.parametrize("cell", ("rnn", "gru", "lstm"))
def test_no_gradient_leaks_through_a_saturated_tanh_in_float32(cell):
    """tanh(100) is 1 in float32 and 1 − tanh² is 0: no gradient reaches the weight that
    saturates it (the fast tanh's clamp left 4.8e-7 · 100 of it)"""
    G, j = {"rnn": 1, "gru": 3, "lstm": 4}[cell], {"rnn": 0, "gru": 2, "lstm": 2}[cell]
    got = {}
    for dt in (np.float32, np.float64):
        W_xh = np.zeros((1, G), dt)
        W_xh[0, j] = 1.0                                  # h, the GRU's n, the LSTM's g: tanh(100)
        p = {"W_xh": W_xh, "W_hh": np.zeros((1, G), dt), "b_h": np.zeros(G, dt)}
        if cell == "gru":
            p["b_hn"] = np.zeros(1, dt)
        X = np.full((1, 1, 1), 100.0, dt)
        Hs = fastbptt.rnn_forward(p, X, cell=cell)
        got[dt] = fastbptt.rnn_backward(p, X, Hs, np.ones_like(Hs), cell=cell)["W_xh"]
    assert got[np.float32][0, j] == 0 and abs(got[np.float64][0, j]) < 1e-60
    np.testing.assert_allclose(got[np.float32], got[np.float64], rtol=1e-6, atol=1e-30)   # the other gates
